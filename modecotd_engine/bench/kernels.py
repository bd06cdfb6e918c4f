"""Kernel benchmark of the gated multi-LoRA-expert linear layer.

Providers, side by side in one run and on the same inputs:

* ``base``: the frozen GEMM alone, ``F.linear(x, W, b)`` (the floor). Its forward+backward is the
  base forward plus the base dX GEMM (W frozen: no dW).
* ``triton``: ``lora_mixture(..., backend="triton")``, the fused kernels (CUDA only).
* ``triton_addmm``: ``lora_mixture(..., backend="triton_addmm")``, the second design (CUDA only): the
  frozen GEMM by cuBLAS (``F.linear`` / ``torch.mm``) and the experts' expand added into its output
  with ``addmm_`` (vLLM's layout), with the same shrink and backward kernels. Beside ``triton`` in
  every case, so one run says per shape which design to keep.
* ``torch``: ``lora_mixture(..., backend="torch")``, the grouped torch path (one-hot rows take its
  per-active-expert path).
* ``loop``: a per-expert Python loop (``lora_mixture_loop``), what PEFT-style code does.

Shapes come from real configs: SmolLM2-135M (hidden 576, MLP 1536), a 1.7B-class model
(SmolLM2-1.7B: 2048, 8192) and a 7B-class model (Llama-2-7B: 4096, 11008). Gates are one-hot with
rows grouped by expert (task gates while distilling) or dense softmax mixtures. ``fwd`` is timed
under ``torch.no_grad()``; ``fwd+bwd`` backpropagates a fixed dy into x, A and B (gates frozen,
as while distilling). On CUDA every case runs in both compositions: ``output`` (the sum of gated
expert outputs) and ``weight`` (gated sums of A and B: the paper's, and ``mix``'s default); the
stated targets are for output mode, weight mode's rows stand beside them. The CPU quick run keeps
output mode.

Timing: on CUDA ``triton.testing.do_bench`` with quantiles [0.5, 0.2, 0.8] (it synchronises and
excludes its warm-up); ratio = median / base median. On CPU a warm-up call per provider, then
rounds of one ``perf_counter``-timed call per provider in rotating order; the median per provider,
and the ratio to base is the median over rounds of (provider time / base time in the same round).
Decode-sized cases (T <= 16) are timed a second way too: ``wall_ms``, back-to-back calls ended by
one sync, wall clock per call. ``do_bench`` flushes L2 before each call and times each on the GPU
with events, so the host work of a call (checks, allocations, launches) hides behind the flush;
at decode that host work can exceed the ~10 us of GPU work, and back to back it shows. On CUDA the
forward is also replayed from a CUDA graph (``graph_ms``: what is left when the host work goes).
TFLOP/s are model FLOPs: ``2TKN + 2T*E_act*r*(K+N)`` forward (E_act = 1 for one-hot gates, E for
dense), ``2 * 2TKN + 3 * 2T*E_act*r*(K+N)`` forward+backward; the recomputed H is not counted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..engine.atomic import atomic_write_bytes

# name -> (K, N): in_features -> out_features of a real model's projections
SHAPES = {
    "smollm2-135m attn 576->576": (576, 576),
    "smollm2-135m mlp 576->1536": (576, 1536),
    "1.7b attn 2048->2048": (2048, 2048),
    "1.7b mlp 2048->8192": (2048, 8192),
    "7b attn 4096->4096": (4096, 4096),
    "7b mlp 4096->11008": (4096, 11008),
}
SMOL = ["smollm2-135m attn 576->576", "smollm2-135m mlp 576->1536"]
TOKENS = (1, 16, 256, 4096)
ALPHA = 32.0
PROVIDERS = ("base", "triton", "triton_addmm", "torch", "loop")
# the providers that run the Triton kernels (CUDA only outside tests)
TRITON_PROVIDERS = ("triton", "triton_addmm")
# On CPU a full sweep skips cases above this many base-GEMM FLOPs (one 7B MLP GEMM at T=4096 is
# 0.37 TFLOP: tens of seconds per call on a laptop-class CPU).
CPU_MAX_BASE_FLOPS = 2.0e10


@dataclass(frozen=True)
class Case:
    shape: str
    k: int
    n: int
    t: int
    experts: int
    rank: int
    gates: str  # "one-hot-grouped" or "dense"
    pass_: str  # "fwd" or "fwd+bwd"
    sweep: str  # which sweep asked for it (T, E or r)
    mode: str = "output"  # "output" or "weight" composition of the experts


@dataclass(frozen=True)
class Target:
    name: str
    provider: str  # provider whose ratio is checked
    limit: float
    kind: str  # "ratio<=" (provider / base) or "loop_speedup>=" (loop / provider)
    where: dict  # field -> value (or (op, value)) selecting result rows
    device: str  # "gpu" or "cpu"


TARGETS = [
    Target("dense fwd, 7B attn, E=10 r=16 T=4096", "triton", 1.12, "ratio<=",
           dict(shape="7b attn 4096->4096", experts=10, rank=16, t=4096, gates="dense", pass_="fwd",
                mode="output"), "gpu"),
    Target("dense fwd+bwd, 7B attn, E=10 r=16 T=4096 (base fwd + base dX)", "triton", 1.25, "ratio<=",
           dict(shape="7b attn 4096->4096", experts=10, rank=16, t=4096, gates="dense",
                pass_="fwd+bwd", mode="output"), "gpu"),
    Target("dense fwd, 7B attn, E=10 r=16 T=16", "triton", 1.25, "ratio<=",
           dict(shape="7b attn 4096->4096", experts=10, rank=16, t=16, gates="dense", pass_="fwd",
                mode="output"), "gpu"),
    Target("one-hot grouped fwd, SmolLM2 shapes, E=10 T=4096", "triton", 1.20, "ratio<=",
           dict(shape=("in", SMOL), experts=10, t=4096, gates="one-hot-grouped", pass_="fwd", mode="output"),
           "gpu"),
    Target("per-expert loop / fused, E=10, T>=256", "triton", 3.0, "loop_speedup>=",
           dict(experts=10, t=(">=", 256), mode="output"), "gpu"),
    Target("CPU torch path, one-hot grouped fwd, SmolLM2 shapes, T=4096 (a training batch)", "torch",
           1.25, "ratio<=", dict(shape=("in", SMOL), t=4096, gates="one-hot-grouped", pass_="fwd"), "cpu"),
    Target("CPU torch path, one-hot grouped fwd, SmolLM2 shapes, T=256", "torch", 1.25, "ratio<=",
           dict(shape=("in", SMOL), t=256, gates="one-hot-grouped", pass_="fwd"), "cpu"),
]


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------


def build_cases(quick: bool, on_gpu: bool) -> list[Case]:
    """The sweeps: ratio vs T per shape, then E and r at one large shape; on CUDA every output-mode
    case is followed (after all of them, so the stated targets come first) by its weight-mode twin."""
    cases = _output_cases(quick, on_gpu)
    if on_gpu:
        cases += [replace(c, mode="weight") for c in cases]
    return cases


def _output_cases(quick: bool, on_gpu: bool) -> list[Case]:
    cases: list[Case] = []

    def add(shape, t, e, r, gates, pass_, sweep):
        k, n = SHAPES[shape]
        if not on_gpu and 2.0 * t * k * n > CPU_MAX_BASE_FLOPS:
            return
        c = Case(shape, k, n, t, e, r, gates, pass_, sweep)
        if c not in cases:
            cases.append(c)

    if quick and not on_gpu:
        # SmolLM2 shapes: forward over every T, forward+backward where a CPU trains (T <= 256)
        for shape in SMOL:
            for t in TOKENS:
                for gates in ("one-hot-grouped", "dense"):
                    add(shape, t, 10, 16, gates, "fwd", "T")
                    if 16 <= t <= 256:
                        add(shape, t, 10, 16, gates, "fwd+bwd", "T")
        return cases
    if quick:
        big = "7b attn 4096->4096"
        for t in (16, 256, 4096):
            add(big, t, 10, 16, "dense", "fwd", "T")
        add(big, 4096, 10, 16, "dense", "fwd+bwd", "T")
        add(big, 4096, 10, 16, "one-hot-grouped", "fwd", "T")
        for shape in SMOL:
            add(shape, 4096, 10, 16, "one-hot-grouped", "fwd", "T")
            add(shape, 4096, 10, 16, "one-hot-grouped", "fwd+bwd", "T")
        return cases
    for shape in SHAPES:
        for t in TOKENS:
            for gates in ("one-hot-grouped", "dense"):
                for pass_ in ("fwd", "fwd+bwd"):
                    add(shape, t, 10, 16, gates, pass_, "T")
    big = "7b attn 4096->4096" if on_gpu else "smollm2-135m mlp 576->1536"
    t_sweep = 4096 if on_gpu else 256
    for e in (1, 4, 10, 32):
        for gates in ("one-hot-grouped", "dense"):
            add(big, t_sweep, e, 16, gates, "fwd", "E")
    for r in (8, 16, 64):
        for gates in ("one-hot-grouped", "dense"):
            add(big, t_sweep, 10, r, gates, "fwd", "r")
    return cases


def make_gates(kind: str, t: int, e: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "one-hot-grouped":
        # rows sorted by expert, experts of roughly equal share (a batch of tasks)
        idx = (torch.arange(t) * e) // max(t, 1)
        return F.one_hot(idx, e).float()
    if kind == "dense":
        return torch.softmax(torch.randn(t, e, generator=gen), dim=-1)
    raise ValueError(f"unknown gate pattern {kind!r}")


def model_flops(case: Case, provider: str) -> float:
    base = 2.0 * case.t * case.k * case.n
    e_act = 1 if case.gates == "one-hot-grouped" else case.experts
    lora = 2.0 * case.t * e_act * case.rank * (case.k + case.n)
    if provider == "base":
        return base if case.pass_ == "fwd" else 2 * base
    return base + lora if case.pass_ == "fwd" else 2 * base + 3 * lora


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def _cpu_time(fns: dict, quick: bool) -> dict:
    """Per provider: (median, p20, p80, min) ms and the median per-round ratio to ``base``.

    One warm-up call each (excluded), then rounds in which every provider runs once, in a rotating
    order: on a shared CPU, load bursts then hit all providers alike, and the ratio of two calls
    made moments apart is steadier than the ratio of two medians taken minutes apart.
    """
    for fn in fns.values():
        fn()
    names = list(fns)
    min_rounds, max_rounds, budget = (7, 40, 2.0) if quick else (11, 80, 5.0)
    samples: dict[str, list[float]] = {p: [] for p in names}
    start = time.perf_counter()
    rnd = 0
    while rnd < min_rounds or (rnd < max_rounds and time.perf_counter() - start < budget):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for p in order:
            t0 = time.perf_counter()
            fns[p]()
            samples[p].append((time.perf_counter() - t0) * 1e3)
        rnd += 1
    out = {}
    for p, ts in samples.items():
        q = statistics.quantiles(ts, n=10, method="inclusive")
        ratios = [t / b for t, b in zip(ts, samples["base"])] if "base" in samples else None
        out[p] = dict(median=statistics.median(ts), p20=q[1], p80=q[7], min=min(ts),
                      ratio=statistics.median(ratios) if ratios else None,
                      ratio_min=min(ts) / min(samples["base"]) if "base" in samples else None)
    return out


def _gpu_time(fn, grad_to_none) -> dict:
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return dict(median=float(med), p20=float(p20), p80=float(p80), min=None, ratio=None, ratio_min=None)


# Cases with at most this many tokens (decode) are also timed back to back (``wall_ms``) and, on
# CUDA, replayed from a CUDA graph (``graph_ms``, forward only, of the providers in GRAPH_PROVIDERS:
# the torch path reads the gates on the host to plan one-hot rows, a sync that capture forbids).
WALL_MAX_T = 16
GRAPH_PROVIDERS = ("base", "triton", "triton_addmm")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_time(fn, device: torch.device, target_s: float = 0.1, max_calls: int = 1000) -> float:
    """ms per call of ``fn`` called back to back and ended by one sync (host work included).

    About ``target_s`` of calls (10 to ``max_calls``), sized from a first run of 10; both runs start
    from an idle device.
    """
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        fn()
    _sync(device)
    per_call = (time.perf_counter() - t0) / 10
    calls = max(10, min(max_calls, int(target_s / max(per_call, 1e-7))))
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / calls * 1e3


def _graph_time(fn, calls: int = 200) -> float:
    """ms per replay of one call of ``fn`` captured in a CUDA graph (CUDA only; raises where the
    call cannot be captured, e.g. a host sync inside it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture wants
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


def _tuned_configs() -> dict:
    """{"kernel key": "config"} of every autotuned Triton kernel (empty without triton)."""
    try:
        from modecotd_engine.kernels.triton_lora import AUTOTUNED_KERNELS
    except Exception:  # no usable triton: nothing was tuned
        return {}
    return {f"{name} {key}": str(cfg) for name, kern in AUTOTUNED_KERNELS.items()
            for key, cfg in kern.cache.items()}


def _make_fn(provider: str, case: Case, tensors: dict, scale: float):
    from modecotd_engine.kernels import lora_mixture, lora_mixture_loop

    x, w, b, a, bb, g, dy = (tensors[k] for k in ("x", "w", "b", "a", "bb", "g", "dy"))

    if provider == "base":
        op = lambda: F.linear(x, w, b)  # noqa: E731
    elif provider == "loop":
        op = lambda: lora_mixture_loop(x, w, b, a, bb, g, scale, case.mode)  # noqa: E731
    else:
        op = lambda: lora_mixture(x, w, b, a, bb, g, scale, case.mode, backend=provider)  # noqa: E731

    if case.pass_ == "fwd":
        def fwd():
            with torch.no_grad():
                return op()
        return fwd

    grads = [t for t in (x, a, bb) if t.requires_grad]

    def fwd_bwd():
        for t in grads:  # fresh gradients every call, as an optimizer step would leave them
            t.grad = None
        op().backward(dy)
    return fwd_bwd


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


def _environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton absent: the CPU providers still run
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores, " \
               f"{torch.get_num_threads()} threads)"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _providers(device: torch.device) -> list[str]:
    return [p for p in PROVIDERS if p not in TRITON_PROVIDERS or device.type == "cuda"]


