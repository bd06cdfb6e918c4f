"""The decoding loop: one state object (:class:`Decoder`) that prefills rows into a KV cache and
decodes one token per running row per forward, every row with its own expert gate row.

Requests with different experts or mixtures share the same batches: each sequence has one gate row
(E,) that every injected layer broadcasts over that sequence's tokens, so one forward per decoding
step serves the whole batch (the Punica / S-LoRA way) instead of one pass per adapter. A zero gate
row means the frozen student for that row.

The loop is a lean one written here (not ``model.generate``):

* prompts are left-padded; the attention mask hides the padding and the position ids count only
  real tokens (``cumsum(mask) - 1``), so a padded row computes what it computes alone;
* the prompts are run once (prefill) into a ``DynamicCache``, in runs of similar length, each run
  padded only to its own longest prompt; the runs' caches are then left-padded and stacked so the
  batch decodes as one. Only the last position's logits are computed (the vocabulary projection is
  the largest matmul of a small LM);
* each step feeds one token per live row; a row that finishes (stop string, EOS, its token budget,
  a complete answer line, a loop) is dropped from the batch, its KV cache rows and its gate row
  with it, so finished rows cost nothing; waiting rows are prefilled and join the running batch
  (continuous batching);
* greedy by default; sampling with temperature / top-p draws from a seeded ``torch.Generator`` per
  request (:class:`Sampler`), so the same prompts, gates and config give the same texts.

:func:`generate.generate_detailed <modecotd_engine.engine.generate.generate_detailed>` runs a fixed
list of requests through a :class:`Decoder`; the HTTP server (``serve_loop``) feeds it requests as
they arrive. A row's text is its decoded continuation, cut just after the first stop string (the
stop string included), without the EOS token.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from .answer_guide import AnswerForm, AnswerGuide, new_guide, restrict
from .answers import ANSWER_MARKER
from .data import pad_token_id
from .inject import MixtureHandle

if TYPE_CHECKING:
    from .generate import GenerationConfig

FINISH_REASONS = ("stop", "eos", "length", "answer", "loop", "forced")
# A request whose last LOOP_REPEATS * p tokens are one p-token piece repeated (p <= LOOP_MAX_PERIOD)
# has entered a cycle greedy decoding never leaves ("-->\n\n-->", "1. 1. 1."): it ends there.
LOOP_REPEATS = 4
LOOP_MAX_PERIOD = 16
# The answer line is looked for in a tail of this many tokens (marker, blank lines, answer).
ANSWER_WINDOW = 48
# Tokens decoded from a guided row's tail to see whether it just wrote the answer marker.
_MARKER_WINDOW = 6
# Waiting requests join the running batch once this fraction of its slots is free (or at once when it
# is empty): one prefill per few finished rows, not one per row.
ADMIT_FRACTION = 0.25
# Extra tokens decoded in front of a stop string's maximal token span when looking for it: a window
# may start inside a multi-byte character (decoded as U+FFFD) or lose a leading space to the
# tokenizer's clean-up, and that slack keeps both away from the stop string itself.
_STOP_WINDOW_SLACK = 8
# Prompts are prefilled in runs of similar length (see _prefill_chunks): a run ends where a prompt is
# shorter than this fraction of the run's longest, so at most ~15% of a run's prefill is padding.
# NOTE: the 64 built-in-task prompts of the inference benchmark (34-62 SmolLM2 tokens): one padded
# batch computes 1.38x the real prompt tokens; runs cut at 0.85 compute 1.06x in 3 forward calls.
PREFILL_SPLIT_RATIO = 0.85


# ------------------------------------------------------------------------------------------------
# model and tokenizer


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(gen_cfg, "eos_token_id", None)):
        if src is None:
            continue
        ids.update([int(src)] if isinstance(src, int) else [int(t) for t in src])
    return ids


# ------------------------------------------------------------------------------------------------
# sampling


@dataclass(eq=False)
class Sampler:
    """How a request's rows choose their tokens: argmax (temperature 0), or a temperature / top-p draw
    from ``generator``. Rows that share one sampler are drawn in one call, so a seeded request gives
    the same texts whatever else decodes beside it.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def of(cls, config: GenerationConfig, device: torch.device) -> "Sampler":
        """The sampler of ``config``: greedy, or a generator seeded with ``config.seed``."""
        if config.greedy:
            return cls()
        gen = torch.Generator(device=device)
        gen.manual_seed(int(config.seed))
        return cls(float(config.temperature), float(config.top_p), gen)


