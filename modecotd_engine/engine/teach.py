"""Teacher rationales: a large model writes chain-of-thought for a task's questions; keep the right ones.

For every question the teacher is prompted zero-shot ("Q: {question}\\nA: Let's think step by step.",
or a template) for K samples at a temperature. A sample is kept when its final answer
(``answers.extract_answer``) matches the gold answer (``answers.answers_match``); samples with the same
normalized rationale are kept once. Each kept sample becomes one training record::

    {"input": "Infer the correct answer for the question.\\n\\nQ: <question>\\nA:",
     "output": "<rationale>\\n\\n-->\\n\\n<gold answer> END"}

Teachers:
    * ``LocalTeacher``: a Hugging Face causal LM directory (loaded by ``student.load_student``), batched
      ``generate`` with left padding; sampling at ``temperature`` (seeded), greedy at temperature 0.
    * ``HTTPTeacher``: an OpenAI-compatible endpoint (``/v1/chat/completions``, or ``/v1/completions``),
      standard library HTTP with bounded concurrency, a per-request timeout and retries with exponential
      backoff and jitter (honouring ``Retry-After``) on 429, 5xx, malformed JSON, timeouts and
      connection errors. 401/403/404 stop the run at once.

Output is append-only JSONL, flushed and fsync'ed once per question, beside two sidecars: ``<out>.done``
(one JSON line per finished question: its index and counts, after a header that pins the questions
file) and ``<out>.summary.json``. ``resume=True`` skips every question listed in ``<out>.done`` or whose
input already appears in the output, so an interrupted run continues without duplicating records.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import email.utils
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .atomic import atomic_write_text
from .answers import TASK_TYPES, answers_match, extract_answer, format_output, infer_task_type, split_output

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "Q: {question}\nA: Let's think step by step."
# The evaluation prompt of the MoDE-CoTD / Fine-tune-CoT data: "choice" wording for multiple-choice tasks,
# "answer" for everything else, as in the released files.
INPUT_TEMPLATE = "Infer the correct {kind} for the question.\n\nQ: {question}\nA:"
# Sampling temperature used when K > 1 and none is given (K = 1 defaults to greedy).
DEFAULT_SAMPLE_TEMPERATURE = 0.7
PROGRESS_FORMAT = "modecotd-teach-progress"
PROGRESS_VERSION = 1
# Failures listed one by one in the summary; the count is always exact.
MAX_LISTED_FAILURES = 50
# Cap on a server's Retry-After, so a misconfigured endpoint cannot park the run for hours.
MAX_RETRY_AFTER_S = 120.0
MAX_BACKOFF_S = 30.0

# "Infer the correct answer for the question.\n\nQ: ...\nA:" (optionally followed by the zero-shot trigger),
# and the strategy_qa style "<question>\n\n###\n\n".
_PROMPT_RE = re.compile(
    r"^\s*Infer the correct (?:answer|choice) for the question\.\s*(?:Q:\s*)?(?P<q>.*?)\s*\nA:"
    r"(?:\s*Let's think step by step\.)?\s*$",
    re.S,
)
_HASH_PROMPT_RE = re.compile(r"^(?P<q>.*?\S)\s*\n\n###\n\n$", re.S)
# A continuation that starts a new question ran past its own answer.
_NEXT_QUESTION_RE = re.compile(r"\n\s*Q:")
_TRAILING_END_RE = re.compile(r"(?<![A-Za-z])END\s*$")


class TeachError(RuntimeError):
    """A teach run cannot go on: bad input, or a teacher failure that retrying will not fix.

    ``summary`` holds the partial summary (already written to disk) when the run had started.
    """

    def __init__(self, message: str, summary: TeachSummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class TeacherError(TeachError):
    """The teacher refused the run (HTTP 401/403/404, a missing model): no question can succeed."""


class TeacherUnavailable(TeacherError):
    """The teacher endpoint stopped answering (connection refused or reset after every retry)."""


# ----------------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class Question:
    """One question of a task.

    Attributes:
        index: 0-based position in the questions file (the key of the progress file).
        question: the bare question text the teacher sees.
        input: the training input (the evaluation prompt), written as the record's ``input``.
        gold: the gold answer.
        where: ``"file:line N"`` or ``"file: record N"`` for messages.
    """

    index: int
    question: str
    input: str
    gold: str
    where: str


@dataclass(frozen=True)
class QuestionSet:
    """A task's questions, its name and its answer type (one of ``answers.TASK_TYPES``)."""

    path: Path
    task: str
    task_type: str
    questions: list[Question]
    sha256: str


