"""The serving loop: one thread owns the student and decodes every request in flight together.

Requests arrive at any time on a bounded queue (:meth:`ServeLoop.submit`). At each step the loop

1. drops the rows of requests that were cancelled (a client that went away) or ran past their
   deadline, and removes such requests from the queue;
2. admits waiting requests in arrival order while the running batch has room: their prompts are
   prefilled and their KV rows and gate rows join the batch (``decoder.Decoder``), so requests with
   different experts and mixtures decode in the same forward;
3. picks one token for every running row, reports text and finished rows to each request's
   ``on_event`` callback, and feeds the tokens back (one forward for the whole batch).

Every row carries its own gate row and composition mode (output / weight), so experts and mixtures
of both modes share the running batch. An attached router is a setting of the whole injected model,
so a router mixture has a *group* of its own (``Selection.group``). A waiting request of another group
stops admission at its place in the queue: the batch drains, the loop switches the model to that
group, and admission goes on in arrival order. No request waits behind a later one.

Each step leaves a :class:`StepRecord` (which requests joined, which were running, which finished or
were dropped; ``ServeLoop.step_records``), so continuous batching can be checked from the records
rather than from timings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .decoder import DecodeRow, Decoder, Sampler, token_budget
from .generate import GenerationConfig, model_context_length
from .selection import GenerationError, Selection

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Settings of the loop around the decoder (decoding settings are a ``GenerationConfig``).

    Attributes:
        max_queue: requests waiting to be admitted at most; one more is refused (:class:`QueueFull`).
        request_timeout_s: a request still waiting or decoding this long after it arrived is ended
            (its client gets a timeout); a request may ask for less, never for more.
        retry_after_s: what a refused request is told to wait before trying again.
        step_records: how many of the latest steps ``ServeLoop.step_records()`` returns.
        rate_window_s: the trailing window the tokens/s metric is measured over.
    """

    max_queue: int = 64
    request_timeout_s: float = 600.0
    retry_after_s: int = 1
    step_records: int = 4096
    rate_window_s: float = 10.0

    def __post_init__(self):
        if int(self.max_queue) < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if not float(self.request_timeout_s) > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests already; try again after ``retry_after_s`` seconds."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class LoopClosed(RuntimeError):
    """The loop has stopped (or never started) and takes no requests."""


@dataclass
class ServeRequest:
    """One request as the loop runs it, already validated and tokenized.

    Attributes:
        ids: prompt token ids (formatted and encoded as ``generate`` does).
        selection: gate row, mode and router.
        config: this request's decoding settings (max_new_tokens, temperature, top_p, seed, stops);
            settings that act on the whole batch come from the loop's own config.
        n: samples; they share one prefill and decode as n rows.
        stream: report text as it grows (:class:`Piece` events).
        timeout_s: end the request this long after it arrived (capped by the loop's timeout).
    """

    ids: list[int]
    selection: Selection
    config: GenerationConfig
    n: int = 1
    stream: bool = False
    timeout_s: float | None = None


@dataclass(frozen=True)
class Piece:
    """New text of sample ``index`` (streaming requests)."""

    index: int
    text: str


@dataclass(frozen=True)
class Done:
    """Sample ``index`` finished: its text, generated tokens and finish reason (``FINISH_REASONS``)."""

    index: int
    text: str
    num_tokens: int
    reason: str


@dataclass(frozen=True)
class Failed:
    """The request ended without its result: ``reason`` is "timeout", "error" or "shutdown"."""

    reason: str
    message: str


Event = Piece | Done | Failed


