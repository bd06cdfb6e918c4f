"""Mix: combine a bank's experts for a target task (seen or unseen) from a handful of examples.

The objective, as in the MoDE-CoTD paper (LoraHub-style), for a weight vector ``w`` (E,)::

    f(w) = mean supervised cross-entropy on the shots under gate w  +  l1 * mean_e |w_e|

Methods:

* ``search`` (the paper's): nevergrad's NGOpt over one weight per expert, bounds [-3, 3], start at
  0, ``budget`` evaluations. Seeded: the same seed gives the same weights. The result is the best
  evaluated candidate (the objective is deterministic, so no re-evaluation is needed).
* ``gradient``: the same objective minimized by Adam on ``w`` through the kernel's dG path (the gates
  require grad), clamped to the bounds after each step; ``budget`` forward+backward evaluations;
  the result is the best evaluated ``w`` (w = 0 included). It starts at 0 in output mode and at
  1/E in weight mode, where 0 is a stationary point (the update is quadratic in w).
* ``router``: per-layer, per-token routers (E, K), gates ``softmax(R x)`` (optionally top-k), trained
  with the experts FROZEN on the seen tasks' data for ``budget`` steps; the shots only measure it.
* ``uniform``: ``w_e = 1/E`` (the plain average, a baseline).

Cost model: the experts are injected ONCE; evaluating a candidate is one forward pass over the
shots with new gate values (``handle.set_gates``), under ``torch.no_grad`` for the search. No state
dict is rewritten, no weight is merged, the model is never reloaded.

:func:`mix` checks its arguments, borrows the injected model (``_mixing``: a caller's handle is
given back as it came, through ``MixtureHandle.restoring``), runs the method named in
``MIX_METHODS`` (each takes a :class:`MixCall` and returns what it :class:`Found`), optionally
checks finalists by generation, and returns the ``Mixture``.

Which "mix" is which: ``engine/mix.py`` finds the gates (the mixing methods, :func:`mix`),
``engine/mixture.py`` saves and loads the result (``Mixture``, the file format), the kernels' op
``lora_mixture`` (``kernels/ops.py``) applies gate rows to the experts inside a layer,
``cli/mix.py`` is the ``mix`` command and ``bench/mix.py`` its benchmark.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from .answers import answers_match, extract_answer, infer_task_type
from .data import Batch, DataError, collate, pad_token_id, tokenize_records
from .experts import ExpertBank
from .inject import MixtureHandle, MixtureLinear, inject_experts
from .loss import supervised_loss
from .mixture import METHODS, Mixture, bank_record
from ..kernels import MODES
from ..kernels.router import routing_gates

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 40
# Level of the check's sign test: with five shots a candidate replaces the prior only by answering
# all five where the prior answers none (1/32); of twenty shots the two answer differently, 15.
SIGN_TEST_ALPHA = 0.05
DEFAULT_L1 = 0.05
DEFAULT_BOUNDS = (-3.0, 3.0)
DEFAULT_MAX_LEN = 512
# Shots per forward pass: the paper's 5 shots (or up to 16) are ONE forward per candidate.
DEFAULT_SHOTS_BATCH = 16
# NOTE: Adam on E weights in [-3, 3]. On shots written by one expert (tiny Llama, 3 experts, tests/
# test_mix.py's setting) lr 0.1 stalled in a local minimum in both modes within 40 steps (objective
# 6.3 -> 5.8-6.0) while 0.2 reached the optimum (-> 3.1-3.3, as the search); 0.3 oscillated more.
DEFAULT_GRADIENT_LR = 0.2
DEFAULT_ROUTER_LR = 5e-3
DEFAULT_ROUTER_BATCH = 8


# ------------------------------------------------------------------------------------------ shots
def check_shots(shots: Sequence[dict], *, where: str = "shots") -> list[dict]:
    """Return ``shots`` as a list after checking each is ``{"input": str, "output": str}`` with text.

    Raises:
        DataError: no shots, a record that is not an object, or an empty input or output; the
            message names ``where`` and the record index.
    """
    shots = list(shots)
    if not shots:
        raise DataError("no shots: at least one example of the target task is needed", path=where)
    for i, rec in enumerate(shots):
        if not isinstance(rec, Mapping):
            raise DataError(f"expected an object with 'input' and 'output', got {type(rec).__name__}",
                            path=where, index=i)
        for key in ("input", "output"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise DataError(f"'{key}' must be a non-empty string (shots need the rationale and answer "
                                "to score the experts)", path=where, index=i)
    return shots


def prepare_shots(
    shots: Sequence[dict],
    tokenizer,
    *,
    target: str,
    max_len: int = DEFAULT_MAX_LEN,
    batch_size: int = DEFAULT_SHOTS_BATCH,
    device: torch.device | str = "cpu",
    prompt_format: str = "plain",
) -> list[Batch]:
    """Tokenize the shots (loss on the output only) into padded batches on ``device``, prompts in
    ``prompt_format`` (the bank's: the experts are scored in the format they were trained in).

    Raises:
        DataError: a bad record, or every shot too long for ``max_len``.
    """
    examples, stats = tokenize_records(shots, tokenizer, task=target, max_len=max_len, prompt_format=prompt_format)
    if not examples:
        raise DataError(f"every shot is longer than max_len={max_len} tokens in its output alone", path="shots")
    if stats["dropped"]:
        log.warning("%d of %d shots dropped: output longer than max_len=%d", stats["dropped"], len(shots), max_len)
    return [collate(examples[i:i + batch_size], {target: 0}, pad_token_id(tokenizer)).to(device)
            for i in range(0, len(examples), batch_size)]


def _supervised_count(batch: Batch) -> int:
    return int((batch.labels[:, 1:] != -100).sum())


# -------------------------------------------------------------------------------------- objective
class ShotsObjective:
    """``f(w) = mean supervised CE on the shots under gate w + l1 * mean|w|``.

    One evaluation is one forward pass per shots batch (one in total for up to 16 shots) through
    the injected model, with ``w`` broadcast as every sequence's gate. Batches are combined by their
    supervised token counts, so the loss is the token mean over all shots whatever the batching.

    Args:
        handle: the injected model (its mode is the composition evaluated).
        batches: the shots, from :func:`prepare_shots`.
        l1: weight of the L1 penalty.
        on_eval: called with the CE part after every evaluation (a progress display).
    """

    def __init__(self, handle: MixtureHandle, batches: Sequence[Batch], l1: float,
                 on_eval: Callable[[float], None] | None = None):
        self.handle = handle
        self.batches = list(batches)
        self.l1 = float(l1)
        self.counts = [_supervised_count(b) for b in self.batches]
        self.total = sum(self.counts)
        self.evaluations = 0
        self.num_experts = handle.bank.num_experts
        self.on_eval = on_eval

    def _count(self, ce: float) -> None:
        self.evaluations += 1
        if self.on_eval is not None:
            self.on_eval(ce)

    def _gate(self, w: torch.Tensor, rows: int) -> torch.Tensor:
        return w.reshape(1, -1).expand(rows, self.num_experts)

    def loss(self, w: torch.Tensor) -> float:
        """Mean CE on the shots under ``w`` (E,), no gradient."""
        total = 0.0
        with torch.no_grad():
            for batch, n in zip(self.batches, self.counts):
                with self.handle.gated(self._gate(w.detach(), batch.input_ids.shape[0])):
                    total += float(_batch_loss(self.handle.model, batch)) * n
        self._count(total / self.total)
        return total / self.total

    def penalty(self, w: torch.Tensor) -> torch.Tensor:
        return self.l1 * w.abs().mean()

    def __call__(self, w: torch.Tensor) -> float:
        """f(w), no gradient."""
        return self.loss(w) + float(self.penalty(w.detach()))

    def value_and_grad(self, w: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """(f(w), CE part, df/dw (E,)): one forward+backward per batch, through the dG path."""
        w = w.detach().clone().requires_grad_(True)
        total = 0.0
        for batch, n in zip(self.batches, self.counts):
            with self.handle.gated(self._gate(w, batch.input_ids.shape[0])):
                part = _batch_loss(self.handle.model, batch) * (n / self.total)
            part.backward()  # one graph at a time: memory stays one batch's
            total += float(part.detach())
        pen = self.penalty(w)
        pen.backward()
        self._count(total)
        return total + float(pen.detach()), total, w.grad.detach().clone()


def _batch_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return supervised_loss(model, batch.input_ids, batch.attention_mask, batch.labels)


# ---------------------------------------------------------------------------------------- methods
@dataclass
class MethodResult:
    """What a method found: weights (E,), the objective there, and the trace of evaluated objectives."""

    weights: torch.Tensor
    objective: float
    trace: list[float]
    ranked: list[tuple[torch.Tensor, float]] = field(default_factory=list)  # distinct candidates, best first


class WeightSearch:
    """NGOpt over one weight per expert, driven one candidate at a time (ask, evaluate, tell).

    Candidates equal to one already evaluated (NGOpt's COBYLA asks for its start point again) are
    answered from a cache: ``ask`` returns their value and no forward pass is needed.

    Args:
        num_experts: E.
        budget: candidates the optimizer asks for.
        bounds: (low, high) for every weight.
        seed: seeds the parametrization's random state: same seed, same candidates, same result.
        start_value: f(0) when already known (cached, and a candidate for the best).
        start: the point the optimizer starts from (default 0).
        known: ``(w, f(w))`` pairs already evaluated: cached, and candidates for the best.
    """

    def __init__(self, num_experts: int, *, budget: int = DEFAULT_BUDGET,
                 bounds: tuple[float, float] = DEFAULT_BOUNDS, seed: int = 0, start_value: float | None = None,
                 start: torch.Tensor | None = None, known: Sequence[tuple[torch.Tensor, float]] = ()):
        import nevergrad as ng
        import numpy as np

        self._np = np
        lo, hi = bounds
        init = np.zeros(num_experts) if start is None else start.double().numpy()
        param = ng.p.Array(init=init).set_bounds(lo, hi)
        param.random_state = np.random.RandomState(seed)
        with _quiet_scipy():
            self.opt = ng.optimizers.NGOpt(parametrization=param, budget=budget, num_workers=1)
        self.budget = budget
        self.cache: dict[bytes, float] = {}
        self.points: dict[bytes, torch.Tensor] = {}  # the candidate behind each cache entry
        self.best_w, self.best_f = torch.zeros(num_experts), math.inf
        if start_value is not None:
            known = [(torch.zeros(num_experts), start_value), *known]
        for w, value in known:
            key = w.double().numpy().tobytes()
            self.cache[key], self.points[key] = float(value), w.float()
            if value < self.best_f:
                self.best_w, self.best_f = w.float(), float(value)
        self.trace: list[float] = []
        self._pending = None

    @property
    def done(self) -> bool:
        return len(self.trace) >= self.budget

    def ask(self) -> tuple[torch.Tensor, float | None]:
        """The next candidate w (E,) and its cached objective (None: evaluate it, then ``tell``)."""
        with _quiet_scipy():
            cand = self.opt.ask()
        x = self._np.asarray(cand.value, dtype=self._np.float64)
        self._pending = (cand, x)
        return torch.from_numpy(x).float(), self.cache.get(x.tobytes())

    def tell(self, value: float) -> None:
        cand, x = self._pending
        self._pending = None
        value = float(value)
        self.cache[x.tobytes()] = value
        self.points[x.tobytes()] = torch.from_numpy(x).float()
        with _quiet_scipy():
            self.opt.tell(cand, value)
        self.trace.append(value)
        if value < self.best_f:
            self.best_w, self.best_f = torch.from_numpy(x).float(), value

    def result(self) -> MethodResult:
        ranked = sorted(self.cache, key=self.cache.get)
        return MethodResult(self.best_w, self.best_f, list(self.trace),
                            [(self.points[k], self.cache[k]) for k in ranked])


@contextmanager
def _quiet_scipy():
    """NGOpt picks COBYLA for small budgets; scipy then warns about its own default radii/limits."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(RHOEND|MAXFUN).*")
        yield


def search_weights(
    objective: Callable[[torch.Tensor], float],
    num_experts: int,
    *,
    budget: int = DEFAULT_BUDGET,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    seed: int = 0,
    start_value: float | None = None,
    start: torch.Tensor | None = None,
    known: Sequence[tuple[torch.Tensor, float]] = (),
) -> MethodResult:
    """Gradient-free search with nevergrad's NGOpt over one weight per expert, starting at ``start``
    (default 0).

    Args:
        objective: w (E,) -> float.
        num_experts: E.
        budget: candidates the optimizer asks for (a candidate equal to one already evaluated,
            e.g. the start point, is answered from a cache and costs no forward pass).
        bounds: (low, high) for every weight.
        seed: seeds the parametrization's random state: same seed, same candidates, same result.
        start_value: f(0) when already known (it is then cached and not evaluated again).
        start: the optimizer's start point.
        known: points already evaluated, ``(w, f(w))``: cached and candidates for the best.
    Returns:
        The best evaluated candidate.
    """
    search = WeightSearch(num_experts, budget=budget, bounds=bounds, seed=seed, start_value=start_value,
                          start=start, known=known)
    while not search.done:
        w, cached = search.ask()
        search.tell(cached if cached is not None else objective(w))
    return search.result()


def gradient_weights(
    objective: ShotsObjective,
    num_experts: int,
    *,
    budget: int = DEFAULT_BUDGET,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    lr: float = DEFAULT_GRADIENT_LR,
    start: torch.Tensor | None = None,
    start_value: float | None = None,
) -> MethodResult:
    """Adam on w with the gradient of the objective from the kernel's dG path.

    Each of the ``budget`` steps is one forward+backward; after each step w is clamped to
    ``bounds``. The subgradient of |w| at 0 is 0, so the L1 term never pushes a weight off 0 alone.

    Args:
        start: initial w (E,); default 0. In weight mode 0 is a stationary point (the update
            ``(sum w B)(sum w A)`` is quadratic in w), so :func:`mix` starts there from 1/E.
        start_value: f(0) when already measured: w = 0 then competes for the best w.
    Returns:
        The best evaluated w.
    """
    lo, hi = bounds
    w = (torch.zeros(num_experts) if start is None else start.detach().float().clone()).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best_w, best_f, trace = torch.zeros(num_experts), math.inf, []
    if start_value is not None:
        best_f = float(start_value)
    for _ in range(budget):
        f, _ce, grad = objective.value_and_grad(w)
        trace.append(f)
        if f < best_f:
            best_w, best_f = w.detach().clone(), f
        w.grad = grad
        opt.step()
        with torch.no_grad():
            w.clamp_(lo, hi)
    return MethodResult(best_w, best_f, trace)


def train_router(
    handle: MixtureHandle,
    tokenizer,
    router_data: Mapping[str, Sequence[dict]],
    *,
    steps: int,
    top_k: int = 0,
    seed: int = 0,
    lr: float = DEFAULT_ROUTER_LR,
    batch_size: int = DEFAULT_ROUTER_BATCH,
    max_len: int = DEFAULT_MAX_LEN,
    on_step: Callable[[float], None] | None = None,
) -> list[float]:
    """Attach fresh routers and train them (experts and student frozen) on the tasks' records.

    Each batch draws its rows task-uniformly (a task at random, then one of its examples), so a
    large task does not drown the others; draws are seeded by ``seed``.

    Args:
        handle: the injected model; its routers are replaced by fresh trainable ones.
        tokenizer: the student's tokenizer.
        router_data: task name -> training-format records (rationale, ``-->``, answer).
        steps: optimizer steps (one forward+backward each).
        top_k: 0 for dense softmax gates, else keep the k largest per token.
        lr: Adam learning rate on the routers.
        batch_size: rows per step.
        max_len: tokens per example.
        on_step: called with each step's loss (a progress display).
    Returns:
        The loss of every step.
    """
    if not router_data:
        raise DataError("router training needs the seen tasks' data (task -> records); none given", path="router data")
    examples = {}
    for task, records in sorted(router_data.items()):
        exs, _ = tokenize_records(check_shots(records, where=f"router data {task}"), tokenizer, task=task,
                                  max_len=max_len)
        if not exs:
            raise DataError(f"every record is longer than max_len={max_len}", path=f"router data {task}")
        examples[task] = exs
    tasks = list(examples)
    task_index = {t: i for i, t in enumerate(tasks)}
    pad = pad_token_id(tokenizer)
    device = next(iter(handle.layers.values())).base.weight.device
    params = handle.attach_router(top_k=top_k, trainable=True, seed=seed)
    opt = torch.optim.Adam(params, lr=lr)
    rng = random.Random(f"router/{seed}")
    losses = []
    for step in range(steps):
        rows = []
        for _ in range(batch_size):
            exs = examples[tasks[rng.randrange(len(tasks))]]
            rows.append(exs[rng.randrange(len(exs))])
        batch = collate(rows, task_index, pad).to(device)
        loss = _batch_loss(handle.model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(losses[-1])
        if step % 20 == 0 or step == steps - 1:
            log.info("router step %d/%d loss %.4f", step + 1, steps, losses[-1])
    for p in params:
        p.requires_grad_(False)
    return losses


def mean_routing(handle: MixtureHandle, batches: Sequence[Batch]) -> torch.Tensor:
    """(E,) the routers' gate averaged over every layer and every real token of ``batches``."""
    sums, count = None, 0
    current: dict[str, torch.Tensor] = {}

    def hook(layer: MixtureLinear, args, _out):
        g = routing_gates(args[0].detach(), layer.router, layer.top_k).float()  # (B, L, E)
        mask = current["mask"].unsqueeze(-1).to(g.dtype)
        nonlocal sums, count
        s = (g * mask).sum((0, 1))
        sums = s if sums is None else sums + s
        count += int(current["mask"].sum())

    hooks = [layer.register_forward_hook(hook) for layer in handle.layers.values()]
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.attention_mask
                handle.model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return (sums / max(count, 1)).cpu()


# -------------------------------------------------------------------------------------------- mix
def pick_by_generation(handle: MixtureHandle, tokenizer, shots: Sequence[dict], target: str,
                       candidates: Sequence[tuple[torch.Tensor, float]], config,
                       default: int | None = None, alpha: float = SIGN_TEST_ALPHA,
                       progress: bool = False) -> tuple[int, list[dict]]:
    """Generate every shot's answer under every candidate gate (one batched call) and pick the
    candidate that answers most shots correctly; ties go to more shots answered at all, then to the
    ``default`` candidate, then to the lower objective.

    The shots loss measures how well a mixture *scores* the teacher's text, not whether the student
    writes an answer with it: on unseen tasks mixtures that lowered the loss were measured looping
    (``-->`` or ``1. 1. 1.`` repeated) on most questions, and five shots rarely separate candidates
    by correct answers. So without evidence from generation the prior stays: ``default`` is the
    target's own expert for a seen task and w = 0 (the frozen student) for an unseen one
    (:func:`mix` adds both to the candidates). Measured on real data (docs/real-data.md): breaking
    ties by the objective chose mixtures that answered 0 of 40 coin-flip and 7 of 40 OpenBookQA
    questions, against 40 and 25 for the student; breaking them by w = 0 everywhere lost the seen
    tasks' own experts. One shot of five is within noise too: a mixture that answered 2 StrategyQA
    shots right where the student answered 1 answered 7 of 40 questions at all (the student 38),
    and a fixed margin of two shots of five was noise too: for object tracking the student answered
    3 of 5 shots right and the task's own expert 1, so the check kept the student, 25.6% on held-out
    questions where the expert scores 43.6%. So the default is replaced only when the shots are
    evidence at level ``alpha`` (:func:`beats_prior`: a one-sided sign test over the shots the two
    answer differently; with five shots, all five must go the candidate's way).

    Args:
        candidates: ``(w (E,), objective)`` pairs.
        config: the ``GenerationConfig`` of the check (its prompt format should be the bank's).
        default: index of the candidate kept on a tie (None: the objective decides).
        alpha: level of the sign test that lets a candidate replace ``default``.
        progress: a progress bar over the generations.
    Returns:
        ``(index of the chosen candidate, per-candidate records {weights, objective, correct, answered})``.
    """
    from .evaluate import gold_answer
    from .generate import generate_detailed

    golds = [gold_answer(s["output"]) for s in shots]
    task_type = infer_task_type(target, golds, default="text")  # text: the answer line, compared exactly
    prompts = [s["input"] for s in shots] * len(candidates)
    gates = torch.stack([w for w, _ in candidates for _ in shots])  # (C * S, E)
    forms = None
    if config.guide_answers:
        from .answer_guide import AnswerForm

        forms = [AnswerForm.of(task_type, p) for p in prompts]
    texts = generate_detailed(handle.model, tokenizer, prompts, handle=handle, gates=gates, config=config,
                              answers=forms, progress=progress).texts
    records = []
    for c, (w, value) in enumerate(candidates):
        preds = [extract_answer(t, task_type, question=s["input"])
                 for t, s in zip(texts[c * len(shots):(c + 1) * len(shots)], shots)]
        right = [p is not None and answers_match(p, g, task_type) for p, g in zip(preds, golds)]
        records.append({"weights": [round(float(x), 4) for x in w], "objective": value,
                        "correct": sum(right), "answered": sum(p is not None for p in preds),
                        "right": [int(r) for r in right], "has_answer": [int(p is not None) for p in preds]})
    best = max(range(len(candidates)), key=lambda i: (records[i]["correct"], records[i]["answered"],
                                                       i == default, -records[i]["objective"]))
    if default is not None and best != default and not beats_prior(records[best], records[default], alpha):
        best = default
    return best, records


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2)."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def beats_prior(candidate: dict, prior: dict, alpha: float = SIGN_TEST_ALPHA) -> bool:
    """Whether a candidate's shot record (``right`` and ``has_answer``: 0/1 per shot) is evidence at
    level ``alpha`` that it beats the prior's: by correct answers (a sign test over the shots exactly
    one of the two answers correctly), or, as many correct, by answers given at all (the same test
    over the shots exactly one of them answers)."""
    def discordant(key: str) -> tuple[int, int]:
        pairs = list(zip(candidate[key], prior[key]))
        return sum(c > p for c, p in pairs), sum(p > c for c, p in pairs)

    wins, losses = discordant("right")
    if wins == losses:  # as many correct answers: answers given at all decide
        wins, losses = discordant("has_answer")
    return wins > losses and sign_test_p(wins, losses) <= alpha


def mix(
    bank: ExpertBank,
    student,
    shots: Sequence[dict],
    *,
    method: str = "search",
    mode: str = "weight",
    budget: int = DEFAULT_BUDGET,
    l1: float = DEFAULT_L1,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
    seed: int = 0,
    target: str = "target",
    router_data: Mapping[str, Sequence[dict]] | None = None,
    top_k: int = 0,
    lr: float | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    batch_size: int = DEFAULT_SHOTS_BATCH,
    bank_dir: str | None = None,
    backend: str = "auto",
    handle: MixtureHandle | None = None,
    finalists: int = 0,
    verify_max_new_tokens: int = 256,
    probe_experts: bool = True,
    guide_answers: bool = False,
    progress: bool = False,
) -> Mixture:
    """Find how to combine ``bank``'s experts for ``target`` from a few examples.

    Args:
        bank: the expert bank (checked against the student).
        student: a ``Student`` (``.model`` frozen causal LM, ``.tokenizer``, ``.identity``).
        shots: records ``{"input", "output"}`` of the target task in the training format.
        method: "search" (nevergrad NGOpt, the paper's), "gradient" (Adam through dG), "router"
            (per-layer per-token routers trained on ``router_data``) or "uniform" (1/E each).
        mode: "weight" (the paper's weighted sums of A and B) or "output" composition.
        budget: search: candidates; gradient: forward+backward evaluations; router: training steps.
        l1: L1 penalty weight on mean |w| (search, gradient).
        bounds: (low, high) of every weight (search, gradient).
        seed: seed of the search and of the router's init and batches.
        target: the target task's name (recorded in the mixture).
        router_data: task -> training records for the router (required for method "router").
        top_k: router top-k (0 = dense softmax).
        lr: learning rate (gradient: default 0.2; router: default 5e-3).
        max_len: tokens per example.
        batch_size: shots per forward pass.
        bank_dir: the bank's directory, recorded (with its tensors' sha256) in the mixture.
        backend: kernel backend of the injection.
        handle: an existing injection of ``bank`` into ``student.model`` to reuse (its mode is set
            for the call and restored); None injects here and removes the layers afterwards.
        finalists: > 0 checks the result by generation (:func:`pick_by_generation`): the best
            ``finalists`` distinct candidates of the search (the result alone for gradient and
            uniform), the prior (a seen target's own expert) and w = 0 each answer the shots, and
            the prior stays unless the shots are evidence (a sign test at level 0.05) that another
            answers more of them correctly. 0: the
            objective alone decides. Not for routers.
        verify_max_new_tokens: token budget of each shot's answer in that check (greedy, the
            bank's prompt format, stops after the answer line and on loops).
        guide_answers: the check's generations have guided answers (``answer_guide``: after the
            marker only an answer of the target's type; a shot's generation that would end without one
            gets the marker written for it), as ``eval --guide-answers`` scores them.
        probe_experts: search only: first evaluate every expert alone (w = e_i, E forward passes
            besides the budget) and start the search from the best of them and w = 0. From 0 alone,
            NGOpt's COBYLA steps along the first coordinates first and a budget of 30-40 can end
            near the first expert it tried (measured on real data: seen tasks whose own expert was
            never reached).
        progress: a progress bar on stderr: objective evaluations (router: training steps) with the
            last and best shots loss, then the check's generations.
    Returns:
        The Mixture (not yet saved; see ``mixture.save_mixture``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    lo, hi = (float(b) for b in bounds)
    if not lo <= 0.0 <= hi or lo == hi:
        raise ValueError(f"bounds must satisfy low <= 0 <= high with low < high (the search starts at 0), got {bounds}")
    if not l1 >= 0:
        raise ValueError(f"l1 must be >= 0, got {l1}")
    if method == "router" and not router_data:
        raise ValueError("method 'router' needs router_data: the seen tasks' training records (task -> records)")
    shots = check_shots(shots)
    bank.check_student(student)
    model, tokenizer = student.model, student.tokenizer
    device = next(model.parameters()).device
    batches = prepare_shots(shots, tokenizer, target=target, max_len=max_len, batch_size=batch_size, device=device,
                            prompt_format=bank.prompt_format)
    if finalists < 0:
        raise ValueError(f"finalists must be >= 0, got {finalists}")

    with _mixing(model, bank, handle, mode, backend) as handle, \
            _MixProgress(progress, target, method, _expected_evaluations(method, mode, budget, bank.num_experts,
                                                                         probe_experts)) as bar:
        t0 = time.perf_counter()
        objective = ShotsObjective(handle, batches, l1, on_eval=bar.evaluation)
        # gradient in output mode evaluates w = 0 at its first step; everything else measures it here.
        loss_before = None if (method == "gradient" and mode == "output") else objective.loss(torch.zeros(bank.num_experts))
        call = MixCall(bank=bank, handle=handle, tokenizer=tokenizer, objective=objective, mode=mode, budget=budget,
                       bounds=(lo, hi), l1=l1, seed=seed, lr=lr, top_k=top_k, max_len=max_len,
                       router_data=router_data, probe_experts=probe_experts, loss_before=loss_before,
                       on_step=bar.router_step)
        found = MIX_METHODS[method](call)
        info: dict = {"shots": len(shots), "shots_tokens": objective.total, "shots_batches": len(batches), **found.info}
        if found.loss_before is not None:
            loss_before = found.loss_before
        w, objective_after, loss_after = found.weights, found.objective, found.loss
        if finalists and method != "router":
            check = _verify_config(bank, verify_max_new_tokens, guide_answers)
            bar.checking(finalists)
            w, objective_after, checked = _check_finalists(call, found, shots, target, finalists, check, loss_before,
                                                           progress=progress)
            loss_after = objective_after - float(objective.penalty(w))
            info.update(checked)
        info.update(objective_before=loss_before, objective_after=objective_after,
                    seconds=round(time.perf_counter() - t0, 3))
        evaluations = objective.evaluations + found.steps
    weights = {n: float(w[i]) for i, n in enumerate(bank.names)}
    return Mixture(
        experts=list(bank.names), weights=weights, mode=mode, method=method, seed=seed, target=target,
        bank=bank_record(bank, bank_dir), shots_loss_before=loss_before, shots_loss_after=loss_after,
        evaluations=evaluations, top_k=top_k if method == "router" else 0, info=info, router_state=found.router_state,
    )


def _expected_evaluations(method: str, mode: str, budget: int, num_experts: int, probe: bool) -> int:
    """How many objective evaluations (router: training steps) a :func:`mix` call's bar counts to."""
    before = 0 if (method == "gradient" and mode == "output") else 1  # f(0), unless the method measures it
    if method == "search":
        return before + (num_experts if probe else 0) + budget
    if method == "uniform":
        return before + 1
    return before + budget  # gradient evaluations, router steps


class _MixProgress:
    """The progress bar of one :func:`mix` call (a disabled bar when ``enabled`` is false)."""

    def __init__(self, enabled: bool, target: str, method: str, total: int):
        from tqdm.auto import tqdm

        self.desc = f"mix {target} ({method})"
        self.best = math.inf
        self.bar = tqdm(total=total, desc=self.desc, unit="step" if method == "router" else "eval",
                        disable=not enabled, dynamic_ncols=True, file=sys.stderr)

    def evaluation(self, ce: float) -> None:
        self.best = min(self.best, ce)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{ce:.4f}", best=f"{self.best:.4f}", refresh=False)

    def router_step(self, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(train_loss=f"{loss:.4f}", refresh=False)

    def checking(self, finalists: int) -> None:
        self.bar.set_description_str(f"{self.desc}: checking the {finalists} best by generation")

    def __enter__(self) -> _MixProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


@contextmanager
def _mixing(model: nn.Module, bank: ExpertBank, handle: MixtureHandle | None, mode: str,
            backend: str) -> Iterator[MixtureHandle]:
    """The injected model of one :func:`mix` call: in ``mode``, without routers, in eval mode (dropout
    off: the objective must be deterministic). A caller's handle is given back as it came (mode,
    gates, routers); one injected here is removed. The model's training flag is restored."""
    own = handle is None
    if own:
        handle = inject_experts(model, bank, mode=mode, backend=backend)
    was_training = model.training
    try:
        with nullcontext() if own else handle.restoring():
            handle.set_mode(mode)
            handle.detach_router()
            model.eval()
            yield handle
    finally:
        if own:
            handle.remove()
        model.train(was_training)


# ------------------------------------------------------------------------------------ method table
@dataclass
class MixCall:
    """What a method of :func:`mix` works with: the injected handle, the shots' objective and the
    call's settings (``mix``'s arguments of the same names, ``bounds`` as floats)."""

    bank: ExpertBank
    handle: MixtureHandle
    tokenizer: object
    objective: ShotsObjective
    mode: str
    budget: int
    bounds: tuple[float, float]
    l1: float
    seed: int
    lr: float | None
    top_k: int
    max_len: int
    router_data: Mapping[str, Sequence[dict]] | None
    probe_experts: bool
    loss_before: float | None  # f(0) without the L1 part, None where the method measures it itself
    on_step: Callable[[float], None] | None = None  # router: each training step's loss (progress)

    @property
    def num_experts(self) -> int:
        return self.bank.num_experts


@dataclass
class Found:
    """What a method of :func:`mix` found.

    Attributes:
        weights: (E,) the gate vector (a router's: its mean gate on the shots).
        objective: the objective there (a router's: the CE on the shots with the routers on).
        loss: its CE part (no L1).
        info: the method's entries of ``Mixture.info``.
        ranked: distinct evaluated candidates, best first, for the check by generation; None: the
            result alone is a finalist.
        router_state: the trained routers (router method only).
        loss_before: f(0) where the method measured it (gradient in output mode), else None.
        steps: training steps counted as evaluations besides the objective's (router method).
    """

    weights: torch.Tensor
    objective: float
    loss: float
    info: dict = field(default_factory=dict)
    ranked: list[tuple[torch.Tensor, float]] | None = None
    router_state: dict | None = None
    loss_before: float | None = None
    steps: int = 0


def _mix_search(call: MixCall) -> Found:
    e, objective = call.num_experts, call.objective
    zero = torch.zeros(e)
    known = [(torch.eye(e)[i], objective(torch.eye(e)[i])) for i in range(e)] if call.probe_experts else []
    start = min([(zero, call.loss_before)] + known, key=lambda p: p[1])[0]
    res = search_weights(objective, e, budget=call.budget, bounds=call.bounds, seed=call.seed,
                         start_value=call.loss_before, start=start, known=known)
    lo, hi = call.bounds
    info = dict(budget=call.budget, l1=call.l1, bounds=[lo, hi], optimizer="nevergrad.NGOpt", trace=res.trace,
                probed={n: v for n, (_, v) in zip(call.bank.names, known)},
                start=[round(float(x), 4) for x in start])
    # search evaluated its best w already: no extra forward
    return Found(res.weights, res.objective, res.objective - float(objective.penalty(res.weights)), info,
                 ranked=res.ranked)


def _mix_gradient(call: MixCall) -> Found:
    e = call.num_experts
    lr = DEFAULT_GRADIENT_LR if call.lr is None else float(call.lr)
    start = torch.full((e,), 1.0 / e) if call.mode == "weight" else None
    res = gradient_weights(call.objective, e, budget=call.budget, bounds=call.bounds, lr=lr, start=start,
                           start_value=call.loss_before)
    lo, hi = call.bounds
    info = dict(budget=call.budget, l1=call.l1, bounds=[lo, hi], optimizer="adam", lr=lr,
                start="uniform 1/E" if start is not None else "0", trace=res.trace)
    # the first step was w = 0, where f has no L1 part
    loss_before = res.trace[0] if call.loss_before is None else None
    return Found(res.weights, res.objective, res.objective - float(call.objective.penalty(res.weights)), info,
                 loss_before=loss_before)


def _mix_uniform(call: MixCall) -> Found:
    w = torch.full((call.num_experts,), 1.0 / call.num_experts)
    loss = call.objective.loss(w)
    return Found(w, loss + float(call.objective.penalty(w)), loss)


def _mix_router(call: MixCall) -> Found:
    lr = DEFAULT_ROUTER_LR if call.lr is None else float(call.lr)
    losses = train_router(call.handle, call.tokenizer, call.router_data, steps=call.budget, top_k=call.top_k,
                          seed=call.seed, lr=lr, max_len=call.max_len, on_step=call.on_step)
    router_state = call.handle.router_state()
    w = mean_routing(call.handle, call.objective.batches)
    info = dict(steps=call.budget, lr=lr, router_tasks=sorted(call.router_data), router_losses=losses,
                weights_are="mean routed gate on the shots")
    loss = _router_shots_loss(call.handle, call.objective)
    return Found(w, loss, loss, info, router_state=router_state, steps=call.budget)


# Method name (``mixture.METHODS``) -> how :func:`mix` runs it.
MIX_METHODS: dict[str, Callable[[MixCall], Found]] = {
    "search": _mix_search,
    "gradient": _mix_gradient,
    "router": _mix_router,
    "uniform": _mix_uniform,
}
assert set(MIX_METHODS) == set(METHODS), "every mixing method needs an entry in MIX_METHODS"


def _check_finalists(call: MixCall, found: Found, shots: list[dict], target: str, finalists: int,
                     config, loss_before: float | None, *, progress: bool = False) -> tuple[torch.Tensor, float, dict]:
    """The check by generation of :func:`mix` (``finalists`` > 0): the best ``finalists`` ranked
    candidates (the result alone without a ranking), the prior (a seen target's own expert, else
    w = 0) and w = 0 answer the shots; :func:`pick_by_generation` chooses, the prior kept on a tie.
    ``config`` is the check's ``GenerationConfig`` (:func:`_verify_config`).

    Returns:
        ``(chosen w, its objective, the Mixture.info entries of the check)``.
    """
    bank, objective, e = call.bank, call.objective, call.num_experts
    zero = torch.zeros(e)
    ranked = found.ranked if found.ranked is not None else []
    pool = ranked[:finalists] if found.ranked is not None else [(found.weights, found.objective)]
    cached = {c.double().numpy().tobytes(): v for c, v in ranked}

    def value(c: torch.Tensor) -> float:
        known = cached.get(c.double().numpy().tobytes())
        if known is not None:
            return known
        return (loss_before if loss_before is not None else objective.loss(zero)) if not c.any() else objective(c)

    # the prior kept on a tie: a seen target's own expert, else the frozen student
    prior = torch.eye(e)[bank.names.index(target)] if target in bank.names else zero
    for c in (prior, zero):
        if not any(torch.equal(c, p) for p, _ in pool):
            pool.append((c, value(c)))
    default = next(i for i, (c, _) in enumerate(pool) if torch.equal(c, prior))
    chosen, checked = pick_by_generation(call.handle, call.tokenizer, shots, target, pool,
                                         config, default=default, progress=progress)
    w, objective_after = pool[chosen]
    return w, objective_after, dict(selection="generation on the shots", finalists=checked, chosen=chosen,
                                    prior=default)


def _verify_config(bank: ExpertBank, max_new_tokens: int, guide_answers: bool = False):
    from .generate import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, prompt_format=bank.prompt_format,
                            stop_after_answer=True, stop_on_loop=True, guide_answers=guide_answers)


def _router_shots_loss(handle: MixtureHandle, objective: ShotsObjective) -> float:
    """Mean CE on the shots with the routers attached (they ignore the shared gates)."""
    total = 0.0
    with torch.no_grad():
        for batch, n in zip(objective.batches, objective.counts):
            total += float(_batch_loss(handle.model, batch)) * n
    objective.evaluations += 1
    return total / objective.total