def split_prompt(text: str) -> tuple[str, bool]:
    """``(question, is_prompt)``: the bare question inside an evaluation prompt, or the text itself."""
    for pattern in (_PROMPT_RE, _HASH_PROMPT_RE):
        m = pattern.match(text)
        if m is not None and m.group("q").strip():
            return m.group("q").strip(), True
    return text.strip(), False


def training_input(question: str, task_type: str) -> str:
    """The engine's prompt for a bare question (``"Infer the correct answer ...\\nQ: ...\\nA:"``)."""
    kind = "choice" if task_type == "choice" else "answer"
    return INPUT_TEMPLATE.format(kind=kind, question=question.strip())


def _gold_of(value: Any) -> str | None:
    """The gold answer of a record's output/answer field (a bare answer or a full training output)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    if not isinstance(value, str):
        return None
    parts = split_output(value)
    gold = parts[1] if parts is not None else _TRAILING_END_RE.sub("", value.strip())
    return gold.strip() or None


def load_questions(path: str | Path, *, task: str | None = None, task_type: str | None = None) -> QuestionSet:
    """Read a task's questions: a JSON list or JSONL of ``{"input", "output"}`` or ``{"question", "answer"}``.

    ``output`` may be the bare gold answer or a full training output (the answer after ``-->`` is used);
    ``input`` may be a bare question or an evaluation prompt (kept verbatim as the training input).

    Args:
        path: the questions file.
        task: task name; default the file stem.
        task_type: one of ``answers.TASK_TYPES``; default inferred from the name and the gold answers.

    Raises:
        TeachError: unreadable file, bad JSON, a record without a question or a gold answer (the
            message names the file and line), or an undecidable task type.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TeachError(f"cannot read questions file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TeachError(f"{path}: not UTF-8 text ({exc})") from None

    entries: list[tuple[str, Any]] = []  # (where, parsed record)
    # A .jsonl file is always one record a line; otherwise a leading "[" means one JSON list.
    if path.suffix != ".jsonl" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TeachError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise TeachError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        entries = [(f"{path}: record {i + 1}", rec) for i, rec in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise TeachError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not entries:
        raise TeachError(f"{path}: no questions")

    parsed: list[tuple[str, str, str | None, str]] = []  # (question, input or None, gold, where)
    for where, rec in entries:
        if not isinstance(rec, dict):
            raise TeachError(f"{where}: expected an object with 'input'/'output' or 'question'/'answer', "
                             f"got {type(rec).__name__}")
        if "input" in rec or "output" in rec:
            qkey, akey = "input", "output"
        elif "question" in rec or "answer" in rec:
            qkey, akey = "question", "answer"
        else:
            raise TeachError(f"{where}: expected keys 'input'/'output' or 'question'/'answer', "
                             f"found {sorted(rec)}")
        q = rec.get(qkey)
        if not isinstance(q, str) or not q.strip():
            raise TeachError(f"{where}: '{qkey}' must be a non-empty string")
        if akey not in rec:
            raise TeachError(f"{where}: missing '{akey}' (the gold answer)")
        gold = _gold_of(rec[akey])
        if gold is None:
            raise TeachError(f"{where}: '{akey}' must be a non-empty answer string or number, got {rec[akey]!r}")
        question, is_prompt = split_prompt(q)
        parsed.append((question, q if is_prompt else None, gold, where))

    name = task or path.name.split(".")[0]
    if task_type is not None:
        if task_type not in TASK_TYPES:
            raise TeachError(f"unknown task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")
        ttype = task_type
    else:
        try:
            ttype = infer_task_type(name, [g for _, _, g, _ in parsed])
        except ValueError as exc:
            raise TeachError(f"{path}: {exc}") from None

    questions = [
        Question(index=i, question=q, input=inp if inp is not None else training_input(q, ttype), gold=g, where=w)
        for i, (q, inp, g, w) in enumerate(parsed)
    ]
    return QuestionSet(path=path, task=name, task_type=ttype, questions=questions,
                       sha256=hashlib.sha256(raw).hexdigest())


def load_template(path: str | Path) -> str:
    """Read a prompt template (``str.format`` with ``{question}``) and check that it formats.

    Raises:
        TeachError: unreadable file, no ``{question}`` field, or other fields / stray braces.
    """
    path = Path(path)
    try:
        template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TeachError(f"cannot read template {path}: {exc}") from None
    check_template(template, where=str(path))
    return template


def check_template(template: str, where: str = "template") -> None:
    """Raise TeachError unless ``template.format(question=...)`` works and uses the question."""
    if "{question}" not in template:
        raise TeachError(f"{where}: the template must contain the field {{question}}")
    try:
        template.format(question="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise TeachError(f"{where}: the template does not format with only {{question}} ({exc!r}); "
                         "write literal braces as {{ and }}") from None


def clean_rationale(sample: str) -> str:
    """The rationale of a teacher sample: cut where a new question starts, drop a trailing answer marker.

    ``"... so 7.\\n\\n-->\\n\\n7 END"`` -> ``"... so 7."``. The answer sentence inside the reasoning stays.
    """
    text = _NEXT_QUESTION_RE.split(sample, maxsplit=1)[0]
    parts = split_output(text)
    if parts is not None:
        text = parts[0]
    return _TRAILING_END_RE.sub("", text.strip()).strip()


def _normalize_rationale(text: str) -> str:
    return " ".join(text.split()).lower()


# ----------------------------------------------------------------------------------------------------
# Teachers


@dataclass(frozen=True)
class SampleConfig:
    """How to sample: ``samples`` per question at ``temperature`` (0 = greedy), at most ``max_new_tokens``."""

    samples: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 256
    seed: int | None = 0


@dataclass
class Completion:
    """The teacher's answer to one question: its samples, or why there are none."""

    index: int
    texts: list[str] | None
    error: str | None = None


class Teacher(Protocol):
    """Anything that writes ``config.samples`` completions per prompt.

    ``complete`` yields one ``Completion`` per job, in any order, as they finish. A per-question failure
    is a Completion with ``error``; a failure no question can survive raises ``TeacherError``.
    """

    description: str

    def complete(self, jobs: Sequence[tuple[int, str]], config: SampleConfig) -> Iterator[Completion]: ...

    def stats(self) -> dict[str, Any]: ...


class _Retryable(Exception):
    """One attempt failed in a way a later attempt may not (429, 5xx, timeout, bad JSON, lost connection)."""

    def __init__(self, message: str, retry_after: float | None = None, connection: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.connection = connection


class _QuestionFailed(Exception):
    """This question cannot be answered (retries exhausted, or a 4xx that names the request)."""


class _Stopped(Exception):
    """The run is ending (another request hit a fatal error, or the consumer left): drop this question."""


def _redact_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=host)
    return urllib.parse.urlunsplit(parts._replace(query="", fragment=""))


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HTTPTeacher:
    """An OpenAI-compatible endpoint (vLLM, llama.cpp server, TGI, OpenAI, ...).

    Args:
        url: the API base (``http://127.0.0.1:8000/v1``) or a full ``.../chat/completions`` /
            ``.../completions`` URL.
        model: the model name sent in each request; None asks ``<base>/models`` for the first one.
        api_key: sent as ``Authorization: Bearer <key>``; never logged nor written.
        completions: use ``/completions`` (text continuation) instead of ``/chat/completions``.
        concurrency: requests in flight at once.
        timeout: socket timeout of one request, in seconds (connect, and each read).
        retries: further attempts after a failed one (429, 5xx, timeout, bad JSON, lost connection).
        backoff: first backoff delay in seconds; doubles per attempt (capped at 30 s), plus up to 25 %
            jitter; a server's ``Retry-After`` is honoured when it asks for longer.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        completions: bool = False,
        concurrency: int = 8,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 1.0,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise TeachError(f"teacher URL {_redact_url(url)!r} is not an http(s) URL")
        if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
            raise TeachError("concurrency must be >= 1, retries >= 0, timeout > 0 and backoff >= 0")
        path = parts.path.rstrip("/")
        for suffix in ("/chat/completions", "/completions"):
            if path.endswith(suffix):
                path = path[: -len(suffix)]
                completions = suffix == "/completions"
                break
        if not path:
            path = "/v1"
        base = urllib.parse.urlunsplit(parts._replace(path=path, query="", fragment=""))
        self.base_url = base
        self.endpoint = base + ("/completions" if completions else "/chat/completions")
        self.completions = completions
        self.concurrency = concurrency
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self._api_key = api_key or None
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"
        # Environment proxies are for remote endpoints; a local server must be reached directly.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parts.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rng = random.Random()
        self._stats: Counter[str] = Counter()
        self.model = model or self._discover_model()
        self.description = f"{_redact_url(self.endpoint)} (model {self.model})"

    # -- plumbing ------------------------------------------------------------------------------------

    def _safe(self, text: str) -> str:
        """Never let the key reach a message, even when a server echoes the request."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def stats(self) -> dict[str, Any]:
        """Request counters: requests, retries, and failures by kind."""
        with self._lock:
            return dict(self._stats)

    def _request(self, url: str, payload: dict[str, Any] | None) -> bytes:
        """One HTTP exchange; returns the body of a 2xx answer or raises _Retryable / TeacherError /
        _QuestionFailed."""
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(url, data=data, headers=self._headers, method="GET" if data is None else "POST")
        self._count("requests")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                body = exc.read(2000).decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 - the body is only decoration for the message
                body = ""
            snippet = self._safe(" ".join(body.split())[:300])
            where = f"{_redact_url(url)} answered HTTP {status}"
            if status in (401, 403):
                raise TeacherError(f"{where} ({exc.reason}): the endpoint refused the credentials; "
                                   f"check --api-key-env. {snippet}".rstrip()) from None
            if status == 404:
                raise TeacherError(f"{where} (not found): check the URL, --model and --completions. "
                                   f"{snippet}".rstrip()) from None
            if status in (408, 409, 425, 429) or status >= 500:
                raise _Retryable(f"{where} {snippet}".rstrip(),
                                 retry_after=_parse_retry_after(exc.headers.get("Retry-After"))) from None
            raise _QuestionFailed(f"{where}: {snippet}".rstrip()) from None
        except (TimeoutError, socket.timeout) as exc:
            raise _Retryable(f"{_redact_url(url)} timed out after {self.timeout:g} s ({exc})") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"{_redact_url(url)} timed out after {self.timeout:g} s") from None
            raise _Retryable(f"cannot reach {_redact_url(url)}: {reason}", connection=True) from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            # RemoteDisconnected, reset, IncompleteRead, BadStatusLine: the server went away mid-answer.
            raise _Retryable(f"connection to {_redact_url(url)} lost: {exc!r}", connection=True) from None

    def _with_retries(self, url: str, payload: dict[str, Any] | None, parse) -> Any:
        """``parse(body)`` of the first good answer; backs off between attempts."""
        attempt = 0
        while True:
            try:
                body = self._request(url, payload)
                try:
                    return parse(body)
                except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
                    self._count("malformed")
                    raise _Retryable(f"{_redact_url(url)} sent a malformed response ({exc})") from None
            except _Retryable as exc:
                if attempt >= self.retries or self._stop.is_set():
                    if exc.connection:
                        raise TeacherUnavailable(
                            f"teacher {_redact_url(url)} is unreachable after {attempt + 1} attempts: {exc}"
                        ) from None
                    raise _QuestionFailed(f"{exc} (gave up after {attempt + 1} attempts)") from None
                delay = min(MAX_BACKOFF_S, self.backoff * 2**attempt)
                with self._lock:
                    delay += self._rng.uniform(0.0, 0.25 * delay)
                if exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, MAX_RETRY_AFTER_S))
                attempt += 1
                self._count("retries")
                log.info("retry %d/%d in %.2f s: %s", attempt, self.retries, delay, exc)
                if self._stop.wait(delay):
                    raise _Stopped() from None

    def _discover_model(self) -> str:
        def parse(body: bytes) -> str:
            data = json.loads(body)
            return str(data["data"][0]["id"])

        try:
            return self._with_retries(self.base_url + "/models", None, parse)
        except _QuestionFailed as exc:
            raise TeacherError(f"no --model given and {_redact_url(self.base_url)}/models did not list one: "
                               f"{exc}") from None
        except TeacherError as exc:
            raise TeacherError(f"no --model given and listing models failed: {exc}") from None

    # -- sampling ------------------------------------------------------------------------------------

    def _payload(self, prompt: str, n: int, config: SampleConfig, seed: int | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "n": n,
        }
        if self.completions:
            payload["prompt"] = prompt
            payload["stop"] = ["\nQ:"]  # a continuation would otherwise invent the next question
        else:
            payload["messages"] = [{"role": "user", "content": prompt}]
        if seed is not None:
            payload["seed"] = seed
        return payload

    def _parse_choices(self, body: bytes) -> list[str]:
        data = json.loads(body)
        choices = data["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError("no choices")
        texts = []
        for choice in choices:
            if self.completions:
                text = choice["text"]
            else:
                text = choice["message"]["content"]
                if isinstance(text, list):  # content parts
                    text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
                text = "" if text is None else text
            if not isinstance(text, str):
                raise TypeError(f"completion text is {type(text).__name__}")
            texts.append(text)
        return texts

    def _sample(self, index: int, prompt: str, config: SampleConfig) -> Completion:
        try:
            return self._sample_unguarded(index, prompt, config)
        except TeacherError:
            # Queued questions must not reach the server once it has refused the run.
            self._stop.set()
            raise

    def _sample_unguarded(self, index: int, prompt: str, config: SampleConfig) -> Completion:
        texts: list[str] = []
        # Servers that ignore ``n`` answer with one choice; ask again for the rest, at most K requests.
        for request_no in range(config.samples):
            if len(texts) >= config.samples:
                break
            if self._stop.is_set():
                raise _Stopped()
            seed = None if config.seed is None else config.seed + request_no
            payload = self._payload(prompt, config.samples - len(texts), config, seed)
            try:
                texts.extend(self._with_retries(self.endpoint, payload, self._parse_choices))
            except _QuestionFailed as exc:
                self._count("failed_questions")
                return Completion(index, None, self._safe(str(exc)))
        return Completion(index, texts[: config.samples])

    def complete(self, jobs: Sequence[tuple[int, str]], config: SampleConfig) -> Iterator[Completion]:
        """Sample every job with ``concurrency`` requests in flight; yields as questions finish."""
        self._stop.clear()
        pool = cf.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="teach-http")
        try:
            futures = [pool.submit(self._sample, index, prompt, config) for index, prompt in jobs]
            for future in cf.as_completed(futures):
                try:
                    result = future.result()  # TeacherError propagates and ends the run
                except _Stopped:
                    continue
                yield result
        finally:
            # Stop the workers' backoff sleeps and drop queued questions; in-flight requests end on
            # their own timeout.
            self._stop.set()
            pool.shutdown(wait=False, cancel_futures=True)


