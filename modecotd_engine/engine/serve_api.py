"""OpenAI-compatible HTTP API over the serving loop (FastAPI; run it with uvicorn).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
answers with server-sent events in OpenAI's chunk format, then ``data: [DONE]``), ``GET /health`` and
``GET /metrics`` (Prometheus text). ``model`` names ``base`` (the frozen student), an expert of the
bank, a mixture file of the mixtures directory (by its file stem), or an inline expert spec
``a=0.7,b=0.3`` (the grammar of ``infer --experts``).

Extensions beside OpenAI's fields: ``mode`` (composition, "output" or "weight"), ``weights``
(``{"expert": weight}``, the request's gate in place of the model's), ``vote`` (the majority answer
over the ``n`` samples, extracted as ``eval`` does), ``task_type`` (how to extract it) and ``timeout``
(seconds, at most the server's).

Errors are JSON in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with 4xx for
what the client can fix (unknown model 404, bad field 400, full queue 429 with ``Retry-After``,
timeout 408) and 5xx for the server's own failures. Request texts are logged only when asked.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .answers import TASK_TYPES, extract_answer, infer_task_type
from .data import encode_prompt, format_prompt
from .evaluate import majority_vote
from .experts import ExpertBank
from .generate import GenerationConfig
from .mixture import ROUTER_SUFFIX, load_mixture
from .selection import GenerationError, Selection, frozen_selection, mixture_selection, parse_expert_spec
from .serve_loop import Done, Failed, LoopClosed, Piece, QueueFull, ServeLoop, ServeRequest, Ticket

log = logging.getLogger(__name__)

BASE_MODEL = "base"
# A non-streaming request checks this often (seconds) whether its client is still connected.
DISCONNECT_POLL_S = 0.5
# OpenAI fields this server does not implement: refused when set to anything but their neutral value.
_UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
                "logit_bias": (None, {}), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
                "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with HTTP ``status`` (and optional headers)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------- models


@dataclass
class ModelEntry:
    """One servable model id: what it runs with and how ``/v1/models`` shows it."""

    id: str
    kind: str  # "base", "expert" or "mixture"
    selection: Selection
    task: str | None = None  # the task name its answers are extracted for (vote)
    info: dict = field(default_factory=dict)


class ModelTable:
    """The model ids a server answers to: ``base``, the bank's experts and the mixture files.

    Args:
        bank: the expert bank (injected into the student).
        bank_dir: its directory (mixtures are checked against it), None for a bank made in memory.
        mixtures_dir: directory of mixture files (``modecotd-engine mix`` output), or None.
        mode: the composition that overrides every default (``serve --mode``), or None: a mixture's
            own mode, else output.

    Raises:
        ValueError: a mixture file that does not fit the bank, or whose name is taken.
    """

    def __init__(self, bank: ExpertBank, bank_dir: str | Path | None = None, mixtures_dir: str | Path | None = None,
                 mode: str | None = None):
        self.bank, self.bank_dir, self.mode = bank, None if bank_dir is None else str(bank_dir), mode
        self.entries: dict[str, ModelEntry] = {BASE_MODEL: ModelEntry(BASE_MODEL, "base", self._frozen())}
        for name in bank.names:
            self._add(ModelEntry(name, "expert", Selection(bank.weights_vector(name), mode or "output", name), task=name))
        if mixtures_dir is not None:
            for path in mixture_files(mixtures_dir):
                sel = mixture_selection(str(path), bank, self.bank_dir, mode)
                m = load_mixture(path)
                info = {"mode": sel.mode, "method": m.method, "target": m.target, "weights": dict(m.weights)}
                self._add(ModelEntry(path.name[: -len(".json")], "mixture", sel, task=m.target, info=info))

    def _frozen(self) -> Selection:
        sel = frozen_selection(self.bank)
        return replace(sel, mode=self.mode or sel.mode)

    def _add(self, entry: ModelEntry) -> None:
        if entry.id in self.entries:
            raise ValueError(f"model id {entry.id!r} is taken twice (an expert, a mixture file or 'base')")
        self.entries[entry.id] = entry

    def listing(self, created: int, root: str) -> list[dict]:
        """The ``/v1/models`` data: every id with its parent (``base`` for experts and mixtures)."""
        out = []
        for e in self.entries.values():
            out.append({"id": e.id, "object": "model", "created": created, "owned_by": "modecotd-engine",
                        "root": root if e.kind == "base" else e.id, "parent": None if e.kind == "base" else BASE_MODEL,
                        "kind": e.kind, **e.info})
        return out

    def resolve(self, model: str, mode: str | None, weights: dict | None) -> ModelEntry:
        """The entry ``model`` names (an id or an inline spec), with the request's mode and weights.

        Raises:
            ApiError: 404 for an unknown model, 400 for a bad spec, mode or weights.
        """
        entry = self.entries.get(model)
        if entry is None:
            if "," not in model and "=" not in model:
                raise ApiError(404, f"model {model!r} does not exist; GET /v1/models lists the served ids "
                               "(base, experts, mixtures), or give an expert spec like 'a=0.7,b=0.3'",
                               param="model", code="model_not_found")
            try:
                gate = parse_expert_spec(model, self.bank)
            except ValueError as exc:
                raise ApiError(400, f"model {model!r}: {exc}", param="model", code="invalid_expert_spec") from None
            entry = ModelEntry(model, "spec", Selection(gate, self.mode or "output", model))
        sel = entry.selection
        if weights is not None:
            if sel.router is not None:
                raise ApiError(400, f"model {model!r} is a router mixture; its gates come from the router, "
                               "not from 'weights'", param="weights")
            sel = replace(sel, gate=self._weights(weights))
        if mode is not None:
            sel = replace(sel, mode=mode)
        return replace(entry, selection=sel)

    def _weights(self, weights) -> torch.Tensor:
        if not isinstance(weights, dict) or not weights:
            raise ApiError(400, "'weights' must be a non-empty object {expert: weight}", param="weights")
        for name, w in weights.items():
            if name not in self.bank.names:
                raise ApiError(400, f"'weights' names unknown expert {name!r}; known experts: "
                               f"{', '.join(self.bank.names)}", param="weights")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not float("-inf") < w < float("inf"):
                raise ApiError(400, f"'weights'[{name!r}] must be a finite number, got {w!r}", param="weights")
        return self.bank.weights_vector({k: float(v) for k, v in weights.items()})


def mixture_files(directory: str | Path) -> list[Path]:
    """The mixture JSON files of ``directory`` (router tensor files beside them excluded), by name."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"mixtures directory not found: {d}")
    return sorted(p for p in d.glob("*.json") if not p.name.endswith(ROUTER_SUFFIX))