class Ticket:
    """A submitted request: the loop sends its events to ``on_event`` (from the loop's thread).

    Attributes:
        id: the loop's number for the request (in step records and logs).
        state: "waiting", "running", then "done", "timeout", "cancelled", "error" or "shutdown".
        rows: the decoder rows of its samples, once admitted.
        num_tokens: generated tokens so far over its samples.
    """

    def __init__(self, tid: int, request: ServeRequest, on_event: Callable[[Event], None], deadline: float):
        self.id, self.request, self.on_event, self.deadline = tid, request, on_event, deadline
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.state = "waiting"
        self.rows: list[int] = []
        self.remaining = request.n
        self.num_tokens = 0
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Ask the loop to drop the request at its next step (no-op once it has ended)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def ended(self) -> bool:
        return self.state not in ("waiting", "running")

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the consumer; a consumer that fails is logged, never stops the loop."""
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - a consumer's error is that request's problem
            log.exception("request %d: its event consumer failed", self.id)


@dataclass
class StepRecord:
    """What one step did (ticket ids throughout).

    Attributes:
        step: the step's number, from 0.
        group: the batch group during the step (``ServeLoop.group_of``): (None, None) for gate rows
            of either mode, (mode, router file) for a router mixture.
        running: requests with rows in the batch before admission.
        admitted: requests whose rows were prefilled and joined at this step.
        rows: rows in the step's decoding forward (0 when the batch emptied).
        finished: requests whose last sample finished at this step.
        dropped: requests taken out unfinished, with why ("cancelled" or "timeout").
    """

    step: int
    group: tuple
    running: list[int]
    admitted: list[int]
    rows: int
    finished: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)


class ServeLoop:
    """The engine loop of the server: a queue in front of a :class:`~.decoder.Decoder`, run by one
    background thread that owns the model.

    Args:
        model: the student, experts injected when ``handle`` is given; used by this loop only.
        tokenizer: its tokenizer (decoding only; encode prompts with a copy of your own).
        handle: the injection handle (None: the frozen student only).
        config: decoding settings of the batch (``batch_size`` rows at most, EOS, penalty, guards)
            and the defaults a request's own config was made from.
        serve: queue, timeout and record settings.
    """

    def __init__(self, model, tokenizer, handle, config: GenerationConfig, serve: ServeConfig | None = None):
        self.model, self.handle, self.config = model, handle, config
        self.serve = serve or ServeConfig()
        self.decoder = Decoder(model, tokenizer, handle, config, self)
        self.context = model_context_length(model)
        self._records: deque[StepRecord] = deque(maxlen=self.serve.step_records)
        self.counts = {"done": 0, "timeout": 0, "cancelled": 0, "error": 0, "shutdown": 0, "rejected": 0}
        self.started_at = time.time()
        self._cv = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._active: dict[int, Ticket] = {}  # running tickets by id
        self._owner: dict[int, tuple[Ticket, int]] = {}  # decoder row -> (ticket, sample index)
        self._next_ticket = 0
        self._next_row = 0
        self._steps = 0
        self._group: tuple = (None, None)  # gate rows of either mode (``Selection.group``)
        self._routers: dict[str, dict[str, torch.Tensor]] = {}
        self._rate: deque[tuple[float, int]] = deque()  # (time, tokens) per step in the rate window
        self._rate_total = 0  # decoder.generated at the last step
        self._finished_now: list[int] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------------------ public side

    def start(self) -> "ServeLoop":
        """Start the loop's thread."""
        self.model.eval()
        self._thread = threading.Thread(target=self._run, name="modecotd-serve-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; requests still waiting or running get ``Failed("shutdown")``."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, request: ServeRequest, on_event: Callable[[Event], None]) -> Ticket:
        """Queue ``request``; its events go to ``on_event``.

        Raises:
            GenerationError: more samples than the batch holds, or a prompt that leaves no room.
            QueueFull: ``max_queue`` requests are waiting already.
            LoopClosed: the loop is not running.
        """
        if request.n > self.config.batch_size:
            raise GenerationError(f"n={request.n} samples do not fit the batch of {self.config.batch_size} rows")
        if token_budget(request.config.max_new_tokens, len(request.ids), self.context) < 1:
            raise GenerationError(f"the prompt's {len(request.ids)} tokens fill the model context ({self.context})")
        timeout = min(request.timeout_s or self.serve.request_timeout_s, self.serve.request_timeout_s)
        with self._cv:
            if not self.alive:
                raise LoopClosed("the serving loop is not running")
            if len(self._waiting) >= self.serve.max_queue:
                self.counts["rejected"] += 1
                raise QueueFull(len(self._waiting), self.serve.retry_after_s)
            ticket = Ticket(self._next_ticket, request, on_event, time.perf_counter() + timeout)
            self._next_ticket += 1
            self._waiting.append(ticket)
            self._cv.notify_all()
        return ticket

    def step_records(self) -> list[StepRecord]:
        """The latest steps' records (``ServeConfig.step_records`` of them), oldest first."""
        with self._cv:
            return list(self._records)

    def metrics(self) -> dict:
        """Queue length, running rows and requests, tokens/s over the trailing window, and counters."""
        now = time.perf_counter()
        with self._cv:
            window = [(t, n) for t, n in self._rate if t >= now - self.serve.rate_window_s]
            waiting = len(self._waiting)
            running_requests = len(self._active)
        return {"queue": waiting, "running_rows": len(self.decoder.running), "running_requests": running_requests,
                "tokens_per_s": sum(n for _, n in window) / self.serve.rate_window_s,
                "generated_tokens": self.decoder.generated, "steps": self._steps,
                "forward_calls": self.decoder.forward_calls, "requests": dict(self.counts),
                "batch_size": self.config.batch_size, "max_queue": self.serve.max_queue}

    # ------------------------------------------------------------------------ the decoder's sink

    def first_token(self, row: int, at: float) -> None:
        ticket, _ = self._owner[row]
        if ticket.first_token_at is None:
            ticket.first_token_at = at

    def text(self, row: int, piece: str) -> None:
        ticket, index = self._owner[row]
        ticket.emit(Piece(index, piece))

    def finished(self, row: int, text: str, tokens: list[int], reason: str) -> None:
        ticket, index = self._owner.pop(row)
        ticket.num_tokens += len(tokens)
        ticket.remaining -= 1
        if ticket.remaining == 0:  # ended before its consumer hears of the last sample
            self._end(ticket, "done")
            self._finished_now.append(ticket.id)
        ticket.emit(Done(index, text, len(tokens), reason))

    # --------------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._active:
                        self._cv.wait()
                    if self._stopping:
                        break
                try:
                    self._step()
                except Exception:  # noqa: BLE001 - the loop outlives any one step
                    log.exception("serving step %d failed", self._steps)
                    self._fail(list(self._active.values()), "error", "the server failed while decoding")
        with self._cv:
            left = list(self._waiting) + list(self._active.values())
            self._waiting.clear()
        self._fail(left, "shutdown", "the server is shutting down")

    def _step(self) -> None:
        """Drop, admit, decode one token, record."""
        dropped = self._expire(time.perf_counter())
        running = sorted(self._active)
        admitted = self._take()
        self._finished_now = []
        if admitted:
            self._admit(admitted)
        if self.decoder.running:
            rows = len(self.decoder.running)
            try:
                self.decoder.step()
            except Exception:  # noqa: BLE001 - fail the batch, keep serving
                log.exception("decoding step %d failed", self._steps)
                self._fail(list(self._active.values()), "error", "the server failed while decoding")
        else:
            rows = 0
        self._count_rate(time.perf_counter())
        record = StepRecord(self._steps, self._group, running, [t.id for t in admitted], rows,
                            list(self._finished_now), dropped)
        with self._cv:
            self._records.append(record)
        self._steps += 1

    def _count_rate(self, now: float) -> None:
        """Add the step's generated tokens to the rate window and forget steps older than it."""
        total = self.decoder.generated
        with self._cv:
            self._rate.append((now, total - self._rate_total))
            while self._rate[0][0] < now - self.serve.rate_window_s:
                self._rate.popleft()
        self._rate_total = total

    def _expire(self, now: float) -> dict[int, str]:
        """End cancelled and timed-out requests, waiting or running; their rows leave the batch."""
        out: dict[int, str] = {}
        with self._cv:
            for ticket in list(self._waiting):
                why = "cancelled" if ticket.cancelled else "timeout" if now > ticket.deadline else None
                if why:
                    self._waiting.remove(ticket)
                    out[ticket.id] = why
                    self._give_up(ticket, why)
        for ticket in list(self._active.values()):
            why = "cancelled" if ticket.cancelled else "timeout" if now > ticket.deadline else None
            if why:
                self.decoder.drop([r for r in ticket.rows if r in self._owner])
                out[ticket.id] = why
                self._give_up(ticket, why)
        return out

    def _take(self) -> list[Ticket]:
        """The waiting requests to admit now: in arrival order, of the batch's group, while they fit."""
        taken: list[Ticket] = []
        rows = 0
        with self._cv:
            if not self._waiting:
                return taken
            head = self._waiting[0]
            if not self.decoder.running and self.group_of(head.request.selection) != self._group:
                try:
                    self._switch(head.request.selection)
                except Exception as exc:  # noqa: BLE001 - e.g. a router file gone since the start
                    log.exception("request %d: cannot switch the model to %s", head.id,
                                  self.group_of(head.request.selection))
                    self._waiting.popleft()
                    self._fail([head], "error", f"the server cannot serve this model now: {exc}")
                    return taken
            while self._waiting:
                ticket = self._waiting[0]
                if (self.group_of(ticket.request.selection) != self._group
                        or not self.decoder.can_join(rows + ticket.request.n)):
                    break
                taken.append(self._waiting.popleft())
                rows += ticket.request.n
        return taken

    def group_of(self, selection: Selection) -> tuple:
        """The batch group of a request: requests of one group decode together; another group waits
        until the batch is empty and :meth:`_switch` has set the model up for it."""
        return selection.group

    def _switch(self, selection: Selection) -> None:
        """Set the router (and the composition its gates use) of ``selection``'s group, or detach any
        router for gate rows (batch is empty)."""
        from .mixture import load_router_state

        self._group = None  # unknown until the switch is complete: a failed one is redone
        if self.handle is None:
            self._group = selection.group
            return
        if self.handle.has_router:
            self.handle.detach_router()
        self.handle.set_mode(selection.mode)
        if selection.router is not None:
            key = str(selection.router.router)
            if key not in self._routers:
                self._routers[key] = load_router_state(selection.router)
            self.handle.attach_router(self._routers[key], top_k=selection.router.top_k)
        self._group = selection.group

    def _admit(self, tickets: list[Ticket]) -> None:
        """Register the tickets' rows and prefill them into the batch; a failed prefill fails them only."""
        rows: list[int] = []
        for ticket in tickets:
            req = ticket.request
            sampler = Sampler.of(req.config, self.decoder.device)
            budget = token_budget(req.config.max_new_tokens, len(req.ids), self.context)
            gate = req.selection.gate
            if gate is None and self.handle is not None:
                gate = torch.zeros(self.handle.bank.num_experts)  # a router group: its layers ignore the gates
            for index in range(req.n):
                r = self._next_row
                self._next_row += 1
                self.decoder.add(r, DecodeRow(req.ids, budget, gate, req.config.stop_strings, sampler, req.stream,
                                              mode=req.selection.mode))
                self._owner[r] = (ticket, index)
                ticket.rows.append(r)
                rows.append(r)
            ticket.state = "running"
            self._active[ticket.id] = ticket
        try:
            self.decoder.admit(rows)
        except Exception:  # noqa: BLE001 - one bad request never stops the loop
            log.exception("prefill of requests %s failed", [t.id for t in tickets])
            self._fail(tickets, "error", "the server failed to prefill the prompt")

    def _fail(self, tickets: list[Ticket], reason: str, message: str) -> None:
        """End ``tickets`` with ``Failed``; their rows leave the batch."""
        try:
            self.decoder.drop([r for t in tickets for r in t.rows if r in self._owner])
        except Exception:  # noqa: BLE001 - a broken batch is discarded whole
            self.decoder.batch = None
        for ticket in tickets:
            if not ticket.ended:
                self._end(ticket, reason)
                ticket.emit(Failed(reason, message))

    def _give_up(self, ticket: Ticket, why: str) -> None:
        self._end(ticket, why)
        if why == "timeout":
            ticket.emit(Failed("timeout", f"the request did not finish within its timeout "
                                          f"({ticket.deadline - ticket.submitted_at:g} s)"))

    def _end(self, ticket: Ticket, state: str) -> None:
        ticket.state = state
        self._active.pop(ticket.id, None)
        for r in ticket.rows:
            self._owner.pop(r, None)
        self.counts[state] += 1


__all__ = ["Done", "Event", "Failed", "LoopClosed", "Piece", "QueueFull", "ServeConfig", "ServeLoop",
           "ServeRequest", "StepRecord", "Ticket"]
