"""Mixing benchmark: one gradient-free search (budget 40) our way against the paper's way.

Workload: the built-in unseen task ``price_math``, 5 shots, a bank of 10 random LoRA experts (the
paper's 10 seen tasks; rank 8, alpha 16, q_proj and v_proj, B nonzero), weight composition (the
paper's), nevergrad NGOpt with the same seed on both sides.

Providers, each running its own search loop (ask, evaluate, tell) for ``budget`` candidates:

* ``ours``: the experts are injected once; a candidate is ``handle.set_gates(w)`` and ONE forward
  (supervised positions only through the head), under ``torch.no_grad``.
* ``paper``: what the MoDE-CoTD / LoraHub code does per candidate: compute the merged LoRA weights
  ``sum_e w_e A_e`` and ``sum_e w_e B_e`` for every module from the experts' state dicts, load them
  into a PEFT model with ``set_peft_model_state_dict``, then one forward with ``labels`` (the
  Hugging Face loss). The PEFT model is built once, before timing, as the paper's code does.

Both see the same shots and student and evaluate the same objective (mean CE on the supervised
tokens + 0.05 mean|w|); the report checks that the two sides' losses agree and that the searches
end at the same weights. Warm-up forwards are excluded. The two searches run in LOCKSTEP, one
candidate of each in turn (the side that goes first alternates), and each side's time is the sum
of its own steps: on a shared machine a burst of load then hits both sides alike, where timing one
whole search after the other let the load swing the ratio by 2x. Wall time and process CPU time
are both reported; ``repeats`` lockstep runs give the median.

Which "mix" is which: ``engine/mix.py`` finds the gates (the mixing methods, :func:`mix`),
``engine/mixture.py`` saves and loads the result (``Mixture``, the file format), the kernels' op
``lora_mixture`` (``kernels/ops.py``) applies gate rows to the experts inside a layer,
``cli/mix.py`` is the ``mix`` command and ``bench/mix.py`` its benchmark.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import statistics
import time
from pathlib import Path

import torch

from ..engine.atomic import atomic_write_text
from .common import ALPHA, RANK, TARGETS, device_name, load_average, random_bank, sync, versions

TARGET = "price_math"
NUM_SHOTS = 5
NUM_EXPERTS = 10
BUDGET = 40
QUICK_BUDGET = 10
L1 = 0.05
SPEEDUP_TARGET = 3.0


class _PaperObjective:
    """The paper's per-candidate work: merge the LoRA weights, load them into PEFT, one HF forward."""

    def __init__(self, peft_model, expert_states: list[dict[str, torch.Tensor]], batch, device):
        self.model = peft_model
        self.states = expert_states
        self.batch = batch
        self.device = device
        self.seconds = {"merge": 0.0, "load": 0.0, "forward": 0.0}

    def loss(self, w: torch.Tensor) -> float:
        from peft import set_peft_model_state_dict

        t0 = time.perf_counter()
        # LoraHub's get_final_weights: a weighted sum of every expert's tensors, key by key.
        merged = {}
        for key in self.states[0]:
            acc = None
            for i, state in enumerate(self.states):
                term = float(w[i]) * state[key]
                acc = term if acc is None else acc + term
            merged[key] = acc
        sync(self.device)
        t1 = time.perf_counter()
        set_peft_model_state_dict(self.model, merged)
        sync(self.device)
        t2 = time.perf_counter()
        with torch.no_grad():
            out = self.model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask,
                             labels=self.batch.labels)
            value = float(out.loss)  # a host copy: syncs the device
        t3 = time.perf_counter()
        self.seconds["merge"] += t1 - t0
        self.seconds["load"] += t2 - t1
        self.seconds["forward"] += t3 - t2
        return value

    def __call__(self, w: torch.Tensor) -> float:
        return self.loss(w) + L1 * float(w.abs().mean())


def _expert_states(bank) -> list[dict[str, torch.Tensor]]:
    """Each expert as the PEFT state dict the paper's code caches (keys without the adapter name)."""
    states = []
    for e in range(bank.num_experts):
        sd = {}
        for m in bank.modules:
            sd[f"base_model.model.{m}.lora_A.weight"] = bank.lora_a[m][e].detach().clone()
            sd[f"base_model.model.{m}.lora_B.weight"] = bank.lora_b[m][e].detach().clone()
        states.append(sd)
    return states