def _next_tokens(logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """(b, V) logits -> (b,) token ids: argmax, or a temperature / top-p draw."""
    if sampler.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampler.temperature, dim=-1)
    if sampler.top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is
        # still short of top_p (so the most likely token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= sampler.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        pick = torch.multinomial(sorted_p, 1, generator=sampler.generator)  # multinomial renormalises
        return sorted_i.gather(-1, pick).squeeze(-1)
    return torch.multinomial(probs, 1, generator=sampler.generator).squeeze(-1)


def _pick_tokens(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """(b, V) logits -> (b,) token ids, each row by its sampler: one call per distinct sampler (all
    greedy rows together in one argmax)."""
    first = samplers[0]
    if all(s is first for s in samplers) or all(s.greedy for s in samplers):
        return _next_tokens(logits, first)
    groups: dict[object, list[int]] = {}
    for j, s in enumerate(samplers):
        groups.setdefault("greedy" if s.greedy else id(s), []).append(j)
    out = torch.empty(len(samplers), dtype=torch.long, device=logits.device)
    for rows in groups.values():
        sel = torch.tensor(rows, device=logits.device)
        out[sel] = _next_tokens(logits[sel], samplers[rows[0]])
    return out


# ------------------------------------------------------------------------------------------------
# stop strings


def _stop_window(stops: Sequence[str]) -> int:
    """Tokens decoded from a row's tail to look for its stop strings: the longest one's bytes (a token
    holds at least one byte) plus ``_STOP_WINDOW_SLACK``."""
    return max(len(s.encode("utf-8")) for s in stops) + _STOP_WINDOW_SLACK


def _stop_cut(text: str, stops: Sequence[str]) -> int | None:
    """End index of the earliest-ending stop string in ``text``, or None."""
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    return min(ends) if ends else None


# ------------------------------------------------------------------------------------------------
# prefill and the KV cache


def _prefill_chunks(lengths: Sequence[int], ratio: float | None = None) -> list[tuple[int, int]]:
    """Cut rows sorted by decreasing prompt length into runs of similar length.

    A new run starts where a prompt is shorter than ``ratio`` times its run's longest, so padding
    costs at most ``1 - ratio`` of a run's prefill work.

    Returns:
        ``(start, end)`` row ranges covering ``range(len(lengths))``.
    """
    ratio = PREFILL_SPLIT_RATIO if ratio is None else ratio
    chunks, start = [], 0
    for i in range(1, len(lengths)):
        if lengths[i] < ratio * lengths[start]:
            chunks.append((start, i))
            start = i
    chunks.append((start, len(lengths)))
    return chunks


def _plain_dynamic_cache(model: nn.Module) -> bool:
    """Whether the model's DynamicCache keeps every position of every layer (no sliding window),
    so that per-chunk caches can be left-padded and stacked into one."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = getattr(DynamicCache(config=model.config), "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _new_cache(model: nn.Module):
    """A DynamicCache for ``model`` whose full-attention layers append in place (``kv_cache``)."""
    from .kv_cache import growing_cache

    return growing_cache(model.config)


def _cache_kwarg(module: nn.Module) -> str:
    """The name ``module.forward`` takes its KV cache by: ``cache`` from transformers 5.24 on (where
    ``past_key_values`` is deprecated, to be removed in 5.40), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


def _last_position_logits(model, input_ids, mask, positions, cache) -> torch.Tensor:
    """The decoder over a prompt batch into ``cache``; logits (b, V) of the last position only.

    ``model(..., logits_to_keep=1)`` would do the same, but it hands the output head a strided
    (b, 1, K) slice, which ``matmul`` runs as a batched product against the head weight expanded b
    times; in bfloat16 on CPU that expansion is copied: 16 prompts of SmolLM2 copied 0.9 GB and spent
    1.3 s of a 2.5 s prefill there. A contiguous (b, K) input makes it one plain GEMM.
    """
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                     use_cache=True, **{_cache_kwarg(decoder): cache}).last_hidden_state
    return model.get_output_embeddings()(hidden[:, -1].contiguous())


