"""Batched generation where every request carries its own expert gates, all served together.

Requests with different experts or mixtures share the same batches: each sequence has one gate row
(E,) that every injected layer broadcasts over that sequence's tokens, so one forward per decoding
step serves the whole batch (the Punica / S-LoRA way) instead of one pass per adapter. A zero gate
row means the frozen student for that request.

The loop is a lean one written here (not ``model.generate``):

* requests are sorted by prompt length and cut into batches of ``batch_size`` (similar lengths
  waste little padding), then the results are put back in request order;
* prompts are left-padded; the attention mask hides the padding and the position ids count only
  real tokens (``cumsum(mask) - 1``), so a padded request computes what it computes alone;
* the prompts are run once (prefill) into a ``DynamicCache``, in runs of similar length, each run
  padded only to its own longest prompt; the runs' caches are then left-padded and stacked so the
  batch decodes as one. Only the last position's logits are computed (``logits_to_keep=1``: the
  vocabulary projection is the largest matmul of a small LM);
* each step feeds one token per live sequence; a sequence that finishes (stop string, EOS, its
  token budget) is dropped from the batch, its KV cache rows and its gate row with it, so finished
  requests cost nothing;
* greedy by default; sampling with temperature / top-p draws from one seeded ``torch.Generator``,
  so the same prompts, gates and config give the same texts.

The loop is a :class:`Decoder`, one state object driven step by step: ``generate_detailed`` runs a
fixed list of requests through it, the HTTP server (``serve_loop``) feeds it requests as they arrive,
each row with its own budget, stop strings and sampler.

The text returned for a request is its decoded continuation, cut just after the first stop string
(the stop string included), without the EOS token.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .answers import ANSWER_MARKER
from .data import PROMPT_FORMATS, encode_prompt, format_prompt
from .experts import ExpertBank
from .inject import MixtureHandle

FINISH_REASONS = ("stop", "eos", "length", "answer", "loop")
# A request whose last LOOP_REPEATS * p tokens are one p-token piece repeated (p <= LOOP_MAX_PERIOD)
# has entered a cycle greedy decoding never leaves ("-->\n\n-->", "1. 1. 1."): it ends there.
LOOP_REPEATS = 4
LOOP_MAX_PERIOD = 16
# The answer line is looked for in a tail of this many tokens (marker, blank lines, answer).
ANSWER_WINDOW = 48
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


class GenerationError(ValueError):
    """A request that cannot be served (empty prompt, too long, bad gates or expert spec)."""


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
            "answer" (``stop_after_answer``) or "loop" (``stop_on_loop``).
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
# expert specs


def parse_expert_spec(spec: str, bank: ExpertBank) -> torch.Tensor:
    """Gate vector (E,) from an expert spec.

    ``"gsm8k"`` is one expert with weight 1; ``"gsm8k,svamp"`` gives the listed experts equal
    weights summing to 1 (as ``ExpertBank.weights_vector`` does for a list); ``"gsm8k=0.7,svamp=0.3"``
    gives explicit weights (any real number, negative included, as the mixing search produces).

    Args:
        spec: the spec text.
        bank: the bank whose expert names the spec refers to.

    Returns:
        (E,) float32 gate vector in the bank's expert order.

    Raises:
        GenerationError: an empty piece, a weight that does not parse, a name given twice, or weights
            on some experts but not on others.
        ExpertBankError: an unknown expert name (the message lists the known ones).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise GenerationError("empty expert spec: name one or more experts, e.g. 'gsm8k' or 'gsm8k=0.7,svamp=0.3'")
    pieces = [p.strip() for p in spec.split(",")]
    names: list[str] = []
    weights: list[float | None] = []
    for piece in pieces:
        if not piece:
            raise GenerationError(f"expert spec {spec!r} has an empty piece (a stray comma?)")
        name, eq, w = piece.partition("=")
        name = name.strip()
        if not name:
            raise GenerationError(f"expert spec piece {piece!r} has no expert name")
        if eq:
            try:
                value = float(w.strip())
            except ValueError:
                raise GenerationError(
                    f"expert spec piece {piece!r}: weight {w.strip()!r} is not a number"
                ) from None
            if value != value or value in (float("inf"), float("-inf")):
                raise GenerationError(f"expert spec piece {piece!r}: weight must be finite")
            weights.append(value)
        else:
            weights.append(None)
        if name in names:
            raise GenerationError(f"expert spec {spec!r} names {name!r} twice")
        bank.index(name)  # raises with the known names
        names.append(name)
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise GenerationError(
            f"expert spec {spec!r}: give a weight to every expert ('a=0.7,b=0.3') or to none ('a,b')"
        )
    if all(given):
        return bank.weights_vector(dict(zip(names, weights)))
    return bank.weights_vector(names)


