"""Shared vs independent initialisation of the experts' A: what weight-mode mixing does with each.

Weight composition (LoraHub-style) merges a mixture as ``(sum_i w_i B_i)(sum_j w_j A_j)``; output
composition sums the experts' updates, ``sum_i w_i B_i A_i``. The two differ by the cross terms
``w_i w_j B_i A_j`` (i != j). When every expert starts from the same A (separate PEFT runs from one
seed; ``ExpertBank.create``'s default) the A's stay correlated in training and a cross term resembles
the update of expert i; with an independent random A per expert (``train --independent-init``) it is
a product of unrelated projections. This script measures, for banks trained on the same data with the
same settings but different initialisation:

- the geometry: the mean cosine between two experts' A (and B) per module, and for a gate w the size
  of weight composition's update against output composition's, ``|Dw| / |Do|``, and their
  difference ``|Dw - Do| / |Do|`` (median over modules). With one A for every expert exactly,
  ``Dw = sum(w) Do``: the compositions agree for gates summing to 1;
- the held-out loss (token-mean cross-entropy on the teacher rationales of evaluation records, the
  objective ``mix`` minimises, :class:`~modecotd_engine.engine.mix.ShotsObjective`) of every seen task
  under: the student (w = 0), its own expert, the uniform average (w = 1/E), its own expert at 0.5
  with 0.5/(E-1) for each other one, and the plain sum (w = 1 each), in both compositions.

Accuracy by generation is measured with ``modecotd-engine eval`` (the report's command list).

    python benchmarks/shared_init_ab.py --bank shared=RUN_A/bank --bank independent=RUN_B/bank \\
        --data RUN/data/eval --tasks addsub,date_understanding --limit 40 --out docs/real-data-run4/shared-init
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

GATES = ("base", "own", "uniform", "own-heavy", "sum")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bank", action="append", required=True, metavar="NAME=DIR",
                   help="a bank to measure, named NAME in the report (repeat for each bank)")
    p.add_argument("--data", required=True,
                   help="evaluation directory: one NAME.json per seen task, records {input, output} with the "
                        "teacher's full output (the rationale and its '--> answer END')")
    p.add_argument("--tasks", default=None, help="comma-separated seen tasks (default: the first bank's experts)")
    p.add_argument("--limit", type=int, default=40, help="records per task (default: 40)")
    p.add_argument("--student", default=None, help="student directory (default: the built-in student)")
    p.add_argument("--dtype", default="auto", help="student dtype (default: auto, as training and eval)")
    p.add_argument("--max-len", type=int, default=320, help="max tokens per record, as in training (default: 320)")
    p.add_argument("--out", required=True, help="output directory: ab.json and ab.md")
    args = p.parse_args(argv)
    banks = []
    for spec in args.bank:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            p.error(f"--bank takes NAME=DIR, got {spec!r}")
        banks.append((name, path))
    args.banks = banks
    return args


def gate_vectors(names: list[str], task: str) -> dict[str, torch.Tensor]:
    """The gates measured for ``task`` over a bank's experts ``names`` (``task`` must be one of them)."""
    e = len(names)
    own = torch.zeros(e)
    own[names.index(task)] = 1.0
    heavy = torch.full((e,), 0.5 / max(e - 1, 1))
    heavy[names.index(task)] = 0.5
    return {"base": torch.zeros(e), "own": own, "uniform": torch.full((e,), 1.0 / e), "own-heavy": heavy,
            "sum": torch.ones(e)}


def geometry(bank, gates: dict[str, torch.Tensor]) -> dict:
    """Cosines between experts' A and B, and weight vs output composition's update per gate (medians
    over the bank's modules), in float64."""
    e = bank.num_experts
    cos_a, cos_b = [], []
    ratio: dict[str, list[float]] = {g: [] for g in gates}
    diff: dict[str, list[float]] = {g: [] for g in gates}
    for m in bank.modules:
        a = bank.lora_a[m].detach().double()  # (E, r, K)
        b = bank.lora_b[m].detach().double()  # (E, N, r)
        fa, fb = a.reshape(e, -1), b.reshape(e, -1)
        na = torch.nn.functional.normalize(fa, dim=1)
        nb = torch.nn.functional.normalize(fb, dim=1)
        off = ~torch.eye(e, dtype=torch.bool)
        cos_a.append(float((na @ na.T)[off].mean()))
        cos_b.append(float((nb @ nb.T)[off].mean()))
        for g, w in gates.items():
            w = w.double()
            dw = torch.einsum("e,enr->nr", w, b) @ torch.einsum("e,erk->rk", w, a)
            do = torch.einsum("e,enr,erk->nk", w, b, a)
            n_o = float(do.norm())
            ratio[g].append(float(dw.norm()) / n_o)
            diff[g].append(float((dw - do).norm()) / n_o)
    return {"cos_a": statistics.median(cos_a), "cos_b": statistics.median(cos_b),
            "weight_over_output": {g: statistics.median(v) for g, v in ratio.items()},
            "weight_minus_output": {g: statistics.median(v) for g, v in diff.items()}}


