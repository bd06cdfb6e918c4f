"""Inference benchmark: one mixed batch over many experts against PEFT on the same student.

Workload: 64 requests (prompts of the built-in tasks) spread round-robin over 10 random LoRA
experts (rank 8 on q_proj and v_proj, B nonzero) on the student. Every provider decodes greedily
exactly ``new_tokens`` tokens per request (EOS masked, no stop string), so all do the same work
and their greedy texts can be compared.

Providers:

* ``base student (floor)``: the frozen student alone, same loop and batch: no expert work at all.
* ``ours: mixed batch``: the engine's loop, all 64 requests in one batch, one gate row per request.
* ``ours: mixed batch, 3-expert mixtures`` (full run only): every request a different dense
  mixture of 3 experts; PEFT has no way to serve that in one batch.
* ``transformers generate, student alone``: ``model.generate`` with no adapter, same batch: the
  floor of the PEFT rows, so the table separates the decoding loop from the expert work.
* ``PEFT: mixed-adapter batch``: ``PeftModel.generate(adapter_names=[...])`` over the same batch
  (PEFT loops over the adapters present in each LoRA layer).
* ``PEFT: merged, task by task``: each expert merged into the weights (``merge_adapter``), its
  requests generated as one batch, unmerged; tasks served one after another.
* ``ours: task by task`` (full run only): the engine's loop serving one expert's requests at a time.

Metrics: generated tokens per second over the whole run (prefill included), and time to first
token per request (TTFT): for a batch served at once, the time until its first token is known;
for task-by-task serving, the time the earlier tasks took plus the request's own batch's first
token. Warm-up runs are excluded; each figure is the median of ``repeats`` runs, providers
interleaved so that machine noise hits them alike.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..engine.attention import select_attention
from ..engine.atomic import atomic_write_text
from .common import ALPHA, RANK, TARGETS, device_name, load_average, random_bank, sync, versions

NUM_REQUESTS = 64
NUM_EXPERTS = 10


def _prompts(n: int) -> list[str]:
    from ..engine.tasks import BUILTIN_TASKS, generate_eval

    names = list(BUILTIN_TASKS)
    per = -(-n // len(names))
    pools = {t: [r["input"] for r in generate_eval(t, per, seed=0)] for t in names}
    return [pools[names[i % len(names)]][i // len(names)] for i in range(n)]


class _Clock:
    """Wall and process-CPU seconds of a region (CPU time: the work done, whatever else runs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self):
        sync(self.device)
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c
        return False


def _summary(clock: _Clock, tokens: int, ttft: list[float]) -> dict:
    return {"seconds": clock.wall, "cpu_seconds": clock.cpu, "tokens": tokens,
            "tokens_per_s": tokens / clock.wall if clock.wall > 0 else 0.0,
            "tokens_per_cpu_s": tokens / clock.cpu if clock.cpu > 0 else 0.0,
            "ttft_mean_s": statistics.fmean(ttft), "ttft_p50_s": statistics.median(ttft), "ttft_max_s": max(ttft)}