class LocalTeacher:
    """A local Hugging Face causal LM as teacher (loaded through ``student.load_student``).

    Args:
        source: a model directory, None for the built-in student, or an already loaded ``Student``.
        batch_size: questions per ``generate`` call (each expands to K sequences when sampling).
        chat: apply the tokenizer's chat template to the prompt; None = when the tokenizer has one.
        dtype, device: passed to ``load_student``.
    """

    def __init__(
        self,
        source: str | Path | None | Any = None,
        *,
        batch_size: int = 8,
        chat: bool | None = None,
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        if batch_size < 1:
            raise TeachError("batch_size must be >= 1")
        if source is not None and hasattr(source, "model") and hasattr(source, "tokenizer"):
            student = source
        else:
            from .student import StudentError, load_student

            try:
                student = load_student(source, dtype=dtype, device=device)
            except StudentError as exc:
                raise TeachError(f"cannot load the teacher model: {exc}") from None
        self.model = student.model
        self.tokenizer = student.tokenizer
        self.batch_size = batch_size
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat and not has_template:
            raise TeachError("the teacher's tokenizer has no chat template; use plain text prompts")
        self.chat = has_template if chat is None else chat
        name = getattr(student, "path", None) or getattr(self.model.config, "_name_or_path", "") or "local model"
        self.description = f"local {name}"
        self._stats: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def _render(self, prompt: str) -> str:
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    def complete(self, jobs: Sequence[tuple[int, str]], config: SampleConfig) -> Iterator[Completion]:
        """Batched generation; yields every question of a batch once the batch is done."""
        import torch
        from transformers import GenerationConfig

        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad_id is None:
            raise TeachError("the teacher's tokenizer has neither a pad nor an eos token")
        do_sample = config.temperature > 0
        # Greedy decoding gives one answer; K copies of it would only be removed as duplicates.
        n = config.samples if do_sample else 1
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=config.max_new_tokens,
            do_sample=do_sample,
            num_return_sequences=n,
            pad_token_id=pad_id,
            eos_token_id=tok.eos_token_id,
        )
        if do_sample:
            # Pure temperature sampling: no top-k / top-p truncation unless a template asks for it.
            gen_kwargs.update(temperature=config.temperature, top_k=0, top_p=1.0)
        gen_config = GenerationConfig(**gen_kwargs)

        rendered = [(index, self._render(prompt)) for index, prompt in jobs]
        # Similar lengths share a batch, so left padding wastes little.
        rendered.sort(key=lambda item: len(item[1]))
        device = next(self.model.parameters()).device
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            for start in range(0, len(rendered), self.batch_size):
                batch = rendered[start : start + self.batch_size]
                enc = tok([text for _, text in batch], return_tensors="pt", padding=True,
                          add_special_tokens=not self.chat)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                if config.seed is not None:
                    # Seed per batch (by its first question) so a resumed run samples the same way.
                    torch.manual_seed(config.seed + batch[0][0])
                with torch.inference_mode():
                    out = self.model.generate(**enc, generation_config=gen_config)
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
                self._stats["generate_calls"] += 1
                self._stats["sequences"] += len(texts)
                for i, (index, _) in enumerate(batch):
                    yield Completion(index, texts[i * n : (i + 1) * n])
        finally:
            tok.padding_side = old_side