@dataclass
class Selection:
    """What one request runs with.

    Attributes:
        gate: (E,) gate row (zeros: the frozen student); None when no bank is loaded.
        mode: composition, "output" or "weight".
        label: how the request named it (for output records and messages).
        router: a router mixture (served in its own group), else None.
    """

    gate: torch.Tensor | None
    mode: str
    label: str
    router: object | None = None

    @property
    def group(self) -> tuple:
        """Requests of one group can decode in one batch: composition mode and router are model-wide."""
        return (self.mode, str(self.router.router) if self.router is not None else None)


def frozen_selection(bank: ExpertBank | None) -> Selection:
    """The frozen student: a zero gate row (no gate at all without a bank)."""
    return Selection(None if bank is None else torch.zeros(bank.num_experts), "output", "frozen student")


def spec_selection(spec: str, bank: ExpertBank, mode: str | None) -> Selection:
    """An expert spec (``parse_expert_spec``), output composition unless ``mode`` says otherwise."""
    return Selection(parse_expert_spec(spec, bank), mode or "output", spec)


def mixture_selection(path: str, bank: ExpertBank, bank_dir: str | None, mode: str | None) -> Selection:
    """A mixture file, checked against ``bank``; its own mode unless ``mode`` overrides it."""
    from .mixture import check_mixture_bank, load_mixture

    m = load_mixture(path)
    check_mixture_bank(m, bank, bank_dir=bank_dir)
    if m.method == "router":
        return Selection(None, mode or m.mode, str(path), router=m)
    return Selection(m.weight_vector(bank), mode or m.mode, str(path))


# ------------------------------------------------------------------------------------------------
# helpers


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


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(gen_cfg, "eos_token_id", None)):
        if src is None:
            continue
        ids.update([int(src)] if isinstance(src, int) else [int(t) for t in src])
    return ids


def _pad_id(tokenizer, eos: set[int]) -> int:
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return min(eos) if eos else 0


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


def _stop_cut(text: str, stops: Sequence[str]) -> int | None:
    """End index of the earliest-ending stop string in ``text``, or None."""
    ends = [i + len(s) for s in stops if (i := text.find(s)) >= 0]
    return min(ends) if ends else None