def held_out_losses(student, bank, records: dict[str, list[dict]], max_len: int) -> dict:
    """task -> gate -> {"output": loss, "weight": loss} (base and own: one value, the compositions agree)."""
    from modecotd_engine.engine.inject import inject_experts
    from modecotd_engine.engine.mix import ShotsObjective, prepare_shots

    handle = inject_experts(student.model, bank, mode="output")
    student.model.eval()
    out: dict[str, dict] = {}
    try:
        for task, recs in records.items():
            batches = prepare_shots(recs, student.tokenizer, target=task, max_len=max_len, device=student.device,
                                    prompt_format=bank.prompt_format)
            objective = ShotsObjective(handle, batches, l1=0.0)
            row = {}
            for g, w in gate_vectors(bank.names, task).items():
                row[g] = {}
                for mode in ("output", "weight") if g not in ("base", "own") else ("output",):
                    handle.set_mode(mode)
                    row[g][mode] = objective.loss(w)
                print(f"  {task:<28} {g:<10} " + "  ".join(f"{k} {v:.4f}" for k, v in row[g].items()), flush=True)
            out[task] = row
    finally:
        handle.remove()
    return out


def run(args: argparse.Namespace) -> dict:
    import transformers

    from modecotd_engine.engine.atomic import atomic_write_text
    from modecotd_engine.engine.experts import ExpertBank
    from modecotd_engine.engine.student import load_student

    t0 = time.perf_counter()
    student = load_student(args.student, dtype=args.dtype)
    data = Path(args.data)
    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
        "device": f"CPU {platform.machine()} ({os.cpu_count()} cores)" if student.device.type == "cpu"
        else torch.cuda.get_device_name(student.device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "dtype": str(student.dtype),
        "limit": args.limit,
        "banks": {},
    }
    for name, path in args.banks:
        bank = ExpertBank.load(path, student=student)
        tasks = args.tasks.split(",") if args.tasks else list(bank.names)
        missing = [t for t in tasks if t not in bank.names]
        if missing:
            raise SystemExit(f"bank {path}: no expert for task(s) {', '.join(missing)}")
        records = {}
        for t in tasks:
            f = data / f"{t}.json"
            if not f.is_file():
                raise SystemExit(f"{f}: no evaluation file for task {t}")
            records[t] = json.loads(f.read_text())[: args.limit]
        e = bank.num_experts
        geo_gates = {"uniform": torch.full((e,), 1.0 / e), "sum": torch.ones(e),
                     "own-heavy": gate_vectors(bank.names, tasks[0])["own-heavy"]}
        print(f"bank {name} ({path}): {e} experts", flush=True)
        geo = geometry(bank, geo_gates)
        print(f"  cos A {geo['cos_a']:.3f}  cos B {geo['cos_b']:.3f}  |Dw|/|Do| "
              + "  ".join(f"{g} {v:.3f}" for g, v in geo["weight_over_output"].items()), flush=True)
        losses = held_out_losses(student, bank, records, args.max_len)
        report["banks"][name] = {"path": str(path), "experts": bank.names, "rank": bank.rank,
                                 "modules": len(bank.modules), "geometry": geo, "loss": losses}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ab.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "ab.md", markdown(report))
    print(f"wrote {out / 'ab.md'} and {out / 'ab.json'}")
    return report


def markdown(r: dict) -> str:
    names = list(r["banks"])
    lines = [
        "# Shared vs independent initialisation of A: held-out loss and geometry",
        "",
        f"- command: `{r['command']}`",
        f"- date: {r['date']}; device: {r['device']}; "
        f"versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}; {r['seconds']:.0f} s",
        f"- held-out loss: token-mean cross-entropy on the teacher's output of the first {r['limit']} evaluation "
        "records of each task (mix's objective); Dw / Do: the update of weight / output composition; gates: base w = 0, own (one-hot), uniform w = 1/E, own-heavy "
        "(0.5 own, 0.5/(E-1) each other), sum (w = 1 each)",
        "",
        "## Geometry (median over modules)",
        "",
        "| bank | cos(A_i, A_j) | cos(B_i, B_j) | " + " | ".join(
            f"norm Dw / norm Do, {g} | norm (Dw - Do) / norm Do, {g}" for g in r["banks"][names[0]]["geometry"]["weight_over_output"]) + " |",
        "|---|---:|---:|" + "---:|---:|" * len(r["banks"][names[0]]["geometry"]["weight_over_output"]),
    ]
    for n in names:
        g = r["banks"][n]["geometry"]
        lines.append(f"| {n} | {g['cos_a']:.3f} | {g['cos_b']:.3f} | " + " | ".join(
            f"{g['weight_over_output'][k]:.3f} | {g['weight_minus_output'][k]:.3f}" for k in g["weight_over_output"]) + " |")
    lines += ["", "## Held-out loss per task", "",
              "| task | gate | " + " | ".join(f"{n} output | {n} weight" for n in names) + " |",
              "|---|---|" + "---:|---:|" * len(names)]
    tasks = list(r["banks"][names[0]]["loss"])
    means: dict[tuple[str, str, str], list[float]] = {}
    for t in tasks:
        for g in GATES:
            cells = []
            for n in names:
                row = r["banks"][n]["loss"].get(t, {}).get(g, {})
                for mode in ("output", "weight"):
                    v = row.get(mode, row.get("output"))
                    cells.append("" if v is None else f"{v:.4f}")
                    if v is not None:
                        means.setdefault((g, n, mode), []).append(v)
            lines.append(f"| {t} | {g} | " + " | ".join(cells) + " |")
    for g in GATES:
        cells = []
        for n in names:
            for mode in ("output", "weight"):
                v = means.get((g, n, mode))
                cells.append(f"**{sum(v) / len(v):.4f}**" if v else "")
        lines.append(f"| **mean** | {g} | " + " | ".join(cells) + " |")
    lines += ["", "base and own: one composition (they agree: w = 0, or one expert at weight 1).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