def run_kernel_bench(out_dir: Path, quick: bool = False, device: str | None = None,
                     dtype: str | None = None, log=print, cases: list[Case] | None = None,
                     providers: list[str] | None = None) -> dict:
    """Benchmark every provider on every case; write kernels.json, kernels.md, kernels.png.

    Args:
        out_dir: directory for the report files (created).
        quick: a subset of shapes (about two minutes on a CPU).
        device: "cuda", "cpu" or None (CUDA when available).
        dtype: "bfloat16", "float16" or "float32"; default bfloat16 on CUDA, float32 on CPU.
        log: progress printer (one line per case).
        cases: the cases to run instead of :func:`build_cases`' (benchmarks/gpu_suite.py rehearses
            this code on the CPU with tiny ones).
        providers: the providers to time (default: all that the device serves; ``triton`` on a CPU
            runs Triton's interpreter when TRITON_INTERPRET=1 was set before import).
    Returns:
        The report dict written to kernels.json: {"env", "rows", "targets", "quick", "complete"}.
        kernels.json is rewritten after every case with ``complete`` False, so a run stopped
        part-way (a time limit) leaves the rows measured so far.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    env = _environment(dev)
    on_gpu = dev.type == "cuda"
    providers = list(providers or _providers(dev))
    cases = list(cases) if cases is not None else build_cases(quick, on_gpu)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"kernel bench on {env['device']} ({dt}), {len(cases)} cases x {providers}")
    rows: list[dict] = []
    for i, case in enumerate(cases):
        rows += _run_case(i, case, providers, dev, dt, env, quick, log)
        log(f"[{i + 1}/{len(cases)}] {case.shape} T={case.t} E={case.experts} r={case.rank} "
            f"{case.gates} {case.pass_} {case.mode}: "
            + ", ".join(f"{r['provider']} {r['median_ms']:.3f} ms" if r["median_ms"] is not None
                        else f"{r['provider']} failed" for r in rows[-len(providers):]))
        partial = {"env": env, "quick": quick, "dtype": str(dt).replace("torch.", ""), "rows": rows,
                   "complete": False, "cases": len(cases)}
        atomic_write_bytes(out_dir / "kernels.json", json.dumps(partial, indent=1).encode())
    report = {"env": env, "quick": quick, "dtype": str(dt).replace("torch.", ""), "rows": rows,
              "targets": evaluate_targets(rows, on_gpu, env["device"]), "complete": True, "cases": len(cases)}
    write_report(report, out_dir)
    return report


def _run_case(i: int, case: Case, providers: list[str], dev: torch.device, dt: torch.dtype, env: dict,
              quick: bool, log) -> list[dict]:
    """One row per provider for ``case`` (timings None where a provider failed)."""
    on_gpu = dev.type == "cuda"
    gen = torch.Generator().manual_seed(i)
    scale = ALPHA / case.rank
    need_grad = case.pass_ == "fwd+bwd"

    def rnd(*shape, std=1.0, grad=False):
        t = (torch.randn(*shape, generator=gen) * std).to(device=dev, dtype=dt)
        return t.requires_grad_(grad and need_grad)

    tensors = {
        "x": rnd(case.t, case.k, grad=True),
        "w": rnd(case.n, case.k, std=case.k ** -0.5),
        "b": rnd(case.n, std=0.1),
        "a": rnd(case.experts, case.rank, case.k, std=case.k ** -0.5, grad=True),
        "bb": rnd(case.experts, case.n, case.rank, std=0.02, grad=True),
        "g": make_gates(case.gates, case.t, case.experts, gen).to(device=dev, dtype=dt),
        "dy": rnd(case.t, case.n),
    }
    grads = [tensors[k] for k in ("x", "a", "bb")]
    fns = {p: _make_fn(p, case, tensors, scale) for p in providers}
    timings: dict[str, dict | None] = {}
    picked: dict[str, dict] = {}
    if on_gpu:
        for provider, fn in fns.items():
            try:
                before = _tuned_configs()
                timings[provider] = _gpu_time(fn, grads if need_grad else None)
                if provider in TRITON_PROVIDERS:  # configs tuned for this case by this provider's calls
                    picked[provider] = {k: v for k, v in _tuned_configs().items() if before.get(k) != v}
            except Exception as err:  # one failing provider must not sink the whole report
                timings[provider] = None
                log(f"  {provider} failed on {case}: {type(err).__name__}: {err}")
    else:
        timings = _cpu_time(fns, quick)
    # decode: back-to-back wall clock (host work shows) and, on CUDA, CUDA-graph replay of the forward
    wall: dict[str, float | None] = {}
    graph: dict[str, float | None] = {}
    if case.t <= WALL_MAX_T:
        for provider, fn in fns.items():
            wall[provider] = graph[provider] = None
            if timings.get(provider) is None:
                continue
            try:
                wall[provider] = _wall_time(fn, dev)
                if on_gpu and case.pass_ == "fwd" and provider in GRAPH_PROVIDERS:
                    graph[provider] = _graph_time(fn)
            except Exception as err:  # e.g. a host sync inside a captured call: recorded as None
                log(f"  {provider} {'graph' if wall[provider] is not None else 'wall-clock'} timing failed on "
                    f"{case}: {type(err).__name__}: {err}")
    if on_gpu:
        torch.cuda.empty_cache()
    base = timings.get("base")
    rows = []
    for provider, tm in timings.items():
        row = {**env, **{("pass" if k == "pass_" else k): v for k, v in asdict(case).items()},
               "dtype": str(dt).replace("torch.", ""), "provider": provider,
               "median_ms": None, "p20_ms": None, "p80_ms": None, "min_ms": None, "tflops": None,
               "ratio_to_base": None, "ratio_of_mins": None,
               "wall_ms": wall.get(provider), "wall_ratio_to_base": None,
               "graph_ms": graph.get(provider), "graph_ratio_to_base": None,
               "configs": picked.get(provider, {}) if provider in TRITON_PROVIDERS else None}
        if tm is not None:
            ratio = tm["ratio"]
            if ratio is None and base is not None:
                ratio = tm["median"] / base["median"]
            row.update(median_ms=tm["median"], p20_ms=tm["p20"], p80_ms=tm["p80"], min_ms=tm["min"],
                       tflops=model_flops(case, provider) / (tm["median"] * 1e-3) / 1e12,
                       ratio_to_base=ratio, ratio_of_mins=tm["ratio_min"])
        for key in ("wall", "graph"):
            mine, floor = row[f"{key}_ms"], (wall if key == "wall" else graph).get("base")
            if mine is not None and floor:
                row[f"{key}_ratio_to_base"] = mine / floor
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# targets and report
# ---------------------------------------------------------------------------------------------


def _row_key(r: dict) -> tuple:
    """What identifies a case among a report's rows (rows without a mode predate weight mode)."""
    return (r["shape"], r["t"], r["experts"], r["rank"], r["gates"], r["pass"], r.get("mode", "output"))