def _device_of(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


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

    Returns:
        The generated continuation per prompt, in prompt order.
    """
    return generate_detailed(model, tokenizer, prompts, handle=handle, gates=gates, config=config,
                             stream=stream, progress=progress).texts


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
) -> GenerationResult:
    """:func:`generate` with token counts, finish reasons and time to first token per request."""
    t0 = time.perf_counter()
    config = config or GenerationConfig()
    if isinstance(prompts, str):
        raise GenerationError("prompts must be a sequence of strings, not one string (wrap it in a list)")
    prompts = list(prompts)
    n = len(prompts)
    if stream is not None and n != 1:
        raise GenerationError(f"streaming serves a single prompt, got {n}")
    gates = _check_gates(gates, handle, n)
    if n == 0:
        return GenerationResult([], [], [], [], 0.0)
    context = model_context_length(model)
    try:
        texts = [format_prompt(tokenizer, p, config.prompt_format) if isinstance(p, str) else p for p in prompts]
    except ValueError as exc:
        raise GenerationError(str(exc)) from None
    ids = encode_prompts(tokenizer, texts, context=context)
    budgets = [token_budget(config.max_new_tokens, len(r), context) for r in ids]

    device = _device_of(model)
    sampler = Sampler.of(config, device)  # one generator for the whole call, as the rows were drawn before
    result = GenerationResult([""] * n, [0] * n, ["length"] * n, [0.0] * n, 0.0, [[] for _ in range(n)])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="generate", unit="req", file=sys.stderr, leave=False)
    decoder = Decoder(model, tokenizer, handle, config, _ResultSink(result, t0, stream, bar))
    for i in range(n):
        decoder.add(i, DecodeRow(ids[i], budgets[i], None if gates is None else gates[i], config.stop_strings,
                                 sampler, stream=stream is not None))

    # Longest prompts first: the largest batch (in memory) runs first, so a size problem shows at once.
    order = sorted(range(n), key=lambda i: -len(ids[i]))
    was_training = model.training
    model.eval()
    previous_gates = handle.state.gates if handle is not None else None
    try:
        decoder.run(order)
    finally:
        if handle is not None:
            handle.state.gates = previous_gates
        model.train(was_training)
        if bar is not None:
            bar.close()
    result.batches, result.forward_calls = len(decoder.admissions), decoder.forward_calls
    result.extra["admissions"] = decoder.admissions
    result.seconds = time.perf_counter() - t0
    return result


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


def _prefill(model, prompts: list[list[int]], g, handle, pad, device):
    """Run the prompts of one batch (sorted by decreasing length) into a KV cache.

    Prompts of similar length are prefilled together (``_prefill_chunks``), each run padded only to
    its own longest prompt; the runs' caches are then left-padded to the batch's longest prompt
    and stacked, so decoding continues as one batch. Padded key/value slots are hidden by the
    attention mask, so the result is the one-big-batch result without its padding work.

    Returns:
        ``(cache, logits (b, V) at each prompt's last position, mask (b, L), last positions (b,),
        forward calls made)``.
    """
    from transformers import DynamicCache

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
            handle.set_gates(None if g is None else g[lo:hi])  # None or all-zero rows: the frozen student
        cache = DynamicCache(config=model.config)
        logits.append(_last_position_logits(model, input_ids, mask, positions, cache))
        caches.append(cache)
        masks.append(torch.nn.functional.pad(mask, (width - w, 0)))
    mask = torch.cat(masks)
    last_pos = torch.tensor([n - 1 for n in lengths], device=device)
    if len(caches) == 1:
        return caches[0], logits[0], mask, last_pos, 1
    merged = DynamicCache(config=model.config)
    for layer in range(len(caches[0].layers)):
        keys, values = [], []
        for (lo, _hi), c in zip(chunks, caches):
            left = width - lengths[lo]  # (b_c, H, L_c, D) -> (b_c, H, L, D)
            keys.append(torch.nn.functional.pad(c.layers[layer].keys, (0, 0, left, 0)))
            values.append(torch.nn.functional.pad(c.layers[layer].values, (0, 0, left, 0)))
            c.layers[layer].keys = c.layers[layer].values = None  # free as we go
        merged.update(torch.cat(keys), torch.cat(values), layer)
    return merged, torch.cat(logits), mask, last_pos, len(chunks)


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
                    cat(a.seen, b.seen))


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
                    pick(run.g), pick(run.seen))


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
    """

    ids: list[int]
    budget: int
    gate: torch.Tensor | None
    stops: tuple[str, ...]
    sampler: Sampler
    stream: bool = False


class DecodeSink(Protocol):
    """Where a :class:`Decoder` reports its rows' progress (from the thread that runs it)."""

    def first_token(self, row: int, at: float) -> None:
        """The row's first token was picked at ``time.perf_counter()`` value ``at``."""

    def text(self, row: int, piece: str) -> None:
        """New text of a streaming row (never taken back later)."""

    def finished(self, row: int, text: str, tokens: list[int], reason: str) -> None:
        """The row ended: its text, its token ids and one of ``FINISH_REASONS``."""


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
        self.device = _device_of(model)
        eos = _eos_ids(model, tokenizer)
        self.pad = _pad_id(tokenizer, eos)
        self.eos = set() if config.ignore_eos else eos
        self.eos_index = torch.tensor(sorted(eos), device=self.device) if (eos and config.ignore_eos) else None
        self.penalty = float(config.repetition_penalty)
        self.rows: dict[int, DecodeRow] = {}
        self.tokens: dict[int, list[int]] = {}
        self.emitted: dict[int, int] = {}  # characters of each streaming row already reported
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
        g = None
        if self.handle is not None and self.rows[rows[0]].gate is not None:
            g = torch.stack([self.rows[r].gate for r in rows]).to(self.device)  # (b, E)
        # Requests with the same prompt and gate (n samples of one question) share one prefill: the
        # distinct ones run, then their cache rows, logits and positions are repeated per request.
        keys = [(tuple(self.rows[r].ids), None if g is None else tuple(g[j].tolist())) for j, r in enumerate(rows)]
        first = {}
        for j, k in enumerate(keys):
            first.setdefault(k, j)
        distinct = sorted(first.values())
        where = {k: distinct.index(j) for k, j in first.items()}
        cache, logits, mask, last_pos, calls = _prefill(self.model, [self.rows[rows[j]].ids for j in distinct],
                                                        None if g is None else g[distinct], self.handle, self.pad,
                                                        self.device)
        if len(distinct) < len(rows):
            idx = torch.tensor([where[k] for k in keys], device=self.device)
            cache.reorder_cache(idx)  # index_select on the batch axis: repeated rows are copies
            logits, mask, last_pos = logits[idx], mask[idx], last_pos[idx]
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=self.device) if self.penalty > 1.0 else None
        new = _Running(list(rows), cache, mask, last_pos, logits, g, seen)
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
        nxt = _pick_tokens(logits, [self.rows[r].sampler for r in run.rows])  # (b,)
        if run.seen is not None:
            run.seen.scatter_(1, nxt[:, None], True)
        picked = nxt.tolist()  # one host sync per step: finishing decisions need the tokens
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
                if r not in finished and is_looping(self.tokens[r]):
                    finished[r] = "loop"
        return nxt, finished

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
            self.handle.set_gates(run.g)
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


def _stop_window(stops: Sequence[str]) -> int:
    """Tokens decoded from a row's tail to look for its stop strings: the longest one's bytes (a token
    holds at least one byte) plus ``_STOP_WINDOW_SLACK``."""
    return max(len(s.encode("utf-8")) for s in stops) + _STOP_WINDOW_SLACK


__all__ = [
    "FINISH_REASONS",
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
    "parse_expert_spec",
    "spec_selection",
    "token_budget",
]