def _prefill(model, prompts: list[list[int]], g, handle, pad, device, modes=None):
    """Run the prompts of one batch (sorted by decreasing length) into a KV cache.

    Prompts of similar length are prefilled together (``_prefill_chunks``), each run padded only to
    its own longest prompt; the runs' caches are then left-padded to the batch's longest prompt
    and stacked, so decoding continues as one batch. Padded key/value slots are hidden by the
    attention mask, so the result is the one-big-batch result without its padding work.

    Returns:
        ``(cache, logits (b, V) at each prompt's last position, mask (b, L), last positions (b,),
        forward calls made)``.
    """
    lengths = [len(ids) for ids in prompts]
    width = lengths[0]
    chunks = _prefill_chunks(lengths) if len(prompts) > 1 and _plain_dynamic_cache(model) else [(0, len(prompts))]
    caches, logits, masks = [], [], []
    for lo, hi in chunks:
        w = lengths[lo]
        input_ids = torch.full((hi - lo, w), pad, dtype=torch.long)
        mask = torch.zeros((hi - lo, w), dtype=torch.long)
        for j, ids in enumerate(prompts[lo:hi]):
            input_ids[j, w - len(ids) :] = torch.tensor(ids)
            mask[j, w - len(ids) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)  # padding gets position 0; it is masked anyway
        if handle is not None:
            # None or all-zero rows: the frozen student
            handle.set_gates(None if g is None else g[lo:hi], None if modes is None else modes[lo:hi])
        cache = _new_cache(model)
        logits.append(_last_position_logits(model, input_ids, mask, positions, cache))
        caches.append(cache)
        masks.append(torch.nn.functional.pad(mask, (width - w, 0)))
    mask = torch.cat(masks)
    last_pos = torch.tensor([n - 1 for n in lengths], device=device)
    if len(caches) == 1:
        return caches[0], logits[0], mask, last_pos, 1
    merged = _new_cache(model)
    for layer in range(len(caches[0].layers)):
        keys, values = [], []
        for (lo, _hi), c in zip(chunks, caches):
            left = width - lengths[lo]  # (b_c, H, L_c, D) -> (b_c, H, L, D)
            keys.append(torch.nn.functional.pad(c.layers[layer].keys, (0, 0, left, 0)))
            values.append(torch.nn.functional.pad(c.layers[layer].values, (0, 0, left, 0)))
            c.layers[layer].keys = c.layers[layer].values = None  # free as we go
        merged.update(torch.cat(keys), torch.cat(values), layer)
    return merged, torch.cat(logits), mask, last_pos, len(chunks)


# ------------------------------------------------------------------------------------------------
# repetition penalty, loops, answer lines