class _Bench:
    """Holds the student, our injected copy, PEFT's copy and the workload."""

    def __init__(self, student, *, new_tokens: int, quick: bool):
        from ..engine.inject import inject_experts

        self.tok = student.tokenizer
        self.device = student.device
        self.new_tokens = new_tokens
        self.quick = quick
        self.names = [f"expert{i}" for i in range(NUM_EXPERTS)]
        self.prompts = _prompts(NUM_REQUESTS)
        self.assign = [i % NUM_EXPERTS for i in range(NUM_REQUESTS)]  # request -> expert
        self.peft_model = copy.deepcopy(student.model)  # PEFT wraps its own copy of the student
        # ... with transformers' default attention, as a PEFT user gets it (ours may choose another)
        select_attention(self.peft_model, student.device, student.dtype, "sdpa")
        self.model = student.model
        self.bank = random_bank(self.model, self.names)
        self.exported = tempfile.TemporaryDirectory(prefix="modecotd-bench-peft-")
        for n in self.names:
            self.bank.export_peft(Path(self.exported.name) / n, n, mode="weight")
        self.handle = inject_experts(self.model, self.bank)
        self.gates = torch.stack([self.bank.weights_vector(self.names[e]) for e in self.assign])  # (64, E)
        gen = torch.Generator().manual_seed(7)
        dense = torch.zeros(NUM_REQUESTS, NUM_EXPERTS)
        for i in range(NUM_REQUESTS):
            pick = torch.randperm(NUM_EXPERTS, generator=gen)[:3]
            dense[i, pick] = torch.rand(3, generator=gen) * 1.5 - 0.5
        self.mix_gates = dense
        self.peft = self._load_peft()

    # ------------------------------------------------------------------ ours
    def _config(self, batch_size: int, new_tokens: int | None = None):
        from ..engine.generate import GenerationConfig

        n = new_tokens or self.new_tokens
        return GenerationConfig(max_new_tokens=n, stop_strings=(), batch_size=batch_size, ignore_eos=True)

    def ours(self, gates: torch.Tensor | None, new_tokens: int | None = None) -> tuple[dict, list[str]]:
        from ..engine.generate import generate_detailed

        with _Clock(self.device) as clock:
            res = generate_detailed(self.model, self.tok, self.prompts, handle=self.handle, gates=gates,
                                    config=self._config(NUM_REQUESTS, new_tokens))
        return _summary(clock, res.total_tokens, res.first_token_s), res.texts

    def ours_task_by_task(self) -> tuple[dict, list[str]]:
        from ..engine.generate import generate_detailed

        texts, ttft, tokens = [""] * NUM_REQUESTS, [0.0] * NUM_REQUESTS, 0
        clock = _Clock(self.device)
        for e in range(NUM_EXPERTS):
            idx = [i for i, a in enumerate(self.assign) if a == e]
            start = clock.wall
            with clock:
                res = generate_detailed(self.model, self.tok, [self.prompts[i] for i in idx], handle=self.handle,
                                        gates=self.gates[idx], config=self._config(NUM_REQUESTS))
            for j, i in enumerate(idx):
                texts[i], ttft[i] = res.texts[j], start + res.first_token_s[j]
            tokens += res.total_tokens
        return _summary(clock, tokens, ttft), texts

    # ------------------------------------------------------------------ PEFT
    def _load_peft(self):
        try:
            from peft import PeftModel
        except ImportError:
            return None
        d = Path(self.exported.name)
        pm = PeftModel.from_pretrained(self.peft_model, str(d / self.names[0]), adapter_name=self.names[0])
        for n in self.names[1:]:
            pm.load_adapter(str(d / n), adapter_name=n)
        pm.eval()
        return pm

    def _hf_generate(self, prompts: list[str], new_tokens: int, adapter_names=None, clock: _Clock | None = None):
        """``PeftModel.generate`` on left-padded prompts; ``clock`` times the generate call itself."""
        from ..engine.data import encode_prompt, pad_token_id

        ids = [encode_prompt(self.tok, p) for p in prompts]
        width = max(len(r) for r in ids)
        pad = pad_token_id(self.tok)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for j, r in enumerate(ids):  # left padding, as for our loop
            input_ids[j, width - len(r):] = torch.tensor(r)
            mask[j, width - len(r):] = 1
        kw = {"adapter_names": adapter_names} if adapter_names is not None else {}
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        with torch.inference_mode(), (clock or _Clock(self.device)):
            out = self.peft.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, **kw)
        new = out[:, width:]
        return self.tok.batch_decode(new.tolist(), skip_special_tokens=True), int(new.numel())

    def peft_mixed(self) -> tuple[dict, list[str]]:
        names = [self.names[e] for e in self.assign]
        probe = _Clock(self.device)  # time to first token, measured apart: a 1-token generation
        self._hf_generate(self.prompts, 1, names, clock=probe)
        clock = _Clock(self.device)
        texts, tokens = self._hf_generate(self.prompts, self.new_tokens, names, clock=clock)
        return _summary(clock, tokens, [probe.wall] * NUM_REQUESTS), texts

    def hf_floor(self) -> tuple[dict, list[str]]:
        """transformers' own ``generate`` on the student alone (PEFT's adapters disabled)."""
        with self.peft.disable_adapter():
            probe = _Clock(self.device)
            self._hf_generate(self.prompts, 1, clock=probe)
            clock = _Clock(self.device)
            texts, tokens = self._hf_generate(self.prompts, self.new_tokens, clock=clock)
        return _summary(clock, tokens, [probe.wall] * NUM_REQUESTS), texts

    def peft_merged(self) -> tuple[dict, list[str]]:
        texts, ttft, tokens = [""] * NUM_REQUESTS, [0.0] * NUM_REQUESTS, 0
        clock = _Clock(self.device)  # merging, generating, unmerging: the serving time
        for e, name in enumerate(self.names):
            idx = [i for i, a in enumerate(self.assign) if a == e]
            prompts = [self.prompts[i] for i in idx]
            self.peft.set_adapter(name)
            with clock:
                self.peft.merge_adapter()
            merged_at = clock.wall
            probe = _Clock(self.device)  # this task's time to first token, measured apart
            self._hf_generate(prompts, 1, clock=probe)
            out, n = self._hf_generate(prompts, self.new_tokens, clock=clock)
            with clock:
                self.peft.unmerge_adapter()
            for j, i in enumerate(idx):
                texts[i], ttft[i] = out[j], merged_at + probe.wall
            tokens += n
        return _summary(clock, tokens, ttft), texts


