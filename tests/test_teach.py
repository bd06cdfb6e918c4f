"""teach: teacher rationales filtered by their final answer, against a real OpenAI-compatible HTTP server
(started here on 127.0.0.1) and a local tiny Hugging Face model.

Run as a script (``python tests/test_teach.py serve PORT_FILE DIE_AFTER``) this file is the same fake
server in its own process, so a test can have it killed mid-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from modecotd_engine.engine.answers import answers_match, extract_answer, format_output
from modecotd_engine.engine.teach import (
    HTTPTeacher,
    LocalTeacher,
    SampleConfig,
    TeachError,
    TeacherError,
    TeacherUnavailable,
    clean_rationale,
    load_questions,
    progress_path,
    split_prompt,
    summary_path,
    teach,
    training_input,
)

API_KEY = "sk-test-5ecret-Key-0123456789"
MODEL = "fake-teacher"
ARITH_RE = re.compile(r"What is (\d+) \+ (\d+)\?")


def prompt_of(q: str) -> str:
    return f"Infer the correct answer for the question.\n\nQ: {q}\nA:"


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def done_indices(out: Path) -> list[int]:
    return [r["index"] for r in read_jsonl(progress_path(out)) if "index" in r]


# ----------------------------------------------------------------------------------------------------
# A fake OpenAI-compatible endpoint


class FakeAPI:
    """Speaks ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``.

    ``samples`` maps a question (found in the prompt) to its canned completions, cycled to ``n``;
    questions ``What is A + B?`` not in it get a right rationale. ``script(question, attempt)`` may
    override an answer: ``("status", code, headers, body)``, ``("raw", bytes)``, ``("hang", seconds)``.
    """

    def __init__(self, samples=None, script=None, die_after: int | None = None):
        self.samples = samples or {}
        self.script = script
        self.die_after = die_after
        self.requests: list[tuple[str, dict, dict | None]] = []
        self.attempts: Counter[str] = Counter()
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                with api.lock:
                    api.requests.append((self.path, dict(self.headers), None))
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "no such route"}})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.loads(body)
                api.handle(self, payload)

            def _send(self, status, obj=None, headers=None, raw=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.handler = Handler

    def question_of(self, prompt: str) -> str:
        for q in self.samples:
            if q in prompt:
                return q
        m = ARITH_RE.search(prompt)
        return m.group(0) if m else prompt

    def completions_for(self, question: str, n: int) -> list[str]:
        canned = self.samples.get(question)
        if canned is None:
            a, b = map(int, ARITH_RE.search(question).groups())
            canned = [f"{a} plus {b} is {a + b}.\nThe answer is {a + b}."]
        return [canned[i % len(canned)] for i in range(n)]

    def handle(self, h, payload: dict) -> None:
        chat = h.path.endswith("/chat/completions")
        prompt = payload["messages"][-1]["content"] if chat else payload["prompt"]
        question = self.question_of(prompt)
        with self.lock:
            self.requests.append((h.path, dict(h.headers), payload))
            attempt = self.attempts[question]
            self.attempts[question] += 1
            posts = sum(1 for r in self.requests if r[2] is not None)
        if self.die_after is not None and posts > self.die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        action = self.script(question, attempt) if self.script else None
        if action is not None and action[0] == "hang":
            time.sleep(action[1])
            action = None
        if action is not None:
            if action[0] == "status":
                _, code, headers, body = action
                h._send(code, body, headers)
            else:
                h._send(200, raw=action[1])
            return
        texts = self.completions_for(question, int(payload.get("n", 1)))
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                       for i, t in enumerate(texts)]
        else:
            choices = [{"index": i, "text": t, "finish_reason": "stop"} for i, t in enumerate(texts)]
        h._send(200, {"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion",
                      "model": payload.get("model"), "choices": choices})

    def posts(self, question: str | None = None) -> list[dict]:
        with self.lock:
            return [p for _, _, p in self.requests
                    if p is not None and (question is None or question in json.dumps(p))]

    def start(self) -> "FakeAPI":
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # a client that timed out closed the socket
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    server = FakeAPI().start()
    yield server
    server.stop()


def http_teacher(api: FakeAPI, **kw) -> HTTPTeacher:
    kw.setdefault("model", MODEL)
    kw.setdefault("api_key", API_KEY)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    kw.setdefault("retries", 2)
    return HTTPTeacher(api.url, **kw)


def assert_no_key(tmp_path: Path, *texts: str) -> None:
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert API_KEY not in path.read_text(errors="replace"), path
    for text in texts:
        assert API_KEY not in text


# ----------------------------------------------------------------------------------------------------
# Filtering, prompts, format


def test_keeps_only_right_distinct_rationales(api, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    api.samples = {
        "What is 2 + 3?": [
            "2 plus 3 is 5.\nThe answer is 5.",
            "2 plus 3 is 6. The answer is 6.",
            "2  plus 3 is 5.\n  The answer is 5.",  # the first one again, up to whitespace
            "Adding them gives 5.\n\n-->\n\n5 END",
        ],
        "What is 4 + 4?": ["4 and 4 make 9.", "I do not know."],
        "What is 1 + 1?": ["I cannot say."],
    }
    qfile = write_jsonl(tmp_path / "addsub.jsonl", [
        {"input": prompt_of("What is 2 + 3?"), "output": "5"},
        {"input": prompt_of("What is 4 + 4?"), "output": "Four and four.\n\n-->\n\n8 END"},
        {"input": prompt_of("What is 1 + 1?"), "output": 2},
    ])
    out = tmp_path / "out" / "addsub.jsonl"
    summary = teach(qfile, out, http_teacher(api), samples=4, max_new_tokens=64, progress=False)

    records = read_jsonl(out)
    assert records == [
        {"input": prompt_of("What is 2 + 3?"), "output": "2 plus 3 is 5.\nThe answer is 5.\n\n-->\n\n5 END"},
        {"input": prompt_of("What is 2 + 3?"), "output": "Adding them gives 5.\n\n-->\n\n5 END"},
    ]
    for rec in records:
        assert answers_match(extract_answer(rec["output"], "arithmetic"), "5", "arithmetic")
    assert (summary.task, summary.task_type) == ("addsub", "arithmetic")
    assert (summary.asked, summary.answered, summary.kept, summary.records) == (3, 2, 1, 2)
    assert summary.samples == 12 and summary.duplicates == 1 + 2 + 3
    assert summary.kept_rate == pytest.approx(1 / 3) and summary.complete and summary.failed == 0
    assert sorted(done_indices(out)) == [0, 1, 2]  # questions with nothing kept are done too
    on_disk = json.loads(summary_path(out).read_text())
    assert on_disk["kept"] == 1 and on_disk["records"] == 2 and on_disk["teacher"].startswith(api.url)

    posts = api.posts()
    assert len(posts) == 3 and api.requests[0][0] == "/v1/chat/completions"
    for path, headers, payload in api.requests:
        assert headers["Authorization"] == f"Bearer {API_KEY}"
        assert payload["model"] == MODEL and payload["n"] == 4 and payload["max_tokens"] == 64
        assert payload["temperature"] == pytest.approx(0.7)  # the K > 1 default
    contents = sorted(p["messages"][0]["content"] for p in posts)
    assert contents[0] == "Q: What is 1 + 1?\nA: Let's think step by step."
    assert_no_key(tmp_path, caplog.text, *capsys.readouterr())


def test_completions_endpoint_template_and_model_discovery(api, tmp_path):
    api.samples = {"What is 2 + 3?": [
        # The number of an invented follow-up question must not be taken as the answer (18).
        "2 plus 3 is 5.\nQ: What is 9 + 9?\nA: 18",
        "Hmm.\nQ: What is 5 + 0?",
    ]}
    qfile = tmp_path / "numbers.json"
    qfile.write_text(json.dumps([{"question": "What is 2 + 3?", "answer": "5"}]))
    template = "Question: {question}\nWork it out, then say {{the answer}}.\n"
    teacher = http_teacher(api, model=None, completions=True)
    assert teacher.model == MODEL  # from GET /v1/models
    summary = teach(qfile, tmp_path / "o.jsonl", teacher, samples=2, temperature=1.0, template=template,
                    progress=False)
    (post,) = api.posts()
    assert api.requests[-1][0] == "/v1/completions"
    assert post["prompt"] == "Question: What is 2 + 3?\nWork it out, then say {the answer}.\n"
    assert post["temperature"] == 1.0 and "\nQ:" in post["stop"]
    assert read_jsonl(tmp_path / "o.jsonl") == [
        {"input": training_input("What is 2 + 3?", "arithmetic"), "output": "2 plus 3 is 5.\n\n-->\n\n5 END"}
    ]
    assert summary.task_type == "arithmetic" and summary.kept == 1 and summary.answered == 1


def test_prompt_and_rationale_parsing():
    q = "Where is a skylight? Answer choices: (A) roof, (B) floor."
    assert split_prompt(f"Infer the correct choice for the question.\n\nQ: {q}\nA:") == (q, True)
    assert split_prompt(f"Infer the correct choice for the question. Q: {q}\nA: Let's think step by step.") == (q, True)
    assert split_prompt("Can oysters be used in guitars?\n\n###\n\n") == ("Can oysters be used in guitars?", True)
    assert split_prompt("  What is 2 + 3? ") == ("What is 2 + 3?", False)
    assert training_input(q, "choice") == f"Infer the correct choice for the question.\n\nQ: {q}\nA:"
    assert training_input("What is 1 + 1?", "arithmetic") == prompt_of("What is 1 + 1?")
    assert clean_rationale("So 7.\n\n-->\n\n7 END") == "So 7."
    assert clean_rationale("So 7. END") == "So 7."
    assert clean_rationale("So 7.\nQ: next one\nA: 9") == "So 7."
    assert format_output(clean_rationale("It is (A).\n-->\nA END"), "A") == "It is (A).\n\n-->\n\nA END"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("t.jsonl", '{"input": "q1", "output": "1"}\n{"input": "q2", "output": \n', ":2: invalid JSON"),
        ("t.jsonl", '{"input": "q1"}\n', ":1: missing 'output'"),
        ("t.jsonl", '{"prompt": "q1", "completion": "1"}\n', ":1: expected keys 'input'/'output'"),
        ("t.jsonl", '["q1", "1"]\n', ":1: expected an object"),
        ("t.jsonl", '{"input": "", "output": "1"}\n', ":1: 'input' must be a non-empty string"),
        ("t.jsonl", '{"input": "q", "output": null}\n', ":1: 'output' must be a non-empty answer"),
        ("t.json", '[{"question": "q1", "answer": "1"}, {"answer": "2"}]', ": record 2: 'question' must be"),
        ("t.json", "", ": no questions"),
        ("mystery.jsonl", '{"input": "Sky colour?", "output": "blue"}\n', "--task-type"),
    ],
)
def test_bad_questions_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TeachError) as info:
        load_questions(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_question_formats_and_task_type(tmp_path):
    path = write_jsonl(tmp_path / "mystery.jsonl", [
        {"input": "Infer the correct choice for the question.\n\nQ: Pick one. Answer choices: (A) x, (B) y.\nA:",
         "output": "Because.\n\n-->\n\nB END"},
        {"question": "Pick again. Answer choices: (A) x, (B) y.", "answer": "(A)"},
    ])
    qset = load_questions(path)
    assert (qset.task, qset.task_type) == ("mystery", "choice")
    assert [q.gold for q in qset.questions] == ["B", "(A)"]
    assert qset.questions[0].input.startswith("Infer the correct choice") and qset.questions[0].question == (
        "Pick one. Answer choices: (A) x, (B) y.")
    assert qset.questions[1].input == training_input("Pick again. Answer choices: (A) x, (B) y.", "choice")
    forced = load_questions(path, task="other", task_type="text")
    assert (forced.task, forced.task_type) == ("other", "text")
    with pytest.raises(TeachError, match="unknown task type"):
        load_questions(path, task_type="poetry")


# ----------------------------------------------------------------------------------------------------
# HTTP robustness


def test_429_is_retried_after_retry_after(api, tmp_path):
    too_many = ("status", 429, {"Retry-After": "1"}, {"error": "slow down"})
    api.script = lambda q, attempt: too_many if attempt == 0 else None
    qfile = write_jsonl(tmp_path / "addsub.jsonl", [{"question": "What is 2 + 2?", "answer": "4"}])
    t0 = time.perf_counter()
    summary = teach(qfile, tmp_path / "o.jsonl", http_teacher(api, backoff=0.01), progress=False)
    elapsed = time.perf_counter() - t0
    assert len(api.posts()) == 2 and summary.teacher_stats["retries"] == 1
    assert elapsed >= 1.0  # backoff alone would have waited ~0.01 s
    assert summary.kept == 1 and summary.complete


def test_5xx_and_malformed_json_are_retried_then_failed_and_resumed(api, tmp_path):
    def script(q, attempt):
        if q == "What is 1 + 1?" and attempt < 2:
            return ("status", 500 + 3 * attempt, {}, {"error": "busy"})  # 500 then 503
        if q == "What is 2 + 2?":
            return ("raw", b'{"choices": [{"message": ')  # never valid
        if q == "What is 3 + 3?" and attempt == 0:
            return ("raw", b'{"choices": "oops"}')  # valid JSON, wrong shape
        return None

    api.script = script
    qfile = write_jsonl(tmp_path / "addsub.jsonl",
                        [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in (1, 2, 3)])
    out = tmp_path / "o.jsonl"
    summary = teach(qfile, out, http_teacher(api, retries=2, concurrency=3), progress=False)
    assert api.attempts["What is 1 + 1?"] == 3 and api.attempts["What is 2 + 2?"] == 3
    assert api.attempts["What is 3 + 3?"] == 2
    assert summary.failed == 1 and not summary.complete and summary.remaining == 1
    assert summary.failures[0]["index"] == 1 and "malformed" in summary.failures[0]["error"]
    assert summary.teacher_stats["retries"] == 2 + 2 + 1 and summary.teacher_stats["malformed"] == 4
    assert (summary.asked, summary.kept, summary.records) == (3, 2, 2)
    assert sorted(done_indices(out)) == [0, 2]

    api.script = None
    before = len(api.posts())
    again = teach(qfile, out, http_teacher(api), resume=True, progress=False)
    assert len(api.posts()) == before + 1  # only the failed question is asked again
    assert again.complete and again.failed == 0 and (again.asked, again.kept, again.records) == (3, 3, 3)
    inputs = [r["input"] for r in read_jsonl(out)]
    assert len(inputs) == len(set(inputs)) == 3


def test_hanging_request_times_out_and_is_retried(api, tmp_path):
    api.script = lambda q, attempt: ("hang", 8.0) if attempt == 0 else None
    qfile = write_jsonl(tmp_path / "addsub.jsonl", [{"question": "What is 5 + 5?", "answer": "10"}])
    t0 = time.perf_counter()
    summary = teach(qfile, tmp_path / "o.jsonl", http_teacher(api, timeout=1.0), progress=False)
    assert time.perf_counter() - t0 < 6.0  # did not wait for the hung answer
    assert summary.kept == 1 and summary.teacher_stats["retries"] == 1 and len(api.posts()) == 2


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_not_found_stop_the_run_without_retry(api, tmp_path, caplog, status):
    caplog.set_level(logging.DEBUG)
    # The server echoes the key back; it must still not reach the message, the logs or any file.
    api.script = lambda q, attempt: ("status", status, {}, {"error": {"message": f"bad key {API_KEY}"}})
    qfile = write_jsonl(tmp_path / "addsub.jsonl",
                        [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)])
    out = tmp_path / "o.jsonl"
    with pytest.raises(TeacherError) as info:
        teach(qfile, out, http_teacher(api, concurrency=1, retries=3), progress=False)
    message = str(info.value)
    assert f"{api.url}/chat/completions" in message and f"HTTP {status}" in message
    assert len(api.posts()) == 1  # no retry, and the run stopped
    assert info.value.summary is not None and info.value.summary.aborted
    assert json.loads(summary_path(out).read_text())["remaining"] == 4
    assert_no_key(tmp_path, message, caplog.text)


def _start_server_process(tmp_path: Path, name: str, die_after: int | None) -> tuple[subprocess.Popen, str]:
    port_file = tmp_path / f"{name}.port"
    proc = subprocess.Popen(
        [sys.executable, __file__, "serve", str(port_file), str(die_after if die_after is not None else -1)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("fake teacher server did not start")
        time.sleep(0.02)
    return proc, f"http://127.0.0.1:{int(port_file.read_text())}/v1"


def test_server_killed_mid_run_then_resume_without_duplicates(tmp_path):
    qfile = write_jsonl(tmp_path / "addsub.jsonl",
                        [{"question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(8)])
    out = tmp_path / "o.jsonl"
    proc, url = _start_server_process(tmp_path, "first", die_after=3)  # SIGKILLs itself on request 4
    try:
        teacher = HTTPTeacher(url, model=MODEL, concurrency=1, retries=2, backoff=0.01, timeout=5)
        with pytest.raises(TeacherUnavailable) as info:
            teach(qfile, out, teacher, progress=False)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()
    assert url in str(info.value)
    assert len(read_jsonl(out)) == 3 and len(done_indices(out)) == 3
    partial = json.loads(summary_path(out).read_text())
    assert partial["remaining"] == 5 and partial["aborted"] and not partial["complete"]

    with pytest.raises(TeachError, match="already exists"):
        teach(qfile, out, teacher, progress=False)

    proc, url = _start_server_process(tmp_path, "second", die_after=None)
    try:
        summary = teach(qfile, out, HTTPTeacher(url, model=MODEL, concurrency=4, backoff=0.01), resume=True,
                        progress=False)
    finally:
        proc.kill()
        proc.wait()
    assert summary.complete and (summary.asked, summary.kept, summary.records) == (8, 8, 8)
    assert summary.teacher_stats["requests"] == 5  # only the questions the first run did not finish
    inputs = [r["input"] for r in read_jsonl(out)]
    assert sorted(inputs) == sorted(prompt_of(f"What is {i} + 2?") for i in range(8))
    assert sorted(done_indices(out)) == list(range(8))


def test_resume_recovers_unlisted_records_and_a_torn_last_line(api, tmp_path):
    qfile = write_jsonl(tmp_path / "addsub.jsonl",
                        [{"question": f"What is {i} + 3?", "answer": str(i + 3)} for i in range(3)])
    out = tmp_path / "o.jsonl"
    teach(qfile, out, http_teacher(api), progress=False)
    # A crash after a question's records were written but before its progress line, in the middle of
    # writing the next record.
    lines = progress_path(out).read_text().splitlines(keepends=True)
    progress_path(out).write_text("".join(lines[:-1]))
    with open(out, "a") as f:
        f.write('{"input": "Infer the corr')
    before = len(api.posts())
    summary = teach(qfile, out, http_teacher(api), resume=True, progress=False)
    assert len(api.posts()) == before and summary.complete and summary.records == 3
    assert len(read_jsonl(out)) == 3 and sorted(done_indices(out)) == [0, 1, 2]

    qfile.write_text(qfile.read_text() + json.dumps({"question": "What is 9 + 3?", "answer": "12"}) + "\n")
    with pytest.raises(TeachError, match="different questions file"):
        teach(qfile, out, http_teacher(api), resume=True, progress=False)


# ----------------------------------------------------------------------------------------------------
# CLI


def _parser():
    from modecotd_engine.cli import teach as teach_cli

    parser = argparse.ArgumentParser(prog="modecotd-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    teach_cli.register(sub)
    return parser, sub.choices["teach"]


def test_cli_flags_have_help_and_run(api, tmp_path, monkeypatch, capsys):
    parser, sub = _parser()
    for action in sub._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
    qfile = write_jsonl(tmp_path / "addsub.jsonl", [{"question": "What is 7 + 1?", "answer": "8"}])
    out = tmp_path / "o.jsonl"
    base = ["teach", "--teacher", api.url, "--questions", str(qfile), "--out", str(out), "--no-progress"]

    monkeypatch.delenv("TEACH_TEST_KEY", raising=False)
    args = parser.parse_args(base + ["--api-key-env", "TEACH_TEST_KEY"])
    assert args.func(args) == 2 and "TEACH_TEST_KEY" in capsys.readouterr().err

    monkeypatch.setenv("TEACH_TEST_KEY", API_KEY)
    args = parser.parse_args(base + ["--api-key-env", "TEACH_TEST_KEY", "--samples", "2", "--seed", "3"])
    assert args.func(args) == 0
    printed = capsys.readouterr()
    assert "kept 1" in printed.out and read_jsonl(out)[0]["output"].endswith("8 END")
    assert api.requests[-1][1]["Authorization"] == f"Bearer {API_KEY}" and api.posts()[-1]["seed"] == 3

    args = parser.parse_args(base)
    assert args.func(args) == 2 and "already exists" in capsys.readouterr().err

    api.script = lambda q, attempt: ("raw", b"not json")
    bad = write_jsonl(tmp_path / "more.jsonl", [{"question": "What is 7 + 2?", "answer": "9"}])
    args = parser.parse_args(["teach", "--teacher", api.url, "--questions", str(bad), "--out",
                              str(tmp_path / "m.jsonl"), "--retries", "0", "--no-progress"])
    assert args.func(args) == 3 and "--resume" in capsys.readouterr().err
    args = parser.parse_args(["teach", "--teacher", str(tmp_path / "nowhere"), "--questions", str(qfile),
                              "--out", str(tmp_path / "x.jsonl")])
    assert args.func(args) == 2 and "neither an http(s) URL nor a model directory" in capsys.readouterr().err
    assert_no_key(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Local teacher


@pytest.fixture(scope="module")
def varied_student(tmp_path_factory):
    """A tiny random student whose greedy outputs differ between prompts (larger init than the default)."""
    from conftest import make_tiny_student

    from modecotd_engine.engine.student import load_student

    path = make_tiny_student(tmp_path_factory.mktemp("teach") / "student", seed=1, initializer_range=0.3)
    return load_student(path, device="cpu")


def test_local_teacher_batched_matches_unbatched(varied_student):
    jobs = [(0, "Q: What is 2 + 3?\nA: Let's think step by step."), (1, "Q: x\nA:"),
            (2, "Q: Name a colour of the sky on a clear day, please?\nA: Let's think step by step.")]
    cfg = SampleConfig(samples=1, temperature=0.0, max_new_tokens=12)
    one = {c.index: c.texts for c in LocalTeacher(varied_student, batch_size=1).complete(jobs, cfg)}
    three = {c.index: c.texts for c in LocalTeacher(varied_student, batch_size=3).complete(jobs, cfg)}
    assert one == three and len({t[0] for t in one.values()}) == 3  # left padding changes nothing

    sampled = SampleConfig(samples=3, temperature=1.0, max_new_tokens=12, seed=7)
    teacher = LocalTeacher(varied_student, batch_size=2)
    first = {c.index: c.texts for c in teacher.complete(jobs, sampled)}
    assert first == {c.index: c.texts for c in teacher.complete(jobs, sampled)}  # seeded
    assert all(len(t) == 3 for t in first.values()) and len(set(first[0])) > 1


def test_local_teacher_pipeline_filters_by_gold(varied_student, tmp_path):
    teacher = LocalTeacher(varied_student, batch_size=2)
    assert not teacher.chat  # the byte tokenizer has no chat template
    questions = ["What is 2 + 3?", "Spell cat backwards.", "Name a prime."]
    prompts = [(i, f"Q: {q}\nA: Let's think step by step.") for i, q in enumerate(questions)]
    greedy = {c.index: c.texts[0] for c in teacher.complete(prompts, SampleConfig(max_new_tokens=16))}
    # The random model's greedy answer to question 0 becomes its gold answer, so that question (only)
    # must be kept, with exactly that rationale.
    gold0 = extract_answer(greedy[0], "text")
    assert gold0 and "\nQ:" not in greedy[0]
    qfile = write_jsonl(tmp_path / "echo.jsonl", [
        {"question": questions[0], "answer": gold0},
        {"question": questions[1], "answer": "tac"},
        {"question": questions[2], "answer": "7"},
    ])
    out = tmp_path / "o.jsonl"
    summary = teach(qfile, out, teacher, max_new_tokens=16, task_type="text", progress=False)
    assert read_jsonl(out) == [{"input": training_input(questions[0], "text"),
                                "output": format_output(clean_rationale(greedy[0]), gold0)}]
    assert (summary.asked, summary.kept, summary.records, summary.samples) == (3, 1, 1, 3)
    assert summary.complete and json.loads(summary_path(out).read_text())["kept"] == 1
    assert sorted(done_indices(out)) == [0, 1, 2]


def test_local_teacher_chat_template_and_cli(varied_student, tmp_path, capsys):
    tok = varied_student.tokenizer
    with pytest.raises(TeachError, match="no chat template"):
        LocalTeacher(varied_student, chat=True)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    try:
        teacher = LocalTeacher(varied_student, batch_size=2)
        assert teacher.chat  # picked up because the tokenizer has one
        assert teacher._render("Q: hi\nA:") == "<s>user: Q: hi\nA:</s><s>assistant:"
        done = list(teacher.complete([(0, "Q: hi\nA:"), (1, "Q: bye\nA:")], SampleConfig(max_new_tokens=4)))
        assert sorted(c.index for c in done) == [0, 1] and all(len(c.texts) == 1 for c in done)
        assert not LocalTeacher(varied_student, chat=False).chat
    finally:
        tok.chat_template = None

    parser, _ = _parser()
    qfile = write_jsonl(tmp_path / "addsub.jsonl", [{"question": f"What is {i} + 1?", "answer": "0"} for i in range(3)])
    out = tmp_path / "o.jsonl"
    args = parser.parse_args(["teach", "--teacher", str(varied_student.path), "--questions", str(qfile), "--out",
                              str(out), "--samples", "2", "--temperature", "1.0", "--max-new-tokens", "4",
                              "--batch-size", "2", "--device", "cpu", "--dtype", "float32", "--no-progress"])
    assert args.func(args) == 0
    summary = json.loads(summary_path(out).read_text())
    assert summary["asked"] == 3 and summary["samples"] == 6 and summary["teacher"].startswith("local ")
    assert "asked 3" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# The fake server as its own process


def _serve_main(argv: list[str]) -> None:
    port_file, die_after = Path(argv[0]), int(argv[1])
    server = FakeAPI(die_after=die_after if die_after >= 0 else None)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), server.handler)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(httpd.server_address[1]))
    os.replace(tmp, port_file)
    httpd.serve_forever()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "serve":
    _serve_main(sys.argv[2:])