# ----------------------------------------------------------------------------- request fields


@dataclass
class Params:
    """The validated fields of a completion or chat request."""

    model: str
    prompt: str | None  # completions
    messages: list[dict] | None  # chat
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...] | None
    n: int
    stream: bool
    include_usage: bool
    mode: str | None
    weights: dict | None
    vote: bool
    task_type: str | None
    timeout: float | None


def _get(body: dict, name: str, kinds: tuple, default=None, what: str = ""):
    """``body[name]`` if present and not null, checked to be one of ``kinds`` (bool is not a number)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, "
                       f"got {type(value).__name__}", param=name)
    return value


def parse_params(body, *, chat: bool) -> Params:
    """Check the request body's fields and types (ranges are checked by ``GenerationConfig``)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for name, neutral in _UNSUPPORTED.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in neutral):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_field")
    model = _get(body, "model", (str,), what="a string")
    if not model:
        raise ApiError(400, "'model' is required: base, an expert, a mixture or an expert spec", param="model")
    n = _get(body, "n", (int,), 1, "an integer")
    if n < 1:
        raise ApiError(400, f"'n' must be >= 1, got {n}", param="n")
    best_of = _get(body, "best_of", (int,), n, "an integer")
    if best_of != n:
        raise ApiError(400, "'best_of' other than n is not supported by this server", param="best_of")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    elif stop is not None:
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    options = _get(body, "stream_options", (dict,), {}, "an object")
    mode = _get(body, "mode", (str,), None, "a string")
    if mode is not None and mode not in ("output", "weight"):
        raise ApiError(400, f"'mode' must be 'output' or 'weight', got {mode!r}", param="mode")
    task_type = _get(body, "task_type", (str,), None, "a string")
    if task_type is not None and task_type not in TASK_TYPES:
        raise ApiError(400, f"'task_type' must be one of {', '.join(TASK_TYPES)}, got {task_type!r}",
                       param="task_type")
    timeout = _get(body, "timeout", (int, float), None, "a number of seconds")
    if timeout is not None and not timeout > 0:
        raise ApiError(400, f"'timeout' must be > 0 seconds, got {timeout}", param="timeout")
    max_tokens = _get(body, "max_completion_tokens", (int,), None, "an integer") if chat else None
    max_tokens = max_tokens if max_tokens is not None else _get(body, "max_tokens", (int,), None, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be >= 1, got {max_tokens}", param="max_tokens")
    return Params(
        model=model, prompt=None if chat else _prompt(body), messages=_messages(body) if chat else None,
        max_tokens=max_tokens, temperature=_get(body, "temperature", (int, float), None, "a number"),
        top_p=_get(body, "top_p", (int, float), None, "a number"), seed=_get(body, "seed", (int,), None, "an integer"),
        stop=stop, n=n, stream=bool(_get(body, "stream", (bool,), False, "a boolean")),
        include_usage=bool(options.get("include_usage")), mode=mode, weights=body.get("weights"),
        vote=bool(_get(body, "vote", (bool,), False, "a boolean")), task_type=task_type, timeout=timeout)


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be one string (lists of prompts and token ids are not supported)",
                       param="prompt")
    if not prompt.strip():
        raise ApiError(400, "'prompt' is empty", param="prompt", code="empty_prompt")
    return prompt


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"].strip() for m in out):
        raise ApiError(400, "the messages are empty", param="messages", code="empty_prompt")
    return out


