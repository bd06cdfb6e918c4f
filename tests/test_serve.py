"""`modecotd-engine serve` end to end: a real uvicorn server on 127.0.0.1 (started and stopped here) in
front of the engine loop, driven with the official `openai` client and raw HTTP, on a tiny student.

Greedy texts are compared with what `infer` gives each request alone; continuous batching is read from
the loop's step records, never from timings. Every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai  # the test extra: the official client is the point of these tests, never skipped
import pytest
import torch
import uvicorn

from conftest import make_random_bank, make_tiny_student

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS = ("add", "letters", "coins")
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
# Greedy requests run to max_tokens: the fixture's student never picks EOS (see `student_dir`) and the
# server runs without stop strings and guards, so a long request stays in the batch for as many steps
# as it asks for. On the CPU in float32, a row's numbers do not depend on the batch it shares.
FLAGS = ["--device", "cpu", "--dtype", "float32", "--no-stop", "--no-answer-stop", "--no-loop-stop"]
LONG = 900  # tokens of a request that is still decoding while the test does other things
WAIT_S = 60.0


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A tiny student with a chat template whose EOS row of the (tied) embedding is zero: the EOS logit
    is 0 while the largest of the other 258 is positive, so greedy decoding never ends by EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = make_tiny_student(tmp_path_factory.mktemp("serve") / "student", seed=3, initializer_range=0.2)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[model.config.eos_token_id] = 0.0
    model.save_pretrained(d, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bank_root(student_dir, base_model, tmp_path_factory):
    """A bank of three experts and a mixtures directory: weight-mode, output-mode and router mixtures."""
    from modecotd_engine.engine.mixture import Mixture, bank_record, save_mixture

    root = tmp_path_factory.mktemp("serve_bank")
    bank = make_random_bank(base_model, EXPERTS, b_std=0.3)
    bank.save(root / "bank")
    (root / "mixtures").mkdir()
    common = dict(experts=list(bank.names), seed=0, bank=bank_record(bank, root / "bank"), shots_loss_before=None,
                  shots_loss_after=None, evaluations=None)
    save_mixture(Mixture(weights={"add": 0.7, "coins": -0.4}, mode="weight", method="search", target="word_math",
                         **common), root / "mixtures" / "blend.json")
    save_mixture(Mixture(weights={n: 1 / 3 for n in EXPERTS}, mode="output", method="uniform", target="even",
                         **common), root / "mixtures" / "even.json")
    gen = torch.Generator().manual_seed(11)
    routers = {m: torch.randn(bank.num_experts, k, generator=gen) for m, (k, _n) in bank.modules.items()}
    save_mixture(Mixture(weights={n: 1 / 3 for n in EXPERTS}, mode="output", method="router", target="routed",
                         top_k=2, router_state=routers, **common), root / "mixtures" / "routed.json")
    return root


def serve_args(student_dir, root, *extra):
    from modecotd_engine.cli.main import build_parser

    return build_parser().parse_args(["serve", "--bank", str(root / "bank"), "--mixtures", str(root / "mixtures"),
                                      "--student", str(student_dir), *FLAGS, *extra])


class Running:
    """A server of `serve`'s own making (``cli.serve.build_server``) under uvicorn in a thread."""

    def __init__(self, server, port: int, uv):
        self.server, self.port, self.uv = server, port, uv
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)

    @property
    def loop(self):
        return self.server.loop

    def records(self):
        return self.loop.step_records()

    def wait_until(self, what, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, "timed out waiting for the server"
            time.sleep(0.01)


@contextlib.contextmanager
def running_server(student_dir, root, *extra):
    from modecotd_engine.cli.serve import build_server
    from modecotd_engine.engine.serve_api import build_app

    server = build_server(serve_args(student_dir, root, *extra))
    server.loop.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(build_app(server), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    run = Running(server, sock.getsockname()[1], uv)
    try:
        run.wait_until(lambda: uv.started)
        yield run
    finally:
        uv.should_exit = True
        thread.join(WAIT_S)
        server.loop.stop(WAIT_S)
        sock.close()
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def srv(student_dir, bank_root):
    with running_server(student_dir, bank_root, "--batch-size", "8") as run:
        yield run


@pytest.fixture(scope="module")
def offline(student_dir, bank_root):
    """What `infer` gives one request alone: the same student and bank, loaded as `serve` loads them."""
    from modecotd_engine.cli import infer
    from modecotd_engine.engine import generate as g

    args = serve_args(student_dir, bank_root)
    student, bank, handle = infer.load_model(args, need_bank=True)
    base = infer.generation_config(args, bank)

    def selection(model: str, mode: str | None = None, weights: dict | None = None):
        if weights is not None:
            return g.Selection(bank.weights_vector(weights), mode or "output", model)
        if model == "base":
            return g.frozen_selection(bank)
        path = bank_root / "mixtures" / f"{model}.json"
        if path.exists():
            return g.mixture_selection(str(path), bank, str(bank_root / "bank"), mode)
        return g.spec_selection(model, bank, mode)

    def run(prompt: str, model: str, max_tokens: int, *, chat: bool = False, mode=None, weights=None) -> str:
        from dataclasses import replace

        config = replace(base, max_new_tokens=max_tokens, prompt_format="chat" if chat else base.prompt_format)
        res = infer.serve(student.model, student.tokenizer, handle, [prompt], [selection(model, mode, weights)], config)
        return res["texts"][0]

    return run


def ticket_id(response_id: str) -> int:
    return int(response_id.rsplit("-", 1)[1])


def post_raw(url: str, data: bytes) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=WAIT_S) as r:
        return r.read().decode()


# ------------------------------------------------------------------------------------------ models


def test_models_lists_base_experts_and_mixtures(srv):
    data = srv.client.models.list().data
    assert [m.id for m in data] == ["base", *EXPERTS, "blend", "even", "routed"]
    parents = {m.id: m.parent for m in data}
    assert parents["base"] is None and all(parents[k] == "base" for k in parents if k != "base")
    blend = srv.client.models.retrieve("blend")
    assert blend.model_extra["kind"] == "mixture" and blend.model_extra["mode"] == "weight"
    assert blend.model_extra["weights"]["add"] == pytest.approx(0.7)
    assert srv.client.models.retrieve("routed").model_extra["method"] == "router"


# ------------------------------------------------------------------------------- completions, chat


def test_completion_and_chat_give_infer_texts(srv, offline):
    r = srv.client.completions.create(model="add", prompt="Q: 3 + 4?\nA:", max_tokens=9, temperature=0)
    assert r.object == "text_completion" and r.model == "add"
    assert r.choices[0].text == offline("Q: 3 + 4?\nA:", "add", 9)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (9, r.usage.prompt_tokens + 9)

    c = srv.client.chat.completions.create(model="blend", messages=[{"role": "user", "content": "Hi there"}],
                                           max_tokens=7, temperature=0)
    assert c.object == "chat.completion" and c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == offline("Hi there", "blend", 7, chat=True)


def test_stop_strings_cut_the_text(srv):
    full = srv.client.completions.create(model="coins", prompt="Stop here:", max_tokens=20, temperature=0)
    text = full.choices[0].text
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].strip())
    cut = srv.client.completions.create(model="coins", prompt="Stop here:", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop) + len(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].model_extra["stop_reason"] == "stop"