def make_teacher(
    spec: str | Path | None,
    *,
    model: str | None = None,
    api_key: str | None = None,
    completions: bool = False,
    concurrency: int = 8,
    timeout: float = 60.0,
    retries: int = 4,
    batch_size: int = 8,
    dtype: Any = None,
    device: Any = None,
) -> Teacher:
    """An ``HTTPTeacher`` for an http(s) URL, a ``LocalTeacher`` for a directory, or for None / "builtin"
    the built-in student. ``completions`` means plain-text prompts (``/completions``; no chat template)."""
    if spec is not None and str(spec).startswith(("http://", "https://")):
        return HTTPTeacher(str(spec), model=model, api_key=api_key, completions=completions,
                           concurrency=concurrency, timeout=timeout, retries=retries)
    if spec is None or str(spec) == "builtin":
        return LocalTeacher(None, batch_size=batch_size, chat=False if completions else None,
                            dtype=dtype, device=device)
    path = Path(spec)
    if not path.is_dir():
        raise TeachError(f"teacher {str(spec)!r} is neither an http(s) URL nor a model directory")
    return LocalTeacher(path, batch_size=batch_size, chat=False if completions else None, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------
# The run


@dataclass
class TeachSummary:
    """What a teach run produced for one task (counts cover every run of a resumed output).

    ``asked``: questions put to the teacher (finished + failed); ``answered``: questions where some
    sample had an extractable final answer; ``kept``: questions with at least one kept rationale;
    ``records``: rationales written; ``kept_rate`` = kept / asked.
    """

    task: str
    task_type: str
    questions_file: str
    out: str
    teacher: str
    questions: int
    asked: int = 0
    answered: int = 0
    kept: int = 0
    kept_rate: float = 0.0
    records: int = 0
    samples: int = 0
    duplicates: int = 0
    failed: int = 0
    remaining: int = 0
    complete: bool = False
    aborted: str | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    teacher_stats: dict[str, Any] = field(default_factory=dict)
    samples_per_question: int = 1
    temperature: float = 0.0
    max_new_tokens: int = 256
    seed: int | None = 0
    wall_s: float = 0.0

    def line(self) -> str:
        """A one-line report."""
        text = (f"{self.task} ({self.task_type}): asked {self.asked}, answered {self.answered}, kept {self.kept} "
                f"({100 * self.kept_rate:.1f}%), records {self.records}, duplicates {self.duplicates}, "
                f"failed {self.failed}, remaining {self.remaining}; {self.wall_s:.1f} s")
        return text + (f" [stopped: {self.aborted}]" if self.aborted else "")


def progress_path(out: str | Path) -> Path:
    """``<out>.done``: the finished-question list beside an output file."""
    out = Path(out)
    return out.with_name(out.name + ".done")


def summary_path(out: str | Path) -> Path:
    """``<out>.summary.json``."""
    out = Path(out)
    return out.with_name(out.name + ".summary.json")


def _append_durable(f, text: str) -> None:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def _drop_partial_tail(path: Path) -> None:
    """Cut a last line without its newline (the run died while writing it)."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        cut = data.rfind(b"\n") + 1
        log.warning("%s: dropping an unfinished last line (%d bytes)", path, size - cut)
        f.truncate(cut)


def _read_output_inputs(out: Path) -> Counter[str]:
    """How many records each training input has in an existing output."""
    _drop_partial_tail(out)
    counts: Counter[str] = Counter()
    with open(out, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                counts[rec["input"]] += 1
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TeachError(
                    f"{out}:{lineno}: not a training record ({exc!r}); cannot resume this output"
                ) from None
    return counts


def _read_progress(path: Path, qset: QuestionSet) -> dict[int, dict[str, Any]]:
    """Finished questions from ``<out>.done`` (index -> counts)."""
    _drop_partial_tail(path)
    done: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    for lineno, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TeachError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if rec.get("format") == PROGRESS_FORMAT:
            if rec.get("questions_sha256") != qset.sha256:
                raise TeachError(
                    f"{path} was written for a different questions file than {qset.path} (its content "
                    "changed); write to a new --out, or delete the output and its sidecars to start over"
                )
            continue
        index = rec.get("index")
        if not isinstance(index, int) or not 0 <= index < len(qset.questions):
            raise TeachError(f"{path}:{lineno}: question index {index!r} is not in {qset.path} "
                             f"({len(qset.questions)} questions)")
        done[index] = rec
    return done


def teach(
    questions: str | Path,
    out: str | Path,
    teacher: Teacher,
    *,
    samples: int = 1,
    temperature: float | None = None,
    max_new_tokens: int = 256,
    template: str | None = None,
    resume: bool = False,
    task: str | None = None,
    task_type: str | None = None,
    seed: int | None = 0,
    progress: bool = True,
) -> TeachSummary:
    """Have ``teacher`` write rationales for a task's questions; write the right ones as training records.

    Args:
        questions: the questions file (see ``load_questions``).
        out: the output JSONL of ``{"input", "output"}`` training records (appended per question).
        teacher: an ``HTTPTeacher``, a ``LocalTeacher`` or anything following the ``Teacher`` protocol.
        samples: K, completions asked per question.
        temperature: sampling temperature; None = 0 (greedy) for K = 1, else 0.7.
        max_new_tokens: the longest rationale, in tokens.
        template: prompt template with ``{question}``; default zero-shot chain of thought.
        resume: continue an existing output, skipping finished questions; without it an existing
            output is an error.
        task, task_type: override the task name (file stem) and its inferred answer type.
        seed: sampling seed (None: unseeded).
        progress: show a progress bar on stderr.

    Returns:
        The run's ``TeachSummary``, also written to ``<out>.summary.json``. Questions whose teacher
        requests failed are listed there (``failed``) and are retried by a later ``resume`` run.

    Raises:
        TeachError: bad input, an existing output without ``resume``; ``TeacherError`` when the teacher
            refuses the run or becomes unreachable (``.summary`` holds the partial summary, written too).
    """
    if samples < 1:
        raise TeachError(f"samples must be >= 1, got {samples}")
    if max_new_tokens < 1:
        raise TeachError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature is None:
        temperature = 0.0 if samples == 1 else DEFAULT_SAMPLE_TEMPERATURE
    if temperature < 0:
        raise TeachError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and samples > 1:
        log.warning("temperature 0 is greedy: the %d samples per question will collapse to one", samples)
    template = DEFAULT_TEMPLATE if template is None else template
    check_template(template)

    qset = load_questions(questions, task=task, task_type=task_type)
    out = Path(out)
    done_file, summary_file = progress_path(out), summary_path(out)
    t0 = time.perf_counter()

    done: dict[int, dict[str, Any]] = {}
    if out.exists() and not resume:
        raise TeachError(f"{out} already exists; pass --resume to continue it, or choose another --out")
    fresh = not out.exists()
    if not fresh:
        if done_file.exists():
            done = _read_progress(done_file, qset)
        # Records written just before a crash that missed the progress file still count as done.
        have = _read_output_inputs(out)
        recovered = [q for q in qset.questions if q.index not in done and have.get(q.input)]
        for q in recovered:
            done[q.index] = {"index": q.index, "samples": have[q.input], "unique": have[q.input],
                             "answered": True, "kept": have[q.input], "recovered": True}
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
        recovered = []
    if fresh or not done_file.exists():
        # A progress file without its output is stale: start it over with the header.
        header = {"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, "questions": str(qset.path),
                  "questions_sha256": qset.sha256, "task": qset.task, "task_type": qset.task_type}
        with open(done_file, "w", encoding="utf-8") as f:
            _append_durable(f, json.dumps(header) + "\n")

    config = SampleConfig(samples=samples, temperature=float(temperature), max_new_tokens=max_new_tokens, seed=seed)
    summary = TeachSummary(
        task=qset.task, task_type=qset.task_type, questions_file=str(qset.path), out=str(out),
        teacher=teacher.description, questions=len(qset.questions), samples_per_question=samples,
        temperature=float(temperature), max_new_tokens=max_new_tokens, seed=seed,
    )
    by_index = {q.index: q for q in qset.questions}
    pending = [q for q in qset.questions if q.index not in done]
    jobs = [(q.index, template.format(question=q.question)) for q in pending]
    failures: dict[int, str] = {}
    kept_questions = sum(1 for s in done.values() if s.get("kept"))
    if done:
        log.info("resuming %s: %d of %d questions already done", out, len(done), len(qset.questions))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(qset.questions), initial=len(done), desc=f"teach {qset.task}", unit="q",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    error: BaseException | None = None
    try:
        with open(out, "a", encoding="utf-8") as fout, open(done_file, "a", encoding="utf-8") as fdone:
            for q in recovered:
                _append_durable(fdone, json.dumps(done[q.index]) + "\n")
            if jobs:
                stream = teacher.complete(jobs, config)
                with contextlib.closing(stream):
                    for comp in stream:
                        q = by_index[comp.index]
                        if comp.texts is None:
                            failures[q.index] = comp.error or "no completion"
                            log.warning("question %d (%s) failed: %s", q.index, q.where, comp.error)
                        else:
                            records, stats = _filter(q, comp.texts, qset.task_type)
                            if records:
                                _append_durable(fout, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                              for r in records))
                            _append_durable(fdone, json.dumps(stats) + "\n")
                            done[q.index] = stats
                            kept_questions += bool(stats["kept"])
                        bar.update(1)
                        bar.set_postfix(kept=kept_questions, failed=len(failures), refresh=False)
    except BaseException as exc:  # noqa: BLE001 - the summary is written for any ending, then re-raised
        error = exc
    finally:
        bar.close()

    summary.asked = len(done) + len(failures)
    summary.answered = sum(1 for s in done.values() if s.get("answered"))
    summary.kept = sum(1 for s in done.values() if s.get("kept"))
    summary.records = sum(int(s.get("kept", 0)) for s in done.values())
    summary.samples = sum(int(s.get("samples", 0)) for s in done.values())
    summary.duplicates = sum(int(s.get("samples", 0)) - int(s.get("unique", 0)) for s in done.values())
    summary.kept_rate = summary.kept / summary.asked if summary.asked else 0.0
    summary.failed = len(failures)
    summary.failures = [{"index": i, "where": by_index[i].where, "error": e}
                        for i, e in sorted(failures.items())[:MAX_LISTED_FAILURES]]
    summary.remaining = len(qset.questions) - len(done)
    summary.complete = summary.remaining == 0
    summary.teacher_stats = teacher.stats()
    summary.wall_s = time.perf_counter() - t0
    if error is not None:
        summary.aborted = "interrupted" if isinstance(error, KeyboardInterrupt) else (
            str(error) if isinstance(error, TeachError) else f"{type(error).__name__}: {error}")
    atomic_write_text(summary_file, json.dumps(asdict(summary), indent=2, ensure_ascii=False) + "\n")
    log.info("teach %s", summary.line())
    if isinstance(error, TeacherError):
        error.summary = summary
        raise error
    if error is not None:
        raise error
    return summary


def _filter(q: Question, texts: Sequence[str], task_type: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Training records of the right, distinct samples of one question, and its progress line."""
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    answered = False
    unique = 0
    for text in texts:
        # Lone surrogates (from a server's JSON escapes) cannot be written as UTF-8.
        text = text.encode("utf-8", "replace").decode("utf-8")
        # The answer is read from the sample as cut where it starts a new question, so numbers of an
        # invented follow-up do not count.
        sample = _NEXT_QUESTION_RE.split(text, maxsplit=1)[0]
        rationale = clean_rationale(sample)
        key = _normalize_rationale(rationale)
        if key in seen:
            continue
        seen.add(key)
        unique += 1
        pred = extract_answer(sample, task_type)
        answered |= pred is not None
        if rationale and answers_match(pred, q.gold, task_type):
            records.append({"input": q.input, "output": format_output(rationale, q.gold)})
    stats = {"index": q.index, "samples": len(texts), "unique": unique, "answered": answered, "kept": len(records)}
    return records, stats
