"""``HTTPTeacher``: an OpenAI-compatible endpoint as teacher, over the standard library's HTTP client.

Bounded concurrency, a per-request timeout, and retries with exponential backoff and jitter (honouring
``Retry-After``) on 429, 5xx, malformed JSON, timeouts and connection errors. 401/403/404 stop the run
at once; a connection that stays refused or reset after every retry raises ``TeacherUnavailable``.
"""

from __future__ import annotations

import concurrent.futures as cf
import email.utils
import http.client
import ipaddress
import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from .teacher import Completion, SampleConfig, TeachError, TeacherError, TeacherUnavailable

log = logging.getLogger(__name__)

# Cap on a server's Retry-After, so a misconfigured endpoint cannot park the run for hours.
MAX_RETRY_AFTER_S = 120.0
MAX_BACKOFF_S = 30.0


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