def test_streaming_pieces_join_to_the_text(srv):
    whole = srv.client.completions.create(model="letters", prompt="Stream me", max_tokens=16, temperature=0)
    chunks = list(srv.client.completions.create(model="letters", prompt="Stream me", max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 2
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 16

    msgs = [{"role": "user", "content": "Stream a chat"}]
    whole = srv.client.chat.completions.create(model="even", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(srv.client.chat.completions.create(model="even", messages=msgs, max_tokens=12, temperature=0,
                                                     stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_is_server_sent_events_ending_with_done(srv):
    body = json.dumps({"model": "add", "prompt": "raw", "max_tokens": 4, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(srv.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=WAIT_S) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][len("data: "):])
    assert first["object"] == "text_completion" and first["id"].startswith("cmpl-")


# ---------------------------------------------------------------------------------------- n, vote


def test_n_samples_share_one_prefill_and_vote(srv):
    kw = dict(model="add", prompt="Q: 2 + 2?\nA:", max_tokens=10, n=4, temperature=1.0, seed=5)
    a = srv.client.completions.create(**kw, extra_body={"vote": True, "task_type": "text"})
    texts = [c.text for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2, 3] and len(set(texts)) > 1
    assert [c.text for c in srv.client.completions.create(**kw).choices] == texts  # a seed repeats its samples
    assert [c.text for c in srv.client.completions.create(**{**kw, "seed": 6}).choices] != texts

    from modecotd_engine.engine.answers import extract_answer
    from modecotd_engine.engine.evaluate import majority_vote

    vote = a.model_extra["vote"]
    answers = [extract_answer(t, "text") for t in texts]
    assert vote["answers"] == answers and vote["task_type"] == "text"
    assert (vote["answer"], vote["votes"]) == majority_vote(answers, "text")
    assert texts[vote["index"]].strip().splitlines()[-1].strip() == vote["answer"]

    # the four rows joined in one admission that prefilled the prompt once
    tid = ticket_id(a.id)
    step = next(r for r in srv.records() if tid in r.admitted)
    assert len(step.admitted) == 1, "the request was admitted alone"
    joins = srv.loop.decoder.admissions
    assert any(j["joined"] == 4 and j["prefilled"] == 1 for j in joins)

    greedy = srv.client.completions.create(model="add", prompt="Q: 2 + 2?\nA:", max_tokens=10, n=3, temperature=0,
                                           extra_body={"vote": True, "task_type": "text"})
    assert len({c.text for c in greedy.choices}) == 1 and greedy.model_extra["vote"]["votes"] == {
        greedy.model_extra["vote"]["answer"]: 3}


def test_vote_takes_the_task_type_from_the_model(srv):
    r = srv.client.completions.create(model="blend", prompt="Q: 1 + 1?\nA:", max_tokens=6, n=2, temperature=0,
                                      extra_body={"vote": True})
    assert r.model_extra["vote"]["task_type"] == "arithmetic"  # blend's target is word_math
    with pytest.raises(openai.BadRequestError, match="needs 'task_type'"):
        srv.client.completions.create(model="add", prompt="x", max_tokens=2, extra_body={"vote": True})


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kw, status, param, code", [
    (dict(model="gsm8k", prompt="x"), 404, "model", "model_not_found"),
    (dict(model="add=0.5,gsm8k=0.5", prompt="x"), 400, "model", "invalid_expert_spec"),
    (dict(model="add=lots", prompt="x"), 400, "model", "invalid_expert_spec"),
    (dict(model="base", prompt="x", extra_body={"weights": {"add": "much"}}), 400, "weights", None),
    (dict(model="base", prompt="x", extra_body={"weights": {"gsm8k": 1.0}}), 400, "weights", None),
    (dict(model="routed", prompt="x", extra_body={"weights": {"add": 1.0}}), 400, "weights", None),
    (dict(model="add", prompt="x", extra_body={"mode": "sum"}), 400, "mode", None),
    (dict(model="add", prompt="   "), 400, "prompt", "empty_prompt"),
    (dict(model="add", prompt="x" * 1020, max_tokens=10), 400, "max_tokens", "context_length_exceeded"),
    (dict(model="add", prompt="x", n=9), 400, "n", None),
    (dict(model="add", prompt="x", max_tokens=0), 400, "max_tokens", None),
    (dict(model="add", prompt="x", logprobs=2), 400, "logprobs", "unsupported_field"),
    (dict(model="add", prompt="x", top_p=1.5), 400, None, None),
])
def test_bad_requests_get_openai_errors(srv, kw, status, param, code):
    with pytest.raises(openai.APIStatusError) as err:
        srv.client.completions.create(**{"max_tokens": 2, **kw})
    assert err.value.status_code == status
    body = err.value.body
    assert body["param"] == param and body["code"] == code and body["message"]
    assert body["type"] == "invalid_request_error"


def test_bad_json_and_bad_chat_bodies(srv):
    status, _, body = post_raw(srv.url + "/v1/completions", b'{"model": "add", "prompt": ')
    assert status == 400 and body["error"]["code"] == "invalid_json" and "not valid JSON" in body["error"]["message"]
    status, _, body = post_raw(srv.url + "/v1/completions", b'["a list"]')
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, _, body = post_raw(srv.url + "/v1/chat/completions", json.dumps({"model": "add", "messages": []}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    msgs = [{"role": "user", "content": " "}]
    status, _, body = post_raw(srv.url + "/v1/chat/completions", json.dumps({"model": "add", "messages": msgs}).encode())
    assert status == 400 and body["error"]["code"] == "empty_prompt"
    status, _, body = post_raw(srv.url + "/v1/nowhere", b"{}")
    assert status == 404 and body["error"]["message"]
    # the loop never saw any of them, and it still serves
    assert srv.client.completions.create(model="add", prompt="ok", max_tokens=2).choices[0].finish_reason == "length"


# ------------------------------------------------------------------------------------ exactness


REQUESTS = [  # (model, extension fields, chat)
    ("base", {}, False), ("add", {}, False), ("letters", {}, True), ("coins", {}, False),
    ("add=0.7,coins=-0.4", {}, False), ("letters,coins", {}, True), ("blend", {}, False), ("even", {}, True),
    ("routed", {}, False), ("add,letters", {"mode": "weight"}, False), ("blend", {"mode": "output"}, True),
    ("base", {"weights": {"coins": 0.8, "letters": 0.3}}, False), ("coins", {"mode": "weight"}, True),
    ("routed", {}, True), ("add=1.5", {}, False), ("letters", {}, False),
]


def test_concurrent_clients_get_what_infer_gives_each_alone(srv, offline):
    """32 clients at once over experts, specs, mixtures (a router one too) and both composition modes,
    completions and chat, some streaming: each gets the greedy text of `infer` on its request alone."""
    jobs = []
    for i in range(32):
        model, ext, chat = REQUESTS[i % len(REQUESTS)]
        jobs.append(dict(model=model, ext=ext, chat=chat, prompt=f"Request {i}: " + "abcdefgh"[: i % 8],
                         max_tokens=6 + (i * 7) % 19, stream=i % 5 == 0))

    def call(job):
        kw = dict(model=job["model"], max_tokens=job["max_tokens"], temperature=0, extra_body=job["ext"] or None)
        if job["chat"]:
            kw["messages"] = [{"role": "user", "content": job["prompt"]}]
            if job["stream"]:
                return "".join(c.choices[0].delta.content or "" for c in
                               srv.client.chat.completions.create(**kw, stream=True))
            return srv.client.chat.completions.create(**kw).choices[0].message.content
        kw["prompt"] = job["prompt"]
        if job["stream"]:
            return "".join(c.choices[0].text for c in srv.client.completions.create(**kw, stream=True) if c.choices)
        return srv.client.completions.create(**kw).choices[0].text

    first_step = len(srv.records()) and srv.records()[-1].step + 1
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(call, jobs, timeout=4 * WAIT_S))
    for job, text in zip(jobs, got):
        want = offline(job["prompt"], job["model"], job["max_tokens"], chat=job["chat"], mode=job["ext"].get("mode"),
                       weights=job["ext"].get("weights"))
        assert text == want, job
    steps = [r for r in srv.records() if r.step >= first_step]
    admitted = [t for r in steps for t in r.admitted]
    assert len(admitted) == len(set(admitted)) == 32
    assert max(r.rows for r in steps) <= 8
    groups = {r.group for r in steps}
    assert (None, None) in groups  # gate rows of both modes: one group
    assert any(g[1] is not None for g in groups)  # the router mixture's own group
    assert len(groups) == 2


def test_requests_join_a_batch_that_is_decoding(srv, offline):
    """A request sent while another decodes joins the running batch (step records), and computes what
    it computes alone."""
    stream = srv.client.completions.create(model="add", prompt="long", max_tokens=LONG, temperature=0, stream=True)
    try:
        first = next(iter(stream))
        long_id = ticket_id(first.id)
        r = srv.client.completions.create(model="coins=0.6,letters=0.4", prompt="joins", max_tokens=5, temperature=0)
        assert r.choices[0].text == offline("joins", "coins=0.6,letters=0.4", 5)
        joined = next(s for s in srv.records() if ticket_id(r.id) in s.admitted)
        assert long_id in joined.running  # the long request was decoding when this one joined
        started = next(s for s in srv.records() if long_id in s.admitted)
        assert started.step < joined.step
    finally:
        stream.close()


# ------------------------------------------------------------------------------------------ faults


def test_a_client_closed_mid_stream_frees_its_row(srv):
    stream = srv.client.completions.create(model="letters", prompt="leave early", max_tokens=LONG, temperature=0,
                                           stream=True)
    chunks = iter(stream)
    tid = ticket_id(next(chunks).id)
    next(chunks)
    stream.close()
    srv.wait_until(lambda: any(r.dropped.get(tid) == "cancelled" for r in srv.records()))
    dropped = next(r for r in srv.records() if tid in r.dropped)
    assert all(tid not in r.running for r in srv.records() if r.step > dropped.step)
    srv.wait_until(lambda: srv.loop.metrics()["running_rows"] == 0)
    assert srv.loop.metrics()["requests"]["cancelled"] >= 1
    assert srv.client.completions.create(model="add", prompt="still here", max_tokens=3).usage.completion_tokens == 3


def test_a_client_that_leaves_a_plain_request_frees_its_row(srv):
    """Non-streaming: the server polls the connection while it waits and cancels a request whose client left."""
    first_step = srv.records()[-1].step + 1
    body = json.dumps({"model": "coins", "prompt": "hang up", "max_tokens": LONG}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=WAIT_S) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        srv.wait_until(lambda: any(r.admitted for r in srv.records() if r.step >= first_step))
    tid = next(t for r in srv.records() if r.step >= first_step for t in r.admitted)
    srv.wait_until(lambda: any(r.dropped.get(tid) == "cancelled" for r in srv.records()))
    srv.wait_until(lambda: srv.loop.metrics()["running_rows"] == 0)


def test_a_timed_out_request_gets_408_and_the_server_goes_on(srv, offline):
    with pytest.raises(openai.APIStatusError) as err:
        srv.client.completions.create(model="coins", prompt="too slow", max_tokens=LONG, extra_body={"timeout": 0.3})
    assert err.value.status_code == 408 and err.value.body["code"] == "timeout"
    srv.wait_until(lambda: any("timeout" in r.dropped.values() for r in srv.records()))  # recorded as the step ends
    r = srv.client.completions.create(model="coins", prompt="in time", max_tokens=4, temperature=0)
    assert r.choices[0].text == offline("in time", "coins", 4)


def test_a_full_queue_answers_429_with_retry_after(student_dir, bank_root):
    """Two slots, two places in the queue: two long streams decode, two requests wait, the fifth is
    refused; once the streams close the waiting ones are served, and so are new ones."""
    with running_server(student_dir, bank_root, "--batch-size", "2", "--max-queue", "2") as run:
        streams = [run.client.completions.create(model="add", prompt=f"hog {i}", max_tokens=LONG, stream=True)
                   for i in range(2)]
        with ThreadPoolExecutor(2) as pool:
            try:
                for s in streams:
                    next(iter(s))
                waiting = [pool.submit(run.client.completions.create, model="coins", prompt=f"wait {i}", max_tokens=3)
                           for i in range(2)]
                run.wait_until(lambda: run.loop.metrics()["queue"] == 2)
                with pytest.raises(openai.RateLimitError) as err:
                    run.client.completions.create(model="letters", prompt="one too many", max_tokens=3)
                assert err.value.response.headers["retry-after"] == "1"
                assert err.value.body["code"] == "queue_full" and err.value.body["type"] == "rate_limit_error"
                assert 'modecotd_requests_total{outcome="rejected"} 1' in get_text(run.url + "/metrics")
            finally:
                for s in streams:
                    s.close()
            assert [f.result(timeout=WAIT_S).usage.completion_tokens for f in waiting] == [3, 3]
        assert run.client.completions.create(model="base", prompt="after", max_tokens=2).usage.completion_tokens == 2


def test_a_request_that_fails_in_the_loop_fails_alone(student_dir, bank_root, tmp_path):
    """A router file gone after the start: requests for that mixture get a 500, the others are served."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(bank_root, root)
    with running_server(student_dir, root, "--batch-size", "4") as run:
        (root / "mixtures" / "routed.router.safetensors").unlink()
        with pytest.raises(openai.InternalServerError, match="cannot serve this model now"):
            run.client.completions.create(model="routed", prompt="x", max_tokens=3)
        assert run.client.completions.create(model="blend", prompt="y", max_tokens=3).usage.completion_tokens == 3
        assert run.loop.alive and run.loop.metrics()["requests"]["error"] == 1


# --------------------------------------------------------------------------------- health, metrics


def test_health_and_metrics(srv):
    assert json.loads(get_text(srv.url + "/health")) == {"status": "ok"}
    srv.client.completions.create(model="add", prompt="count me", max_tokens=5)
    srv.wait_until(lambda: "modecotd_running_rows 0" in get_text(srv.url + "/metrics"))
    text = get_text(srv.url + "/metrics")
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["modecotd_queue_requests"] == 0 and values["modecotd_running_requests"] == 0
    assert values["modecotd_tokens_per_second"] > 0  # five tokens within the window
    assert values["modecotd_generated_tokens_total"] >= 5 and values['modecotd_requests_total{outcome="done"}'] >= 1
    assert values["modecotd_batch_size"] == 8


def test_request_texts_are_logged_only_when_asked(srv, caplog):
    caplog.set_level("INFO", logger="modecotd_engine.engine.serve_api")
    r = srv.client.completions.create(model="add", prompt="private words", max_tokens=3)
    srv.wait_until(lambda: any(f"cmpl-{ticket_id(r.id)} " in m for m in caplog.messages))
    assert not any("private words" in m for m in caplog.messages)
    srv.server.log_requests = True
    try:
        r = srv.client.completions.create(model="add", prompt="loud words", max_tokens=3)
        srv.wait_until(lambda: any("loud words" in m for m in caplog.messages))
    finally:
        srv.server.log_requests = False


# -------------------------------------------------------------------------------------- the command


def test_serve_command_runs_and_stops(student_dir, bank_root):
    """`modecotd-engine serve` as a process: it answers, logs no request text, and stops on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "modecotd_engine.cli.main", "serve", "--bank", str(bank_root / "bank"),
           "--student", str(student_dir), "--port", str(port), *FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if json.loads(get_text(f"http://127.0.0.1:{port}/health"))["status"] == "ok":
                    break
            except OSError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=WAIT_S)
        assert [m.id for m in client.models.list().data] == ["base", *EXPERTS]
        assert client.completions.create(model="add", prompt="secret prompt", max_tokens=3).usage.completion_tokens == 3
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode in (0, -signal.SIGTERM), err  # uvicorn re-raises SIGTERM after its clean shutdown
    assert "Finished server process" in err
    assert "serving base, 3 experts and 0 mixtures" in err and "cmpl-0 model=add prompt_tokens=13 n=1 -> done" in err
    assert "secret prompt" not in err


# ------------------------------------------------------------------------------------ the loop alone


def test_loop_caps_a_request_timeout_and_refuses_oversized_requests(student_dir, bank_root):
    from modecotd_engine.cli.serve import build_server
    from modecotd_engine.engine.generate import GenerationError
    from modecotd_engine.engine.serve_loop import LoopClosed, ServeRequest

    server = build_server(serve_args(student_dir, bank_root, "--batch-size", "4", "--request-timeout", "5"))
    loop = server.loop
    sel = server.table.resolve("add", None, None).selection
    with pytest.raises(LoopClosed):
        loop.submit(ServeRequest([5, 6], sel, server.config), print)
    loop.start()
    try:
        with pytest.raises(GenerationError, match="do not fit the batch"):
            loop.submit(ServeRequest([5, 6], sel, server.config, n=5), print)
        with pytest.raises(GenerationError, match="fill the model context"):
            loop.submit(ServeRequest([5] * loop.context, sel, server.config), print)
        events = []
        ticket = loop.submit(ServeRequest([5, 6], sel, server.config, timeout_s=1e9), events.append)
        assert ticket.deadline - ticket.submitted_at == pytest.approx(5, abs=0.1)
        deadline = time.monotonic() + WAIT_S
        while not ticket.ended:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert ticket.state == "done" and events[-1].num_tokens == server.config.max_new_tokens
    finally:
        loop.stop(WAIT_S)
    assert not loop.alive


# ------------------------------------------------------------------------------------ the benchmark


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_merged_adapter_loop_merges_the_update_the_kernel_adds(student_dir, mode):
    """The merged-adapter baseline's weights give the logits of the injected experts under the same
    gate row (float32), for an expert and a mixture, and switching back restores the student."""
    from modecotd_engine.bench.common import random_bank
    from modecotd_engine.bench.serve import MergedAdapterLoop
    from modecotd_engine.engine.generate import GenerationConfig
    from modecotd_engine.engine.inject import inject_experts
    from modecotd_engine.engine.selection import Selection
    from modecotd_engine.engine.student import load_student

    injected = load_student(str(student_dir), dtype="float32", device="cpu")
    plain = load_student(str(student_dir), dtype="float32", device="cpu")
    bank = random_bank(injected.model, ["a", "b", "c"])
    handle = inject_experts(injected.model, bank, mode=mode)
    loop = MergedAdapterLoop(plain.model, plain.tokenizer, bank, GenerationConfig())
    ids = torch.randint(0, plain.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = plain.model(ids).logits
        for gate in (torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.6, 0.0, -0.4])):
            loop._switch(Selection(gate, mode, "x"))
            handle.set_gates(gate.expand(2, 3))
            want = injected.model(ids).logits
            got = plain.model(ids).logits
            assert (want - base).abs().max() > 1e-3  # the experts change the logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        loop._switch(Selection(torch.zeros(3), mode, "base"))
        torch.testing.assert_close(plain.model(ids).logits, base, rtol=0, atol=0)
    assert loop.merges == 3 and loop.group_of(Selection(torch.zeros(3), mode, "base")) == ("merged", None, ())


def test_arrival_times_are_poisson():
    from modecotd_engine.bench.serve import arrival_times

    times = arrival_times(4000, rate=8.0, seed=0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and min(gaps) > 0
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 8, rel=0.05)  # exponential gaps of mean 1/rate
    assert arrival_times(10, 8.0, seed=0) == times[:10] and arrival_times(10, 8.0, seed=1) != times[:10]


def test_serve_bench_smoke(student_dir, tmp_path):
    """`bench serve` end to end on the tiny student: every request served with the offline loop's text."""
    from modecotd_engine.bench.serve import run_serve_bench

    rep = run_serve_bench(tmp_path / "bench", student=str(student_dir), requests=8, rate=100.0, new_tokens=6,
                          batch_size=4, experts=3, device="cpu", dtype="float32", threads=1)
    assert rep["greedy_text_agreement"] == 1.0 and rep["workload"]["mixtures"] == 4 and len(rep["rounds"]) == 2
    assert len(rep["providers"]) == 3 and rep["server_vs_merged"] > 0
    # 8 requests over 6 adapters (3 experts, 3 two-expert mixtures): each merged at least once a round
    assert all(r["merges"] >= 6 for r in rep["rounds"])
    assert rep["providers"]["merged-adapter server (Poisson arrivals)"]["tokens"] == 8 * 6
    for p in rep["providers"].values():
        assert p["tokens"] == 8 * 6 and p["tokens_per_s"] > 0 and p["ttft_p50_ms"] is not None
    assert rep["providers"]["server (Poisson arrivals)"]["tpot_p99_ms"] > 0
    saved = json.loads((tmp_path / "bench" / "serve.json").read_text())
    assert saved["device"] and saved["torch"] and saved["uvicorn"] and saved["date"]
    assert "| server (Poisson arrivals) |" in (tmp_path / "bench" / "serve.md").read_text()