# ---------------------------------------------------------------------------------- the server


class Server:
    """What the routes share: the loop, the model table, the decoding defaults, a tokenizer for prompts.

    Prompts are formatted and encoded on the event loop's thread with a tokenizer of its own (the loop
    thread decodes with the other one), so the two never share a tokenizer object.
    """

    def __init__(self, loop: ServeLoop, table: ModelTable, tokenizer, config: GenerationConfig, *, root: str,
                 log_requests: bool = False):
        self.loop, self.table, self.config, self.root = loop, table, config, root
        self.tokenizer = copy.deepcopy(tokenizer)
        self.log_requests = log_requests
        self.created = int(time.time())

    def request(self, params: Params) -> tuple[ModelEntry, ServeRequest]:
        """The loop's request for ``params``: model resolved, prompt formatted and encoded, context checked."""
        entry = self.table.resolve(params.model, params.mode, params.weights)
        text = self._prompt_text(params)
        ids = encode_prompt(self.tokenizer, text)
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", param="prompt", code="empty_prompt")
        context = self.loop.context
        if context is not None:
            want = params.max_tokens if params.max_tokens is not None else 1
            if len(ids) + want > context:
                raise ApiError(400, f"the model's context is {context} tokens; the prompt has {len(ids)} and "
                               f"{want} more were asked for (max_tokens)", param="max_tokens",
                               code="context_length_exceeded")
        temperature = self.config.temperature if params.temperature is None else float(params.temperature)
        seed = params.seed if params.seed is not None else (self.config.seed if temperature == 0 else
                                                            secrets.randbits(62))
        try:
            config = replace(self.config,
                             max_new_tokens=self.config.max_new_tokens if params.max_tokens is None else params.max_tokens,
                             temperature=temperature, top_p=self.config.top_p if params.top_p is None else params.top_p,
                             seed=seed, stop_strings=self.config.stop_strings if params.stop is None else params.stop)
        except GenerationError as exc:
            raise ApiError(400, str(exc)) from None
        if params.n > self.config.batch_size:
            raise ApiError(400, f"'n' must be <= {self.config.batch_size} (the server's batch)", param="n")
        return entry, ServeRequest(ids, entry.selection, config, n=params.n, stream=params.stream,
                                   timeout_s=params.timeout)

    def _prompt_text(self, params: Params) -> str:
        """Completions: the prompt in the server's prompt format (as ``infer``); chat: the chat template."""
        try:
            if params.messages is None:
                return format_prompt(self.tokenizer, params.prompt, self.config.prompt_format)
            if not getattr(self.tokenizer, "chat_template", None):
                raise ApiError(400, "the student's tokenizer has no chat template; use /v1/completions",
                               param="messages")
            return self.tokenizer.apply_chat_template(params.messages, tokenize=False, add_generation_prompt=True)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - a template that rejects the messages is the client's to fix
            raise ApiError(400, f"cannot format the prompt: {exc}", param="messages") from None

    def task_type(self, params: Params, entry: ModelEntry) -> str:
        """How a vote extracts answers: ``task_type``, else from the model's task name."""
        if params.task_type is not None:
            return params.task_type
        try:
            return infer_task_type(entry.task or "")
        except ValueError:
            raise ApiError(400, f"'vote' needs 'task_type' (one of {', '.join(TASK_TYPES)}) for model "
                           f"{entry.id!r}: its task type is not known from its name", param="task_type") from None

    def submit(self, request: ServeRequest, on_event) -> Ticket:
        try:
            return self.loop.submit(request, on_event)
        except QueueFull as exc:
            raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        except GenerationError as exc:
            raise ApiError(400, str(exc)) from None
        except LoopClosed as exc:
            raise ApiError(503, str(exc), type="server_error", code="unavailable") from None