def _agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def run_infer_bench(out_dir: Path, *, student: str | None, quick: bool = False, threads: int | None = None,
                    dtype: str | None = None) -> dict:
    """Run the inference benchmark and write ``infer.json`` and ``infer.md`` under ``out_dir``.

    Args:
        out_dir: output directory (created).
        student: student model directory; None loads the built-in SmolLM2-135M-Instruct.
        quick: 32 new tokens per request, three timed runs, the main providers (about 12 minutes on
            2 CPU cores); otherwise 64 new tokens, five timed runs, and the extra providers.
        threads: torch CPU threads for the run (None: keep torch's setting). On a CPU shared with
            other work, 1 thread gives stable figures: with more threads than free cores, every
            matmul waits for its slowest thread (measured here: a (64, 576) x (576, 576) matmul took
            0.5 ms on 1 thread and 16-24 ms on 2 threads while other processes held the 2 cores).
        dtype: the student's dtype for every provider; None: ``infer``'s default (``auto``: bfloat16
            on CUDA and on CPUs with native bf16 math, float32 otherwise).

    Returns:
        The result dict written to ``infer.json``.
    """

    out_dir = Path(out_dir)
    new_tokens, repeats = (32, 3) if quick else (64, 5)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(out_dir, student, quick, new_tokens, repeats, dtype)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out_dir: Path, student: str | None, quick: bool, new_tokens: int, repeats: int, dtype: str | None) -> dict:
    from ..engine.student import load_student

    load_before = load_average()
    st = load_student(student, dtype=dtype or "auto")
    bench = _Bench(st, new_tokens=new_tokens, quick=quick)
    floor_gates = torch.zeros(NUM_REQUESTS, NUM_EXPERTS)

    providers = {
        "base student (floor)": lambda: bench.ours(floor_gates),
        "ours: mixed batch": lambda: bench.ours(bench.gates),
    }
    if not quick:
        providers["ours: mixed batch, 3-expert mixtures"] = lambda: bench.ours(bench.mix_gates)
        providers["ours: task by task"] = bench.ours_task_by_task
    if bench.peft is not None:
        providers["transformers generate, student alone"] = bench.hf_floor
        providers["PEFT: mixed-adapter batch"] = bench.peft_mixed
        providers["PEFT: merged, task by task"] = bench.peft_merged

    # Warm-up (excluded): every code path once, with a short generation.
    bench.ours(bench.gates, new_tokens=2)
    if bench.peft is not None:
        bench._hf_generate(bench.prompts[:8], 2, [bench.names[e] for e in bench.assign[:8]])
        bench._hf_generate(bench.prompts[:8], 2)

    runs: dict[str, list[dict]] = {k: [] for k in providers}
    texts: dict[str, list[str]] = {}
    for _ in range(repeats):
        for name, fn in providers.items():  # interleaved: noise hits every provider alike
            summary, out = fn()
            runs[name].append(summary)
            texts[name] = out
    rows = {}
    for name, rs in runs.items():
        best = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        rows[name] = best
    peft_names = [n for n in rows if n.startswith("PEFT")]
    peft_best = max((rows[n]["tokens_per_s"] for n in peft_names), default=None)
    peft_best_cpu = max((rows[n]["tokens_per_cpu_s"] for n in peft_names), default=None)
    ours = rows["ours: mixed batch"]["tokens_per_s"]
    ours_cpu = rows["ours: mixed batch"]["tokens_per_cpu_s"]
    floor = rows["base student (floor)"]["tokens_per_s"]
    for name, r in rows.items():
        r["vs_floor"] = r["tokens_per_s"] / floor if floor else None
        r["vs_peft_best"] = r["tokens_per_s"] / peft_best if peft_best else None
        r["vs_peft_best_cpu"] = r["tokens_per_cpu_s"] / peft_best_cpu if peft_best_cpu else None
    agreement = {}
    if "PEFT: mixed-adapter batch" in texts:
        agreement["ours vs PEFT mixed-adapter batch"] = _agreement(texts["ours: mixed batch"],
                                                                   texts["PEFT: mixed-adapter batch"])
        agreement["ours vs PEFT merged"] = _agreement(texts["ours: mixed batch"], texts["PEFT: merged, task by task"])
        agreement["our floor vs transformers generate"] = _agreement(texts["base student (floor)"],
                                                                     texts["transformers generate, student alone"])
    prompt_tokens = [len(t) for t in bench.tok(bench.prompts)["input_ids"]]
    result = {
        "benchmark": "infer",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(bench.device),
        "dtype": str(st.dtype).replace("torch.", ""),
        "attention": {"ours": bench.model.config._attn_implementation,
                      "peft": bench.peft_model.config._attn_implementation},
        "versions": versions("peft", "triton"),
        "student": st.identity,
        "workload": {"requests": NUM_REQUESTS, "experts": NUM_EXPERTS, "rank": RANK, "alpha": ALPHA,
                     "targets": list(TARGETS), "new_tokens_per_request": new_tokens, "greedy": True,
                     "prompt_tokens_min": min(prompt_tokens), "prompt_tokens_max": max(prompt_tokens),
                     "prompt_tokens_mean": statistics.fmean(prompt_tokens), "repeats": repeats, "quick": quick},
        "providers": rows,
        "runs": runs,
        "load_average_before_after": [load_before, load_average()],
        "speedup_vs_peft_best": ours / peft_best if peft_best else None,
        "speedup_vs_peft_best_cpu_time": ours_cpu / peft_best_cpu if peft_best_cpu else None,
        "threads": torch.get_num_threads(),
        "greedy_text_agreement": agreement,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "infer.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out_dir / "infer.md", _markdown(result))
    bench.exported.cleanup()
    return result


def _markdown(r: dict) -> str:
    w = r["workload"]
    lines = [
        "# Inference benchmark: mixed-expert batch vs PEFT",
        "",
        f"- date: {r['date']}",
        f"- device: {r['device']}, dtype {r['dtype']}, attention: ours {r['attention']['ours']}, PEFT and "
        f"transformers generate {r['attention']['peft']} (transformers' default)"
        + (f"; load average before/after {load}" if (load := r.get("load_average_before_after")) else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v),
        f"- student: {r['student'].get('name')} ({r['student'].get('num_parameters', 0) / 1e6:.0f}M parameters)",
        f"- workload: {w['requests']} requests over {w['experts']} random experts (rank {w['rank']} on "
        f"{', '.join(w['targets'])}), prompts {w['prompt_tokens_min']}-{w['prompt_tokens_max']} tokens "
        f"(mean {w['prompt_tokens_mean']:.0f}), {w['new_tokens_per_request']} new tokens each, greedy; "
        f"median of {w['repeats']} run(s)" + (" (quick run)" if w["quick"] else ""),
        "",
        "Generated tokens per second of wall time and per second of process CPU time (the work done,",
        "whatever else the machine runs), time to first token (TTFT), and the ratios to the floor (the",
        "student alone) and to the better of the two PEFT ways to serve the same requests.",
        "",
        "| provider | tokens/s | x floor | x PEFT best | tokens/CPU-s | x PEFT best (CPU) | TTFT mean (s) "
        "| TTFT max (s) | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(x):
        return f"{x:.2f}" if x else "-"

    for name, p in r["providers"].items():
        lines.append(f"| {name} | {p['tokens_per_s']:.1f} | {p['vs_floor']:.2f} | {ratio(p['vs_peft_best'])} | "
                     f"{p['tokens_per_cpu_s']:.1f} | {ratio(p['vs_peft_best_cpu'])} | {p['ttft_mean_s']:.2f} | "
                     f"{p['ttft_max_s']:.2f} | {p['seconds']:.1f} |")
    if r["speedup_vs_peft_best"]:
        lines += ["", f"ours (mixed batch) / PEFT best: **{r['speedup_vs_peft_best']:.2f}x** generated tokens/s "
                  f"(wall), **{r['speedup_vs_peft_best_cpu_time']:.2f}x** per CPU second."]
    ours_p, peft_p = r["providers"].get("ours: mixed batch"), r["providers"].get("PEFT: mixed-adapter batch")
    if ours_p and peft_p:
        def decode_rate(p):  # tokens after each request's first one, over the time after the first token
            return (p["tokens"] - w["requests"]) / max(p["seconds"] - p["ttft_mean_s"], 1e-9)

        lines += ["", f"Where it comes from (one batch of {w['requests']}): the prompts' prefill (time to first token) "
                  f"{ours_p['ttft_mean_s']:.2f} s ours vs {peft_p['ttft_mean_s']:.2f} s PEFT mixed-adapter batch; "
                  f"decoding after the first token {decode_rate(ours_p):.0f} vs {decode_rate(peft_p):.0f} tokens/s."]
    floor = r["providers"].get("base student (floor)", {}).get("vs_peft_best_cpu")
    if floor:
        lines += ["", f"Ceiling: the student alone, no expert work, in our loop: {floor:.2f}x PEFT best per CPU "
                  "second. Whatever the expert path costs comes off that."]
    lines += ["", "On a machine shared with other work, wall-clock ratios move by tens of percent from run to run; "
              "the per-CPU-second ratios are the steadier figure."]
    if r["greedy_text_agreement"]:
        lines += ["", "Greedy texts identical to ours: " + ", ".join(
            f"{k.replace('ours vs ', '')} {v:.0%}" for k, v in r["greedy_text_agreement"].items())]
    return "\n".join(lines) + "\n"