def _penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """(b, V) logits with the CTRL repetition rule applied where ``seen`` (b, V) is set."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def is_looping(tokens: Sequence[int], repeats: int = LOOP_REPEATS, max_period: int = LOOP_MAX_PERIOD) -> bool:
    """Whether the last ``repeats * p`` tokens are one ``p``-token piece repeated, for some p <= max_period."""
    n = len(tokens)
    for p in range(1, max_period + 1):
        span = repeats * p
        if span > n:
            return False
        tail = tokens[n - span:]
        if all(tail[i] == tail[i + p] for i in range(span - p)):
            return True
    return False


def answer_complete(text: str) -> bool:
    """Whether ``text`` holds a ``-->`` marker followed by a finished, non-empty answer line."""
    at = text.rfind(ANSWER_MARKER)
    if at < 0:
        return False
    after = text[at + len(ANSWER_MARKER):].lstrip("\n \t")
    return "\n" in after and bool(after.split("\n", 1)[0].strip())


# ------------------------------------------------------------------------------------------------
# the running batch


@dataclass
class _Running:
    """The requests decoding together, one row each, every tensor in row order."""

    rows: list[int]  # request index of each row
    cache: object  # DynamicCache over the rows
    mask: torch.Tensor  # (b, W) 1 where a key/value slot holds a real token
    last_pos: torch.Tensor  # (b,) position of each row's last token
    logits: torch.Tensor  # (b, V) logits of each row's next token
    g: torch.Tensor | None  # (b, E) gate rows
    seen: torch.Tensor | None  # (b, V) tokens each row generated (repetition penalty)
    modes: list[str] | None = None  # each row's composition (with gate rows)


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [extra, 0]
    return torch.nn.functional.pad(x, pad)


def _merge(a: _Running, b: _Running) -> _Running:
    """One running batch from two: both left-padded to the wider cache, then stacked. Padded slots
    are masked, so each row computes what it computes alone."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    for la, lb in zip(a.cache.layers, b.cache.layers):  # (b, H, W, D) each, stacked into a's cache
        la.keys = torch.cat([_pad_left(la.keys, width, -2), _pad_left(lb.keys, width, -2)])
        la.values = torch.cat([_pad_left(la.values, width, -2), _pad_left(lb.values, width, -2)])
    cat = lambda x, y: None if x is None else torch.cat([x, y])  # noqa: E731
    return _Running(a.rows + b.rows, a.cache, torch.cat([_pad_left(a.mask, width, 1), _pad_left(b.mask, width, 1)]),
                    torch.cat([a.last_pos, b.last_pos]), torch.cat([a.logits, b.logits]), cat(a.g, b.g),
                    cat(a.seen, b.seen), None if a.modes is None else a.modes + b.modes)


def _keep(run: _Running, keep: list[int]) -> _Running:
    """The rows at positions ``keep``; key/value columns no remaining row uses are cut from the left."""
    sel = torch.tensor(keep, device=run.mask.device)
    run.cache.reorder_cache(sel)  # drop finished rows from every layer's keys and values
    mask = run.mask[sel]
    used = mask.any(0).nonzero()
    cut = int(used[0]) if used.numel() else 0
    if cut:
        for layer in run.cache.layers:
            layer.keys, layer.values = layer.keys[..., cut:, :], layer.values[..., cut:, :]
        mask = mask[:, cut:]
    pick = lambda x: None if x is None else x[sel]  # noqa: E731
    return _Running([run.rows[j] for j in keep], run.cache, mask, run.last_pos[sel], run.logits[sel],
                    pick(run.g), pick(run.seen), None if run.modes is None else [run.modes[j] for j in keep])


# ------------------------------------------------------------------------------------------------
# the decoder


@dataclass
class DecodeRow:
    """One sequence for the :class:`Decoder`: what it needs from its request.

    Attributes:
        ids: the prompt's token ids.
        budget: generated tokens at most (``token_budget``).
        gate: (E,) gate row, or None without experts.
        stops: stop strings; the text up to and including the first one is the result.
        sampler: how the row picks its tokens (rows of one request share one).
        stream: report the row's text as it grows (``DecodeSink.text``).
        mode: composition of the row's experts, "output" or "weight"; None: the handle's mode when
            the row is admitted. Rows of both modes decode in the same batch.
        answer: the form of the row's answer (``answer_guide``): after the ``-->`` marker only such an
            answer and END may follow, and a row about to end without any answer (EOS, a loop, its
            budget) gets the marker written for it (finish reason "forced"). None: no guide.
    """

    ids: list[int]
    budget: int
    gate: torch.Tensor | None
    stops: tuple[str, ...]
    sampler: Sampler
    stream: bool = False
    mode: str | None = None
    answer: AnswerForm | None = None


