"""Batched generation where every request carries its own expert gates, all served together:
:func:`generate` (texts) and :func:`generate_detailed` (texts, token counts, finish reasons, times).

Requests with different experts or mixtures share the same batches: each sequence has one gate row
(E,) that every injected layer broadcasts over that sequence's tokens, so one forward per decoding
step serves the whole batch. A zero gate row means the frozen student for that request.

This module prepares the requests (prompt format, token ids, token budgets, gate rows checked) and
runs them through the step-wise :class:`~modecotd_engine.engine.decoder.Decoder`, longest prompts
first, collecting what it reports into a :class:`GenerationResult` in request order. The loop itself
(prefill, continuous batching, sampling, stop strings, answer and loop stops) is ``decoder.py``;
turning an expert name, spec or mixture file into a gate row is ``selection.py``. Their public names
are importable from here as well.

The text returned for a request is its decoded continuation, cut just after the first stop string
(the stop string included), without the EOS token.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels import MODES
from .answer_guide import AnswerForm
from .data import PROMPT_FORMATS, encode_prompt, format_prompt
from .decoder import (ADMIT_FRACTION, ANSWER_WINDOW, FINISH_REASONS, LOOP_MAX_PERIOD, LOOP_REPEATS,
                      PREFILL_SPLIT_RATIO, DecodeRow, DecodeSink, Decoder, Sampler, answer_complete, is_looping,
                      model_device, token_budget)
from .inject import MixtureHandle
from .selection import (GenerationError, Selection, frozen_selection, mixture_selection, parse_expert_spec,
                        spec_selection)


class PromptError(GenerationError):
    """A bad prompt: ``index`` is its position in the request list, ``detail`` what is wrong with it."""

    def __init__(self, index: int, detail: str):
        super().__init__(f"prompt {index} {detail}")
        self.index = index
        self.detail = detail


@dataclass
class GenerationConfig:
    """Decoding settings.

    Args:
        max_new_tokens: generated tokens per request at most (also capped by the model context).
        temperature: 0 for greedy decoding; > 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling mass in (0, 1]; 1 keeps the whole distribution. Ignored when greedy.
        seed: seed of the sampling generator.
        stop_strings: generation of a request ends once its text contains one of these; the text up
            to and including it is returned. Empty: only EOS and the token budget stop.
        batch_size: requests per batch (one forward per step serves a whole batch).
        ignore_eos: never end at EOS (its logits are masked, as transformers' ``min_new_tokens``
            does), so every request runs to ``max_new_tokens`` or a stop string; for benchmarks.
        prompt_format: "plain" (the prompt as given) or "chat" (the tokenizer's chat template around
            it; ``data.format_prompt``). Use the format the experts were trained with.
        repetition_penalty: > 1 lowers the logits of tokens the request has already generated (the
            CTRL rule transformers uses: positive logits divided, negative multiplied); 1 = off. The
            prompt's tokens are not penalised (a question's numbers are needed in its answer).
        stop_after_answer: end a request once the answer line after its last ``-->`` marker is
            complete (a non-empty line followed by a line break), even without ``END``.
        stop_on_loop: end a request whose tail is one short piece repeated (see LOOP_REPEATS).
        continuous: waiting requests join the running batch as rows finish (continuous batching);
            False runs the requests in fixed batches that drain (the next starts when all of one
            have finished), kept for comparison.
        guide_answers: callers that know each request's task type (evaluation, the mixing check)
            give every request an answer form (``answer_guide``): after the ``-->`` marker only an
            answer of that form and END may follow, and a request about to end without an answer
            gets the marker written for it (finish reason "forced").
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_strings: tuple[str, ...] = ("END",)
    batch_size: int = 16
    ignore_eos: bool = False
    prompt_format: str = "plain"
    repetition_penalty: float = 1.0
    stop_after_answer: bool = False
    stop_on_loop: bool = False
    continuous: bool = True
    guide_answers: bool = False

    def __post_init__(self):
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings)
        if int(self.max_new_tokens) < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not float(self.temperature) >= 0.0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if int(self.batch_size) < 1:
            raise GenerationError(f"batch_size must be >= 1, got {self.batch_size}")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise GenerationError(f"stop strings must be non-empty strings, got {s!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise GenerationError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        if not float(self.repetition_penalty) >= 1.0:
            raise GenerationError(f"repetition_penalty must be >= 1, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationResult:
    """Texts plus per-request accounting.

    Attributes:
        texts: the generated continuation per request (request order).
        num_tokens: generated tokens per request (EOS not counted).
        finish_reasons: "stop" (a stop string), "eos", "length" (token budget or model context),
            "answer" (``stop_after_answer``, or a guided answer complete), "loop" (``stop_on_loop``) or
            "forced" (a guided request whose marker was written for it).
        first_token_s: seconds from the call's start until the request's first token was known.
        seconds: wall time of the whole call.
        token_ids: the generated token ids per request (EOS not included; with a stop string, every
            token up to the one that completed it).
        batches: prefills (groups of requests that joined the running batch together).
        forward_calls: model forwards, prefill and decode.
        extra: ``admissions``, one record per prefill: ``forward_calls`` up to and including it, requests
            ``joined``, distinct prompts ``prefilled`` for them, rows ``running`` already.
    """

    texts: list[str]
    num_tokens: list[int]
    finish_reasons: list[str]
    first_token_s: list[float]
    seconds: float
    token_ids: list[list[int]] = field(default_factory=list)
    batches: int = 0
    forward_calls: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


# ------------------------------------------------------------------------------------------------
# requests


def model_context_length(model: nn.Module) -> int | None:
    """Positions the model can attend over (``max_position_embeddings``), or None if unknown."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def encode_prompts(tokenizer, prompts: Sequence[str], *, context: int | None = None) -> list[list[int]]:
    """Token ids of each prompt, encoded as training encodes prompts (``data.encode_prompt``).

    Raises:
        PromptError: a prompt that is not a string, is empty, or does not leave room for one new token
            in the model context (``context`` tokens).
    """
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptError(i, f"is a {type(p).__name__}, not a string")
        if not p.strip():
            raise PromptError(i, "is empty")
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    for i, row in enumerate(ids):
        if not row:
            raise PromptError(i, "encodes to no tokens")
        if context is not None and len(row) >= context:
            raise PromptError(
                i, f"has {len(row)} tokens; the model context is {context} tokens "
                "(a prompt must leave room for at least one new token)"
            )
    return [list(r) for r in ids]


def _check_gates(gates: torch.Tensor | None, handle: MixtureHandle | None, n: int) -> torch.Tensor | None:
    if gates is None:
        return None
    if handle is None:
        raise GenerationError("gates were given without a MixtureHandle: inject the experts first")
    if not isinstance(gates, torch.Tensor):
        raise GenerationError(f"gates must be a tensor of shape ({n}, E), got {type(gates).__name__}")
    e = handle.bank.num_experts
    if gates.dim() != 2 or tuple(gates.shape) != (n, e):
        raise GenerationError(f"gates must be (num_prompts={n}, E={e}), one row per request, got {tuple(gates.shape)}")
    if not torch.isfinite(gates).all():
        raise GenerationError("gates contain NaN or infinite values")
    return gates.detach()


# ------------------------------------------------------------------------------------------------
# generation


def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    handle: MixtureHandle | None = None,
    gates: torch.Tensor | None = None,
    config: GenerationConfig = GenerationConfig(),
    stream: Callable[[str], None] | None = None,
    progress: bool = False,
    modes: Sequence[str] | None = None,
) -> list[str]:
    """Generate a continuation for every prompt, each with its own expert gates, in shared batches.

    Args:
        model: a causal LM (the student), with experts injected when ``handle`` is given.
        tokenizer: its tokenizer.
        prompts: the requests' prompt texts.
        handle: the injection handle of ``model`` (needed when ``gates`` is given).
        gates: (len(prompts), E) one gate row per request; None runs the frozen student for all, and
            a zero row runs it for that request.
        config: decoding settings.
        stream: called with each new piece of text as it is decoded (a single prompt only).
        progress: show a progress bar of finished requests on stderr.
        modes: each request's composition, "output" or "weight" (None: the handle's mode for all);
            requests of both decode in the same batches.

    Returns:
        The generated continuation per prompt, in prompt order.
    """
    return generate_detailed(model, tokenizer, prompts, handle=handle, gates=gates, config=config,
                             stream=stream, progress=progress, modes=modes).texts


@torch.inference_mode()
def generate_detailed(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    handle: MixtureHandle | None = None,
    gates: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    stream: Callable[[str], None] | None = None,
    progress: bool = False,
    modes: Sequence[str] | None = None,
    answers: Sequence[AnswerForm | None] | None = None,
) -> GenerationResult:
    """:func:`generate` with token counts, finish reasons and time to first token per request.

    ``answers`` gives each request the form of its answer (``answer_guide.AnswerForm``; None for an
    unguided request): see :class:`DecodeRow`'s ``answer``."""
    t0 = time.perf_counter()
    config = config or GenerationConfig()
    if isinstance(prompts, str):
        raise GenerationError("prompts must be a sequence of strings, not one string (wrap it in a list)")
    prompts = list(prompts)
    n = len(prompts)
    if stream is not None and n != 1:
        raise GenerationError(f"streaming serves a single prompt, got {n}")
    gates = _check_gates(gates, handle, n)
    if modes is not None:
        modes = list(modes)
        if len(modes) != n or gates is None:
            raise GenerationError(f"modes need gates and one mode per prompt: {len(modes)} modes for {n} prompts"
                                  + ("" if gates is not None else ", no gates"))
        bad = sorted(set(modes) - set(MODES))
        if bad:
            raise GenerationError(f"unknown composition mode(s) {bad}; expected {' or '.join(MODES)}")
    if answers is not None:
        answers = list(answers)
        if len(answers) != n:
            raise GenerationError(f"answers need one form (or None) per prompt: {len(answers)} for {n} prompts")
    if n == 0:
        return GenerationResult([], [], [], [], 0.0)
    context = model_context_length(model)
    try:
        texts = [format_prompt(tokenizer, p, config.prompt_format) if isinstance(p, str) else p for p in prompts]
    except ValueError as exc:
        raise GenerationError(str(exc)) from None
    ids = encode_prompts(tokenizer, texts, context=context)
    budgets = [token_budget(config.max_new_tokens, len(r), context) for r in ids]

    device = model_device(model)
    sampler = Sampler.of(config, device)  # one generator for the whole call, as the rows were drawn before
    result = GenerationResult([""] * n, [0] * n, ["length"] * n, [0.0] * n, 0.0, [[] for _ in range(n)])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="generate", unit="req", file=sys.stderr, leave=False)
    decoder = Decoder(model, tokenizer, handle, config, _ResultSink(result, t0, stream, bar))
    for i in range(n):
        decoder.add(i, DecodeRow(ids[i], budgets[i], None if gates is None else gates[i], config.stop_strings,
                                 sampler, stream=stream is not None, mode=None if modes is None else modes[i],
                                 answer=None if answers is None else answers[i]))

    # Longest prompts first: the largest batch (in memory) runs first, so a size problem shows at once.
    order = sorted(range(n), key=lambda i: -len(ids[i]))
    was_training = model.training
    model.eval()
    previous = (handle.state.gates, handle.state.row_modes) if handle is not None else None
    try:
        decoder.run(order)
    finally:
        if handle is not None:
            handle.state.gates, handle.state.row_modes = previous
        model.train(was_training)
        if bar is not None:
            bar.close()
    result.batches, result.forward_calls = len(decoder.admissions), decoder.forward_calls
    result.extra["admissions"] = decoder.admissions
    result.seconds = time.perf_counter() - t0
    return result


class _ResultSink:
    """The sink of :func:`generate_detailed`: fills a :class:`GenerationResult` by request index."""

    def __init__(self, result: GenerationResult, t0: float, stream, bar):
        self.result, self.t0, self.stream, self.bar = result, t0, stream, bar

    def first_token(self, row: int, at: float) -> None:
        self.result.first_token_s[row] = at - self.t0

    def text(self, row: int, piece: str) -> None:
        self.stream(piece)

    def finished(self, row: int, text: str, tokens: list[int], reason: str) -> None:
        r = self.result
        r.texts[row], r.num_tokens[row], r.finish_reasons[row], r.token_ids[row] = text, len(tokens), reason, tokens
        if self.bar is not None:
            self.bar.update(1)


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
    "GenerationConfig",
    "GenerationError",
    "GenerationResult",
    "PromptError",
    "Sampler",
    "Selection",
    "answer_complete",
    "encode_prompts",
    "frozen_selection",
    "generate",
    "generate_detailed",
    "is_looping",
    "mixture_selection",
    "model_context_length",
    "model_device",
    "parse_expert_spec",
    "spec_selection",
    "token_budget",
]