def run_mix_bench(out_dir, *, student=None, quick: bool = False, repeats: int | None = None,
                  threads: int | None = None) -> dict:
    """Time one search (budget 40; ``quick``: 10) our way and the paper's way; write mix.json and mix.md.

    Args:
        out_dir: report directory (created).
        student: a Student, a student directory, or None for the built-in student.
        quick: budget 10.
        repeats: lockstep runs of both searches (default 1); figures are medians over them.
        threads: torch CPU threads for the run (restored afterwards); None keeps the current setting.
    Returns:
        The report dict (also written as JSON).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(out_dir, student, quick, repeats)
    finally:
        torch.set_num_threads(previous)


def _run(out_dir, student, quick: bool, repeats: int | None) -> dict:
    from peft import LoraConfig, get_peft_model

    from ..engine.inject import inject_experts
    from ..engine.mix import ShotsObjective, WeightSearch, prepare_shots, search_weights
    from ..engine.student import Student, load_student
    from ..engine.tasks import generate_shots

    st = student if isinstance(student, Student) else load_student(student)
    device = st.device
    budget = QUICK_BUDGET if quick else BUDGET
    repeats = repeats if repeats is not None else 1
    shots = generate_shots(TARGET, NUM_SHOTS, seed=0)
    batches = prepare_shots(shots, st.tokenizer, target=TARGET, device=device)
    assert len(batches) == 1
    batch = batches[0]

    # The paper's side wraps its own copy of the student; ours injects into the student itself.
    peft_model = get_peft_model(copy.deepcopy(st.model),
                                LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0))
    peft_model.eval()
    bank = random_bank(st.model, [f"expert{i}" for i in range(NUM_EXPERTS)])
    states = [{k: v.to(device) for k, v in sd.items()} for sd in _expert_states(bank)]
    handle = inject_experts(st.model, bank, mode="weight")
    try:
        ours_obj = ShotsObjective(handle, batches, L1)
        paper_obj = _PaperObjective(peft_model, states, batch, device)
        zero = torch.zeros(NUM_EXPERTS)
        # warm-up (excluded) and the agreement check at w = 0 and at one dense w
        probe = torch.linspace(-1.0, 1.0, NUM_EXPERTS)
        check = {"w0_ours": ours_obj.loss(zero), "w0_paper": paper_obj.loss(zero),
                 "probe_ours": ours_obj.loss(probe), "probe_paper": paper_obj.loss(probe)}
        # nevergrad's import and NGOpt's first optimizer choice (scipy for COBYLA) cost seconds once.
        search_weights(lambda w: float(w.square().sum()), NUM_EXPERTS, budget=3, seed=0)
        objectives = {"ours": ours_obj, "paper": paper_obj}
        runs = {"ours": [], "paper": []}
        results = {}
        for _ in range(repeats):
            paper_obj.seconds = dict.fromkeys(paper_obj.seconds, 0.0)
            searches = {side: WeightSearch(NUM_EXPERTS, budget=budget, seed=0) for side in objectives}
            wall, cpu = dict.fromkeys(objectives, 0.0), dict.fromkeys(objectives, 0.0)
            for step in range(budget):
                order = ("ours", "paper") if step % 2 == 0 else ("paper", "ours")
                for side in order:
                    sync(device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    w, cached = searches[side].ask()
                    searches[side].tell(cached if cached is not None else objectives[side](w))
                    sync(device)
                    wall[side] += time.perf_counter() - t0
                    cpu[side] += time.process_time() - c0
            for side in objectives:
                parts = dict(paper_obj.seconds) if side == "paper" else {}
                runs[side].append({"seconds": wall[side], "cpu_seconds": cpu[side], "parts": parts})
                results[side] = searches[side].result()
    finally:
        handle.remove()
    med = {s: statistics.median(r["seconds"] for r in runs[s]) for s in runs}
    med_cpu = {s: statistics.median(r["cpu_seconds"] for r in runs[s]) for s in runs}
    w_diff = float((results["ours"].weights - results["paper"].weights).abs().max())
    # float32 sums in another order (merged weights vs grouped gates): agreement to ~1e-5 relative.
    agree = all(abs(check[f"{k}_ours"] - check[f"{k}_paper"]) <= 1e-4 * abs(check[f"{k}_paper"]) for k in ("w0", "probe"))
    speedup = med["paper"] / med["ours"] if med["ours"] > 0 else math.inf
    report = {
        "benchmark": "mix: one gradient-free search, ours vs the paper's merge-and-load per candidate",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "versions": versions("nevergrad", "peft"),
        "load_average": load_average(),
        "student": st.identity,
        "dtype": str(st.dtype).replace("torch.", ""),
        "workload": {"target": TARGET, "shots": NUM_SHOTS, "shots_shape": list(batch.input_ids.shape),
                     "supervised_tokens": ours_obj.total, "experts": NUM_EXPERTS, "rank": RANK, "alpha": ALPHA,
                     "targets": list(TARGETS), "modules": len(bank.modules), "mode": "weight", "budget": budget,
                     "l1": L1, "optimizer": "nevergrad NGOpt, seed 0", "repeats": repeats},
        "seconds": med,
        "cpu_seconds": med_cpu,
        "runs": runs,
        "per_candidate_ms": {s: 1000 * med[s] / budget for s in med},
        "speedup": speedup,
        "speedup_cpu_time": med_cpu["paper"] / med_cpu["ours"] if med_cpu["ours"] > 0 else math.inf,
        "target_speedup": SPEEDUP_TARGET,
        "target_met": speedup >= SPEEDUP_TARGET,
        "check": {**check, "losses_agree": agree, "final_weights_max_abs_diff": w_diff,
                  "best_objective": {s: results[s].objective for s in results},
                  "candidates": {s: len(results[s].trace) for s in results}},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "mix.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "mix.md", _markdown(report))
    return report


def _markdown(r: dict) -> str:
    w, c = r["workload"], r["check"]
    lines = [
        "# Mixing: one gradient-free search, ours vs the paper's way",
        "",
        f"- date: {r['date']}",
        f"- device: {r['device']} (load average at the end: {r['load_average']})",
        f"- versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}",
        f"- student: {r['student'].get('name')} ({r['student'].get('num_parameters', 0):,} parameters, {r['dtype']})",
        f"- workload: {w['shots']} shots of `{w['target']}` (batch {w['shots_shape']}, {w['supervised_tokens']} "
        f"supervised tokens), {w['experts']} experts rank {w['rank']} on {', '.join(w['targets'])} "
        f"({w['modules']} modules), {w['mode']} composition, {w['optimizer']}, budget {w['budget']}, "
        f"the two searches in lockstep, median of {w['repeats']} run(s)",
        "",
        "| provider | per candidate (wall) | search wall time | search CPU time | where the time goes |",
        "|---|---:|---:|---:|---|",
    ]
    names = {"ours": "ours: inject once, set gates, one forward",
             "paper": "paper: merge A/B, set_peft_model_state_dict, one forward"}
    for s in ("ours", "paper"):
        # the parts of the run whose wall time is closest to the median shown
        run = min(r["runs"][s], key=lambda x: abs(x["seconds"] - r["seconds"][s]))
        where = ", ".join(f"{k} {v:.2f} s" for k, v in run["parts"].items()) or "forward (all of it)"
        lines.append(f"| {names[s]} | {r['per_candidate_ms'][s]:.1f} ms | {r['seconds'][s]:.2f} s | "
                     f"{r['cpu_seconds'][s]:.2f} s | {where} |")
    lines += [
        "",
        f"Speed-up: **{r['speedup']:.2f}x** wall, {r['speedup_cpu_time']:.2f}x CPU time "
        f"(target {r['target_speedup']:.0f}x: {'met' if r['target_met'] else 'NOT met'}).",
        "",
        f"Check ({'agree' if c['losses_agree'] else 'DISAGREE'}): shots loss at w = 0 {c['w0_ours']:.5f} (ours) "
        f"vs {c['w0_paper']:.5f} (paper); at a dense w {c['probe_ours']:.5f} vs {c['probe_paper']:.5f}; "
        f"final weights differ by at most {c['final_weights_max_abs_diff']:.2e}.",
        "",
        "Per candidate, the paper's way adds the merge and the state-dict load, and its forward computes "
        "the logits of every position (the Hugging Face loss) where ours computes them only at the "
        "supervised positions. The merge and load are a fixed cost per candidate, so their share grows "
        "where the forward is cheaper than here (not measured in this report).",
        "",
        f"Command: `modecotd-engine bench mix --out DIR` (`--quick`: budget 10); torch threads "
        f"{r['torch_threads']}.",
        "",
    ]
    return "\n".join(lines)