class DecodeSink(Protocol):
    """Where a :class:`Decoder` reports its rows' progress (from the thread that runs it)."""

    def first_token(self, row: int, at: float) -> None:
        """The row's first token was picked at ``time.perf_counter()`` value ``at``."""

    def text(self, row: int, piece: str) -> None:
        """New text of a streaming row (never taken back later)."""

    def finished(self, row: int, text: str, tokens: list[int], reason: str) -> None:
        """The row ended: its text, its token ids and one of ``FINISH_REASONS``."""


def token_budget(max_new_tokens: int, prompt_tokens: int, context: int | None) -> int:
    """Generated tokens a request may have: ``max_new_tokens``, capped by what the context leaves."""
    return min(max_new_tokens, context - prompt_tokens) if context else max_new_tokens


class Decoder:
    """Continuous batching: a running batch of rows decodes one token per forward; finished rows leave
    at once, and new rows are prefilled and join the running batch (their KV rows and gate rows
    stacked onto it) at any step, so the batch stays full instead of draining.

    The decoder is one state object driven step by step: :meth:`add` registers a row, :meth:`step`
    admits rows and decodes one token for every running row, :meth:`drop` takes rows out unfinished.
    :meth:`run` is the offline schedule over a fixed list of rows (``generate_detailed``); a server
    calls :meth:`step` with whatever arrived since the last step. Within a step the phases are
    :meth:`admit` (prefill and join), :meth:`pick` (sample, decide who finished), :meth:`retire`
    (report finished rows, drop them) and :meth:`forward` (one token each).

    Decoding settings that act on the whole batch (EOS, repetition penalty, answer and loop stops)
    come from ``config``; the rest is per row (:class:`DecodeRow`).
    """

    def __init__(self, model, tokenizer, handle: MixtureHandle | None, config: GenerationConfig, sink: DecodeSink):
        self.model, self.tokenizer, self.handle, self.config, self.sink = model, tokenizer, handle, config, sink
        self.device = model_device(model)
        eos = _eos_ids(model, tokenizer)
        self.pad = pad_token_id(tokenizer)
        self.eos = set() if config.ignore_eos else eos
        self.eos_index = torch.tensor(sorted(eos), device=self.device) if (eos and config.ignore_eos) else None
        self.penalty = float(config.repetition_penalty)
        self.rows: dict[int, DecodeRow] = {}
        self.tokens: dict[int, list[int]] = {}
        self.emitted: dict[int, int] = {}  # characters of each streaming row already reported
        self.guides: dict[int, AnswerGuide] = {}
        self.batch: _Running | None = None
        # Rows can join a running batch only where per-request caches stack (no sliding window).
        self.mergeable = config.continuous and _plain_dynamic_cache(model)
        self.cache_arg = _cache_kwarg(model)
        self.forward_calls = 0
        self.generated = 0  # tokens picked, EOS not counted
        # One record per prefill: ``forward_calls`` up to and including it, rows ``joined``, distinct
        # prompts ``prefilled`` for them, rows ``running`` already.
        self.admissions: list[dict] = []

    @property
    def running(self) -> list[int]:
        """The rows decoding now, in batch order."""
        return [] if self.batch is None else list(self.batch.rows)

    def can_join(self, rows: int) -> bool:
        """Whether ``rows`` new rows may be admitted now: the batch stays within ``config.batch_size``,
        and a running batch takes new rows only where caches stack."""
        if self.batch is not None and not self.mergeable:
            return False
        return len(self.running) + rows <= self.config.batch_size

    def add(self, r: int, row: DecodeRow) -> None:
        """Register row ``r``; it starts decoding when a :meth:`step` admits it."""
        self.rows[r] = row
        if row.answer is not None:
            self.guides[r] = new_guide(row.answer, self.tokenizer)

    def run(self, order: list[int]) -> None:
        """Decode the registered rows ``order`` to the end: a new group joins once ``ADMIT_FRACTION`` of
        the batch's slots are free (one prefill per few finished rows, not one per row)."""
        queue = list(order)
        while queue or self.batch is not None:
            free = self.config.batch_size - len(self.running)
            take: list[int] = []
            if queue and (self.batch is None or (self.mergeable and free >= max(1, int(ADMIT_FRACTION * self.config.batch_size)))):
                take = queue[:free]
                del queue[:free]
            self.step(take)

    def step(self, admit: Sequence[int] = ()) -> None:
        """Admit rows ``admit`` (registered, not yet running), then one token for every running row."""
        if admit:
            self.admit(list(admit))
        nxt, finished = self.pick()
        nxt = self.retire(nxt, finished)
        if self.batch is not None:
            self.forward(nxt)

    def admit(self, rows: list[int]) -> None:
        """Prefill ``rows`` (longest prompt first) and add them to the running batch."""
        rows = sorted(rows, key=lambda r: -len(self.rows[r].ids))
        g = modes = None
        if self.handle is not None and self.rows[rows[0]].gate is not None:
            g = torch.stack([self.rows[r].gate for r in rows]).to(self.device)  # (b, E)
            modes = [self.rows[r].mode or self.handle.state.mode for r in rows]
        # Requests with the same prompt, gate and mode (n samples of one question) share one prefill:
        # the distinct ones run, then their cache rows, logits and positions are repeated per request.
        keys = [(tuple(self.rows[r].ids), None if g is None else (tuple(g[j].tolist()), modes[j]))
                for j, r in enumerate(rows)]
        first = {}
        for j, k in enumerate(keys):
            first.setdefault(k, j)
        distinct = sorted(first.values())
        where = {k: distinct.index(j) for k, j in first.items()}
        cache, logits, mask, last_pos, calls = _prefill(self.model, [self.rows[rows[j]].ids for j in distinct],
                                                        None if g is None else g[distinct], self.handle, self.pad,
                                                        self.device, None if modes is None else
                                                        [modes[j] for j in distinct])
        if len(distinct) < len(rows):
            idx = torch.tensor([where[k] for k in keys], device=self.device)
            cache.reorder_cache(idx)  # index_select on the batch axis: repeated rows are copies
            logits, mask, last_pos = logits[idx], mask[idx], last_pos[idx]
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=self.device) if self.penalty > 1.0 else None
        new = _Running(list(rows), cache, mask, last_pos, logits, g, seen, modes)
        for r in rows:
            self.tokens[r] = []
        self.forward_calls += calls
        self.admissions.append({"forward_calls": self.forward_calls, "joined": len(rows), "prefilled": len(distinct),
                                "running": len(self.running)})
        self.batch = new if self.batch is None else _merge(self.batch, new)

    def pick(self) -> tuple[torch.Tensor, dict[int, str]]:
        """Next token of every row and the rows that end with it (and why)."""
        run = self.batch
        logits = run.logits
        if self.eos_index is not None:
            logits = logits.index_fill(-1, self.eos_index, float("-inf"))
        if run.seen is not None:
            logits = _penalise_repeats(logits, run.seen, self.penalty)
        forced, allowed = self._guide_before(run) if self.guides else ({}, {})
        if allowed:
            logits = restrict(logits, list(allowed), list(allowed.values()))
        nxt = _pick_tokens(logits, [self.rows[r].sampler for r in run.rows])  # (b,)
        if forced:
            nxt[list(forced)] = torch.tensor(list(forced.values()), device=nxt.device)
        picked = nxt.tolist()  # one host sync per step: finishing decisions need the tokens
        if self.guides:
            picked = self._guide_endings(run, picked, nxt)
        if run.seen is not None:
            run.seen.scatter_(1, nxt[:, None], True)
        now = time.perf_counter()
        finished: dict[int, str] = {}
        for r, t in zip(run.rows, picked):
            toks = self.tokens[r]
            if not toks:  # this row's first token
                self.sink.first_token(r, now)
            if t in self.eos:
                finished[r] = "eos"
                continue
            toks.append(t)
            if len(toks) >= self.rows[r].budget:
                finished[r] = "length"
        if self.guides:
            self._guide_after(run, picked, finished)
        live = [r for r, t in zip(run.rows, picked) if t not in self.eos]
        self.generated += len(live)
        stopping = [r for r in live if self.rows[r].stops]
        if stopping:
            tails = self.tokenizer.batch_decode([self.tokens[r][-_stop_window(self.rows[r].stops):] for r in stopping],
                                                skip_special_tokens=True)
            for r, tail in zip(stopping, tails):
                if any(s in tail for s in self.rows[r].stops):
                    finished[r] = "stop"
        if self.config.stop_after_answer:
            check = [r for r in live if r not in finished]
            if check:
                tails = self.tokenizer.batch_decode([self.tokens[r][-ANSWER_WINDOW:] for r in check],
                                                    skip_special_tokens=True)
                for r, tail in zip(check, tails):
                    if answer_complete(tail):
                        finished[r] = "answer"
        if self.config.stop_on_loop:
            for r in live:
                if r not in finished and r not in self.guides and is_looping(self.tokens[r]):
                    finished[r] = "loop"
        for r in finished:
            if r in self.guides and self.guides[r].marker_forced and finished[r] in ("stop", "answer", "length"):
                finished[r] = "forced"
        return nxt, finished

    # ---- guided answers (answer_guide)

    def _text(self, r: int) -> str:
        return self.tokenizer.decode(self.tokens[r], skip_special_tokens=True)

    def _guide_before(self, run: _Running) -> tuple[dict[int, int], dict[int, list[int]]]:
        """Before a pick: a row whose budget leaves just room for the marker and an answer starts the
        marker when its text holds no answer (else it runs on as it would unguided); then, by batch
        position, the token each guided row must take and the ids each may take."""
        forced, allowed = {}, {}
        for j, r in enumerate(run.rows):
            g = self.guides.get(r)
            if g is None:
                continue
            if (g.phase == "free" and not g.settled
                    and len(self.tokens[r]) + g.reserve >= self.rows[r].budget > g.reserve):
                g.settled = True  # checked once: the text is decoded here, not at every later step
                if not g.form.answered(self._text(r)):
                    g.start_marker()
            f = g.forced()
            if f is not None:
                forced[j] = f
                continue
            ids = g.allowed(self.rows[r].budget - len(self.tokens[r]))
            if ids is not None:
                allowed[j] = ids
        return forced, allowed

    def _guide_endings(self, run: _Running, picked: list[int], nxt: torch.Tensor) -> list[int]:
        """A guided row that picked EOS or END before any answer (none in its text, no marker yet)
        writes the marker instead."""
        for j, (r, t) in enumerate(zip(run.rows, picked)):
            g = self.guides.get(r)
            if (g is not None and g.phase == "free" and (t in self.eos or t in g.tables.spell_end)
                    and not g.form.answered(self._text(r))):
                g.start_marker()
                picked[j] = g.forced()
                nxt[j] = picked[j]
        return picked

    def _guide_after(self, run: _Running, picked: list[int], finished: dict[int, str]) -> None:
        """After a pick: advance every guided row's guide; a guided row in a loop (which greedy decoding
        never leaves) writes the marker when its text holds no answer and ends ("loop") when it does;
        a row whose answer and END are written ends."""
        for r, t in zip(run.rows, picked):
            g = self.guides.get(r)
            if g is None or t in self.eos:
                continue
            tail = None
            if g.phase == "free" and t in g.tables.closes_marker:
                tail = self.tokenizer.decode(self.tokens[r][-_MARKER_WINDOW:], skip_special_tokens=True)
            g.advance(t, tail)
            if g.done:
                finished[r] = "forced" if g.marker_forced else "answer"
            elif g.phase == "free" and not g.settled and r not in finished and is_looping(self.tokens[r]):
                if g.form.answered(self._text(r)):
                    finished[r] = "loop"
                elif len(self.tokens[r]) + g.reserve < self.rows[r].budget:
                    g.start_marker()

    def retire(self, nxt: torch.Tensor, finished: dict[int, str]) -> torch.Tensor | None:
        """Report the finished rows and drop them; the tokens ``nxt`` of the rows that go on."""
        texts = {}
        for r, why in finished.items():
            text = self.tokenizer.decode(self.tokens[r], skip_special_tokens=True)
            if why == "stop":
                cut = _stop_cut(text, self.rows[r].stops)
                text = text if cut is None else text[:cut]
            texts[r] = text
        for r in self.batch.rows:
            if self.rows[r].stream:
                self._stream(r, texts.get(r))
        for r, why in finished.items():
            self.sink.finished(r, texts[r], self.tokens[r], why)
        if not finished:
            return nxt
        keep = [j for j, r in enumerate(self.batch.rows) if r not in finished]
        self._forget(finished)
        if not keep:
            self.batch = None
            return None
        self.batch = _keep(self.batch, keep)
        return nxt[torch.tensor(keep, device=nxt.device)]

    def drop(self, rows: Sequence[int]) -> None:
        """Take rows out unfinished, running or only registered (their request was cancelled, timed out or
        failed); nothing is reported for them."""
        gone = set(rows)
        self._forget(gone)
        running = self.running
        keep = [j for j, r in enumerate(running) if r not in gone]
        if len(keep) < len(running):
            self.batch = _keep(self.batch, keep) if keep else None

    def forward(self, nxt: torch.Tensor) -> None:
        """Feed every row its token; ``batch.logits`` becomes the logits of the token after it."""
        run = self.batch
        if self.handle is not None:
            self.handle.set_gates(run.g, run.modes)
        run.mask = torch.cat([run.mask, run.mask.new_ones(len(run.rows), 1)], dim=1)
        run.last_pos = run.last_pos + 1
        out = self.model(input_ids=nxt[:, None], attention_mask=run.mask, position_ids=run.last_pos[:, None],
                         use_cache=True, **{self.cache_arg: run.cache})
        self.forward_calls += 1
        run.logits = out.logits[:, -1, :]

    def _forget(self, rows) -> None:
        for r in rows:
            self.rows.pop(r, None)
            self.tokens.pop(r, None)
            self.emitted.pop(r, None)
            self.guides.pop(r, None)

    def _stream(self, r: int, final: str | None) -> None:
        """Report the new part of row ``r``'s text; ``final`` is its whole text once it has finished."""
        text = final
        if text is None:
            text = self.tokenizer.decode(self.tokens[r], skip_special_tokens=True)
            # Hold back a half-decoded multi-byte character, and any tail that could still grow
            # into a stop string, so that nothing streamed is later cut away.
            text = text.rstrip("\ufffd")
            hold = max((len(s) - 1 for s in self.rows[r].stops), default=0)
            emitted = self.emitted.get(r, 0)
            text = text[: max(emitted, len(text) - hold)] if hold else text
        emitted = self.emitted.get(r, 0)
        if len(text) > emitted:
            self.sink.text(r, text[emitted:])
            self.emitted[r] = len(text)


__all__ = [
    "ADMIT_FRACTION",
    "ANSWER_WINDOW",
    "FINISH_REASONS",
    "LOOP_MAX_PERIOD",
    "LOOP_REPEATS",
    "PREFILL_SPLIT_RATIO",
    "DecodeRow",
    "DecodeSink",
    "Decoder",
    "Sampler",
    "answer_complete",
    "is_looping",
    "model_device",
    "token_budget",
]
