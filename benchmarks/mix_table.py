"""Held-out accuracy of every way to use an expert bank, on the built-in seen and unseen tasks.

Columns: the base student (no expert), each single expert of the bank, the uniform average, and
the three mixing methods (search, gradient, router), each mixing from a few shots of the target
task. Rows: the built-in tasks, seen (they have an expert) then unseen (held out), with macro
averages. Writes a markdown table (default docs/mix-builtin.md) with the command that made it, and
a JSON file beside it with every figure, the mixtures' weights and their shots losses.

Works with any bank over the student: expert names need not be task names (a random bank makes a
valid, if meaningless, table).

    python benchmarks/mix_table.py --bank runs/builtin/bank            # the trained bank, built-in student
    python benchmarks/mix_table.py --bank B --student S --quick        # a smoke run in a minute

The router is task-independent: it is trained once (experts frozen) on the seen tasks' training
records, then serves every task. search and gradient mix once per target task from its shots.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

METHODS = ("base", "single", "uniform", "search", "gradient", "router")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bank", required=True, help="expert bank directory")
    p.add_argument("--student", default=None, help="student directory (default: the built-in student)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default="docs/mix-builtin.md", help="markdown report (JSON written beside it)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    p.add_argument("--mode", choices=["weight", "output"], default="weight", help="composition of the mixtures")
    p.add_argument("--n-eval", type=int, default=50, help="held-out evaluation records per task")
    p.add_argument("--shots", type=int, default=5, help="few-shot examples per target task")
    p.add_argument("--seed", type=int, default=0, help="data and search seed")
    p.add_argument("--budget", type=int, default=40, help="search candidates / gradient evaluations")
    p.add_argument("--l1", type=float, default=0.05, help="L1 penalty of search and gradient")
    p.add_argument("--router-steps", type=int, default=200, help="router training steps")
    p.add_argument("--router-records", type=int, default=100, help="training records per seen task for the router")
    p.add_argument("--top-k", type=int, default=0, help="router top-k (0 = dense softmax)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="generation budget per answer")
    p.add_argument("--batch-size", type=int, default=32, help="requests per generation batch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--mixtures-dir", default=None, help="also save every mixture here (JSON, router files)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 eval records, 2 shots, budget 4, 3 router steps, 24 new tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.n_eval, args.shots, args.budget, args.router_steps = 4, 2, 4, 3
        args.router_records, args.max_new_tokens = 8, 24
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    return args


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def run(args: argparse.Namespace) -> dict:
    import transformers

    from modecotd_engine.engine.evaluate import averages, evaluate_many
    from modecotd_engine.engine.experts import ExpertBank
    from modecotd_engine.engine.generate import GenerationConfig
    from modecotd_engine.engine.inject import inject_experts
    from modecotd_engine.engine.mix import mix
    from modecotd_engine.engine.mixture import save_mixture
    from modecotd_engine.engine.student import load_student
    from modecotd_engine.engine.tasks import (BUILTIN_TASKS, SEEN_TASKS, UNSEEN_TASKS, generate_eval,
                                              generate_records, generate_shots)

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    student = load_student(args.student, device=args.device)
    bank = ExpertBank.load(args.bank, student=student)
    tasks = list(SEEN_TASKS) + list(UNSEEN_TASKS)
    evals = {t: generate_eval(t, args.n_eval, args.seed) for t in tasks}
    shots = {t: generate_shots(t, args.shots, args.seed) for t in tasks}
    types = {t: BUILTIN_TASKS[t].task_type for t in tasks}
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    handle = inject_experts(student.model, bank, mode=args.mode)
    mixdir = Path(args.mixtures_dir) if args.mixtures_dir else None

    columns: dict[str, dict[str, float]] = {}  # column -> task -> accuracy
    details: dict[str, dict] = {}

    def evaluate(column: str, gates: dict | None) -> None:
        t0 = time.perf_counter()
        res = evaluate_many(student.model, student.tokenizer, evals, task_types=types, handle=handle,
                            gates=gates, config=config)
        columns[column] = {t: r.accuracy for t, r in res.items()}
        details.setdefault(column, {})["eval_seconds"] = round(time.perf_counter() - t0, 1)
        details[column]["unextracted"] = {t: r.unextracted for t, r in res.items()}
        avg = averages(res, seen=set(SEEN_TASKS))
        print(f"{column:>20}: seen {avg['seen']:.1%}  unseen {avg['unseen']:.1%}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    if "base" in args.methods:
        evaluate("base", None)
    if "single" in args.methods:
        for name in bank.names:
            evaluate(f"expert {name}", {t: bank.weights_vector(name) for t in tasks})
    for method in ("uniform", "search", "gradient"):
        if method not in args.methods:
            continue
        gates, info = {}, {}
        for t in tasks:
            m = mix(bank, student, shots[t], method=method, mode=args.mode, budget=args.budget, l1=args.l1,
                    seed=args.seed, target=t, bank_dir=args.bank, handle=handle)
            gates[t] = m.weight_vector(bank)
            info[t] = {"weights": m.weights, "shots_loss_before": m.shots_loss_before,
                       "shots_loss_after": m.shots_loss_after, "seconds": m.info["seconds"]}
            if mixdir is not None:
                save_mixture(m, mixdir / f"{t}.{method}.json")
        details.setdefault(method, {})["mixtures"] = info
        evaluate(method, gates)
    if "router" in args.methods:
        data = {t: generate_records(t, args.router_records, args.seed) for t in SEEN_TASKS}
        # One router for every task: trained on the seen tasks; "target" only names the shots it reports on.
        m = mix(bank, student, shots[tasks[0]], method="router", mode=args.mode, budget=args.router_steps,
                seed=args.seed, target="builtin-seen", router_data=data, top_k=args.top_k, bank_dir=args.bank,
                handle=handle)
        if mixdir is not None:
            save_mixture(m, mixdir / "router.json")
        details["router"] = {"mean_gate_on_shots": m.weights, "router_loss_first_last":
                             [m.info["router_losses"][0], m.info["router_losses"][-1]], "seconds": m.info["seconds"]}
        handle.attach_router(m.router_state, top_k=args.top_k)
        evaluate("router", None)
        handle.detach_router()
    handle.remove()

    report = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
        "device": _device_name(student.device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "student": student.identity,
        "bank": {"path": str(args.bank), "experts": bank.names, "rank": bank.rank, "alpha": bank.alpha,
                 "modules": len(bank.modules)},
        "settings": {k: getattr(args, k) for k in ("mode", "n_eval", "shots", "seed", "budget", "l1", "router_steps",
                                                   "router_records", "top_k", "max_new_tokens")},
        "seen": list(SEEN_TASKS),
        "unseen": list(UNSEEN_TASKS),
        "accuracy": columns,
        "details": details,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    _write(out, markdown(report, bank))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return report


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(r: dict, bank) -> str:
    cols = list(r["accuracy"])
    seen, unseen = r["seen"], r["unseen"]

    def cell(col, task):
        v = r["accuracy"][col].get(task)
        own = col == f"expert {task}"  # a seen task's own expert
        return "" if v is None else (f"**{v:.0%}**" if own else f"{v:.0%}")

    def avg(col, names):
        vals = [r["accuracy"][col][t] for t in names if t in r["accuracy"][col]]
        return f"{sum(vals) / len(vals):.1%}" if vals else ""

    s = r["settings"]
    lines = [
        "# Mixing the experts: held-out accuracy on the built-in tasks",
        "",
        f"- command: `{r['command']}`",
        f"- date: {r['date']}; device: {r['device']}; "
        f"versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}",
        f"- student: {r['student'].get('name')}; bank: `{r['bank']['path']}` ({len(r['bank']['experts'])} experts: "
        f"{', '.join(r['bank']['experts'])}; rank {r['bank']['rank']}, {r['bank']['modules']} modules)",
        f"- {s['n_eval']} held-out questions per task, greedy decoding (max {s['max_new_tokens']} new tokens); "
        f"mixtures from {s['shots']} shots per task, {s['mode']} composition; search/gradient budget "
        f"{s['budget']}, L1 {s['l1']}; router: {s['router_steps']} steps on {s['router_records']} records per "
        f"seen task, top-k {s['top_k']}; seed {s['seed']}; total {r['seconds']:.0f} s",
        "",
        "| task | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for group, names in (("seen", seen), ("unseen", unseen)):
        for t in names:
            lines.append(f"| {t} ({group}) | " + " | ".join(cell(c, t) for c in cols) + " |")
    lines.append("| **average seen** | " + " | ".join(avg(c, seen) for c in cols) + " |")
    lines.append("| **average unseen** | " + " | ".join(avg(c, unseen) for c in cols) + " |")
    lines += ["", "Bold: a seen task under its own expert. Averages are macro averages over tasks.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