def _match(row: dict, where: dict) -> bool:
    for key, want in where.items():
        have = row["pass"] if key == "pass_" else row.get(key, "output") if key == "mode" else row[key]
        if isinstance(want, tuple):
            op, val = want
            if op == "in" and have not in val:
                return False
            if op == ">=" and not have >= val:
                return False
        elif have != want:
            return False
    return True


def evaluate_targets(rows: list[dict], on_gpu: bool, device_name: str) -> list[dict]:
    """Each target with the measured worst case over its matching rows, or why it was not measured."""
    out = []
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault(_row_key(r), {})[r["provider"]] = r
    for tg in TARGETS:
        res = {"target": tg.name, "provider": tg.provider, "limit": tg.limit, "kind": tg.kind,
               "measured": None, "met": None, "note": ""}
        if (tg.device == "gpu") != on_gpu:
            res["note"] = f"needs a {'GPU' if tg.device == 'gpu' else 'CPU'} run"
            out.append(res)
            continue
        if tg.device == "gpu" and not any(h in device_name for h in ("H100", "H200")):
            res["note"] = f"stated for H100/H200; measured on {device_name}"
        values = []
        for provs in by_key.values():
            r = provs.get(tg.provider)
            if r is None or not _match(r, tg.where) or r["median_ms"] is None:
                continue
            if tg.kind == "ratio<=":
                values.append(r["ratio_to_base"])
            else:
                loop = provs.get("loop")
                if loop and loop["median_ms"]:
                    values.append(loop["median_ms"] / r["median_ms"])
        if values:
            worst = max(values) if tg.kind == "ratio<=" else min(values)
            res["measured"] = worst
            res["met"] = worst <= tg.limit if tg.kind == "ratio<=" else worst >= tg.limit
        elif not res["note"]:
            res["note"] = "no matching case in this run"
        out.append(res)
    return out


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def render_markdown(report: dict) -> str:
    env, rows = report["env"], report["rows"]
    lines = [
        "# Kernel benchmark: gated multi-LoRA linear layer",
        "",
        f"Device: {env['device']}; torch {env['torch']}; triton {env['triton']}; "
        f"dtype {report['dtype']}; date {env['date']}; {'quick' if report['quick'] else 'full'} run.",
        "",
        "Median time per call (ms) and ratio to the base GEMM alone (the floor); TFLOP/s are model "
        "FLOPs (see modecotd_engine/bench/kernels.py). `fwd+bwd` base = base forward + base dX GEMM.",
        "",
        *(["On CPU the providers run in interleaved rounds; the ratio is the median over rounds of "
           "(provider / base in the same round), so load from other processes hits both alike; "
           "`min_ms` and `ratio_of_mins` (best call / best base call) per row are in kernels.json.",
           ""] if env["device_type"] == "cpu" else []),
        "## Targets",
        "",
        "| target | provider | limit | measured | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for tg in report["targets"]:
        op = "<=" if tg["kind"] == "ratio<=" else ">="
        what = "x base" if tg["kind"] == "ratio<=" else "x faster than loop"
        met = {True: "yes", False: "NO", None: "-"}[tg["met"]]
        note = f" ({tg['note']})" if tg["note"] else ""
        lines.append(f"| {tg['target']} | {tg['provider']} | {op} {tg['limit']} {what} | "
                     f"{_fmt(tg['measured'], '.2f')} | {met}{note} |")
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    lines += ["", "## Results", ""]
    head = "| shape | T | E | r | gates | pass | mode | " + " | ".join(
        f"{p} ms (x base)" for p in providers) + " | " + " | ".join(
        f"{p} TFLOP/s" for p in providers) + " |"
    lines += [head, "|" + " --- |" * (7 + 2 * len(providers))]
    seen = []
    for r in rows:
        key = _row_key(r)
        if key not in seen:
            seen.append(key)
    for key in seen:
        provs = {r["provider"]: r for r in rows if _row_key(r) == key}
        cells = []
        for p in providers:
            r = provs.get(p)
            if r is None or r["median_ms"] is None:
                cells.append("-")
            else:
                cells.append(f"{r['median_ms']:.3f} ({_fmt(r['ratio_to_base'], '.2f')}x)")
        flops = [_fmt(provs[p]["tflops"], ".2f") if p in provs else "-" for p in providers]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {key[5]} | {key[6]} | "
                     + " | ".join(cells) + " | " + " | ".join(flops) + " |")
    decode = [k for k in seen if any(r.get("wall_ms") is not None for r in rows if _row_key(r) == k)]
    if decode:
        lines += ["", "## Decode, back to back", "",
                  "Wall clock per call of calls made back to back and ended by one sync: the host work per "
                  "call counts (`do_bench` above hides it behind its L2 flush). `graph`: the forward "
                  "replayed from a CUDA graph, no host work. ms (x base, same timing).", "",
                  "| shape | T | E | r | gates | pass | mode | " + " | ".join(
                      f"{p} wall | {p} graph" for p in providers) + " |",
                  "|" + " --- |" * (7 + 2 * len(providers))]
        for key in decode:
            provs = {r["provider"]: r for r in rows if _row_key(r) == key}
            cells = []
            for p in providers:
                r = provs.get(p, {})
                for k in ("wall", "graph"):
                    ms = r.get(f"{k}_ms")
                    cells.append("-" if ms is None else f"{ms:.3f} ({_fmt(r.get(f'{k}_ratio_to_base'), '.2f')}x)")
            lines.append("| " + " | ".join(str(v) for v in key) + " | " + " | ".join(cells) + " |")
    if not report.get("complete", True):
        lines += ["", f"Incomplete run: {len(seen)} of {report.get('cases', '?')} cases measured."]
    return "\n".join(lines) + "\n"