def _finish_reason(reason: str) -> str:
    """OpenAI's finish_reason: "length" for the token budget, "stop" for every other ending."""
    return "length" if reason == "length" else "stop"


def _failure(event: Failed) -> ApiError:
    if event.reason == "timeout":
        return ApiError(408, event.message, type="timeout_error", code="timeout")
    return ApiError(503 if event.reason == "shutdown" else 500, event.message, type="server_error", code=event.reason)


def _vote(done: dict[int, Done], task_type: str) -> dict:
    answers = [extract_answer(done[i].text, task_type) for i in sorted(done)]
    answer, votes = majority_vote(answers, task_type)
    return {"answer": answer, "votes": votes, "task_type": task_type, "answers": answers,
            "index": None if answer is None else answers.index(answer)}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_app(server: Server):
    """The FastAPI application of ``server`` (routes, OpenAI-shaped errors)."""
    app = FastAPI(title="modecotd-engine", summary="OpenAI-compatible serving of experts and weighted mixtures")
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        if not server.loop.alive:
            return JSONResponse({"status": "stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(server.loop.metrics()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": server.table.listing(server.created, server.root)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        for m in server.table.listing(server.created, server.root):
            if m["id"] == model_id:
                return m
        raise ApiError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")

    async def complete(request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
        params = parse_params(body, chat=chat)
        entry, req = server.request(params)
        task_type = server.task_type(params, entry) if params.vote else None
        events: asyncio.Queue = asyncio.Queue()
        aloop = asyncio.get_running_loop()
        ticket = server.submit(req, lambda ev: aloop.call_soon_threadsafe(events.put_nowait, ev))
        reply = _Reply(server, ticket, params, entry, task_type, chat, len(req.ids))
        if params.stream:
            return StreamingResponse(reply.stream(events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await reply.collect(events, request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


class _Reply:
    """One request's answer: the whole response, or its chunks as server-sent events."""

    def __init__(self, server: Server, ticket: Ticket, params: Params, entry: ModelEntry, task_type: str | None,
                 chat: bool, prompt_tokens: int):
        self.server, self.ticket, self.params, self.entry = server, ticket, params, entry
        self.task_type, self.chat, self.prompt_tokens = task_type, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{ticket.id}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.params.model}

    def _usage(self, done: dict[int, Done]) -> dict:
        generated = sum(d.num_tokens for d in done.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": generated,
                "total_tokens": self.prompt_tokens + generated}

    def _choice(self, d: Done) -> dict:
        body = {"message": {"role": "assistant", "content": d.text}} if self.chat else {"text": d.text}
        return {"index": d.index, **body, "logprobs": None, "finish_reason": _finish_reason(d.reason),
                "stop_reason": d.reason}

    def _delta(self, index: int, text: str, reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            body = {"delta": delta}
        else:
            body = {"text": text}
        return {**self._head(True), "choices": [{"index": index, **body, "logprobs": None,
                                                 "finish_reason": None if reason is None else _finish_reason(reason)}]}

    async def collect(self, events: asyncio.Queue, request) -> dict:
        """Wait for every sample; a client that disconnects meanwhile cancels the request."""
        done: dict[int, Done] = {}
        try:
            while len(done) < self.params.n:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.ticket.cancel()
                        return {}
                    continue
                if isinstance(event, Failed):
                    raise _failure(event)
                if isinstance(event, Done):
                    done[event.index] = event
        finally:
            self._log(done)
        body = {**self._head(False), "choices": [self._choice(done[i]) for i in sorted(done)],
                "usage": self._usage(done)}
        if self.task_type is not None:
            body["vote"] = _vote(done, self.task_type)
        return body

    async def stream(self, events: asyncio.Queue):
        """Server-sent events: text deltas, one finishing chunk per sample, the vote and usage when
        asked, then ``[DONE]``. A client that goes away cancels the request (its rows leave the batch
        at the next step)."""
        done: dict[int, Done] = {}
        try:
            if self.chat:
                for i in range(self.params.n):
                    yield _sse(self._delta(i, "", role=True))
            while len(done) < self.params.n:
                event = await events.get()
                if isinstance(event, Piece):
                    yield _sse(self._delta(event.index, event.text))
                elif isinstance(event, Done):
                    done[event.index] = event
                    yield _sse(self._delta(event.index, "", event.reason))
                else:
                    yield _sse(_failure(event).body())
                    yield "data: [DONE]\n\n"
                    return
            if self.task_type is not None:
                yield _sse({**self._head(True), "choices": [], "vote": _vote(done, self.task_type)})
            if self.params.include_usage:
                yield _sse({**self._head(True), "choices": [], "usage": self._usage(done)})
            yield "data: [DONE]\n\n"
        finally:
            self.ticket.cancel()  # no-op when it ended
            self._log(done)

    def _log(self, done: dict[int, Done]) -> None:
        t = self.ticket
        log.info("%s model=%s prompt_tokens=%d n=%d -> %s, %d tokens, %.2f s", self.id, self.params.model,
                 self.prompt_tokens, self.params.n, t.state if t.ended else "cancelled", t.num_tokens,
                 time.perf_counter() - t.submitted_at)
        if self.server.log_requests:
            prompt = self.params.prompt if self.params.messages is None else json.dumps(self.params.messages)
            log.info("%s prompt=%r outputs=%r", self.id, prompt, [done[i].text for i in sorted(done)])


def render_metrics(m: dict) -> str:
    """The loop's metrics in Prometheus' text format."""
    lines = []

    def metric(name: str, kind: str, help_: str, value, labels: str = "") -> None:
        if not any(line.startswith(f"# HELP modecotd_{name} ") for line in lines):
            lines.extend([f"# HELP modecotd_{name} {help_}", f"# TYPE modecotd_{name} {kind}"])
        lines.append(f"modecotd_{name}{labels} {value}")

    metric("queue_requests", "gauge", "Requests waiting to join the running batch.", m["queue"])
    metric("running_rows", "gauge", "Rows (samples) decoding in the running batch.", m["running_rows"])
    metric("running_requests", "gauge", "Requests with rows in the running batch.", m["running_requests"])
    metric("tokens_per_second", "gauge", "Generated tokens per second over the trailing window.",
           f"{m['tokens_per_s']:.3f}")
    metric("generated_tokens_total", "counter", "Tokens generated since the start.", m["generated_tokens"])
    metric("steps_total", "counter", "Decoding steps since the start.", m["steps"])
    metric("forward_calls_total", "counter", "Model forwards (prefill and decode) since the start.",
           m["forward_calls"])
    for outcome, count in m["requests"].items():
        metric("requests_total", "counter", "Requests by outcome.", count, f'{{outcome="{outcome}"}}')
    metric("batch_size", "gauge", "Rows the running batch holds at most.", m["batch_size"])
    metric("max_queue", "gauge", "Requests the queue holds at most.", m["max_queue"])
    return "\n".join(lines) + "\n"


__all__ = ["ApiError", "BASE_MODEL", "ModelEntry", "ModelTable", "Params", "Server", "build_app", "mixture_files",
           "parse_params", "render_metrics"]