def plot_ratios(report: dict, path: Path) -> None:
    """Ratio to the base GEMM vs T, one panel per (shape, pass, mode) of the T sweep."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in report["rows"] if r["sweep"] == "T" and r["provider"] != "base"
            and r["ratio_to_base"] is not None]
    order = {name: i for i, name in enumerate(SHAPES)}
    panels = sorted({(r["shape"], r["pass"], r.get("mode", "output")) for r in rows},
                    key=lambda p: (order.get(p[0], len(order)), p[0], p[1], p[2]))
    if not panels:
        return
    ncol = 2
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(11, 3.2 * nrow), squeeze=False)
    colors = {"triton": "tab:red", "triton_addmm": "tab:orange", "torch": "tab:blue", "loop": "tab:gray"}
    styles = {"one-hot-grouped": "-", "dense": "--"}
    for ax, (shape, pass_, mode) in zip(axes.flat, panels):
        mine = [r for r in rows if r["shape"] == shape and r["pass"] == pass_ and r.get("mode", "output") == mode]
        for provider in ("triton", "triton_addmm", "torch", "loop"):
            for gates, style in styles.items():
                pts = sorted((r["t"], r["ratio_to_base"]) for r in mine
                             if r["provider"] == provider and r["gates"] == gates)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=colors[provider],
                            label=f"{provider}, {gates}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ts = sorted({r["t"] for r in mine})
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_ylim(bottom=0)
        ax.set_title(f"{shape}, {pass_}, {mode} mode", fontsize=9)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time / base GEMM")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    env = report["env"]
    fig.suptitle(f"E=10, r=16, {report['dtype']} on {env['device']} ({env['date'][:10]})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_report(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "kernels.json", json.dumps(report, indent=1).encode())
    atomic_write_bytes(out_dir / "kernels.md", render_markdown(report).encode())
    plot_ratios(report, out_dir / "kernels.png")


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's default); 1 keeps CPU timings "
                             "steady on a machine shared with other jobs; recorded in the report")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default docs/bench/kernels-gpu or docs/bench/kernels-cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a subset: the stated targets (GPU) or the SmolLM2 shapes (CPU, under a "
                             "minute on 2 cores)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="device to benchmark (default: cuda when available)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="tensor dtype (default: bfloat16 on cuda, float32 on cpu)")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or Path("docs/bench") / ("kernels-gpu" if device == "cuda" else "kernels-cpu")
    report = run_kernel_bench(out, quick=args.quick, device=device, dtype=args.dtype)
    print(render_markdown(report))
    print(f"wrote {out / 'kernels.json'}, {out / 'kernels.md'}, {out / 'kernels.png'}")
    return 0
