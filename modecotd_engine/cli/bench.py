"""`modecotd-engine bench`: kernel and pipeline benchmarks, written as JSON/markdown/PNG reports."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark the kernels, training, mixing, inference and serving against baselines",
        description="Side-by-side measurements in one run (never timed tests). Each suite writes JSON and a "
        "markdown table (and a PNG where a curve says more) into --out, with device, versions and date.",
    )
    sub = p.add_subparsers(dest="suite", metavar="SUITE", required=True)
    k = sub.add_parser("kernels", help="fused Triton op vs base GEMM (floor), grouped torch path, per-expert loop")
    k.add_argument("--out", default="docs/bench/kernels", help="report directory")
    k.add_argument("--quick", action="store_true", help="a small subset of shapes (minutes on CPU)")
    k.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    t = sub.add_parser("train", help="distillation loop vs PEFT + transformers Trainer (supervised tokens/s)")
    t.add_argument("--out", default="docs/bench/train", help="report directory")
    t.add_argument("--student", default=None, help="student directory (default: the built-in student)")
    t.add_argument("--steps", type=int, default=20, help="optimizer steps for each side")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="student dtype for both sides (default: the training loop's auto choice)")
    t.add_argument("--repeats", type=int, default=3,
                   help="rounds; each runs every trainer once, in alternating order; speed-ups are medians over rounds")
    t.add_argument("--quick", action="store_true", help="at most 10 steps, one round")
    m = sub.add_parser("mix", help="one search (budget 40) vs merging LoRA weights per candidate (the paper's way)")
    m.add_argument("--out", default="docs/bench/mix", help="report directory")
    m.add_argument("--student", default=None, help="student directory (default: the built-in student)")
    m.add_argument("--quick", action="store_true", help="smaller budget")
    i = sub.add_parser("infer", help="mixed-expert batched generation vs PEFT (tokens/s, time to first token)")
    i.add_argument("--out", default="docs/bench/infer", help="report directory")
    i.add_argument("--student", default=None, help="student directory (default: the built-in student)")
    i.add_argument("--quick", action="store_true", help="fewer requests and tokens")
    i.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="student dtype of every provider (auto: as `infer`: bf16 on CUDA and on CPUs with native bf16)")
    i.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's setting; 1 gives steadier figures on a shared CPU)")
    e = sub.add_parser("eval", help="evaluation with continuous batching vs fixed batches that drain (tokens/s)")
    e.add_argument("--out", default="docs/bench/eval-loop", help="report directory")
    e.add_argument("--bank", required=True, help="expert bank; each task is served by its expert (by name) if any")
    e.add_argument("--data", required=True, help="evaluation file or directory (as `eval --data`)")
    e.add_argument("--tasks", default="", help="comma-separated subset of the tasks (default: all)")
    e.add_argument("--limit", type=int, default=30, help="records per task (default 30)")
    e.add_argument("--max-new-tokens", type=int, default=160, help="generated tokens per record at most (default 160)")
    e.add_argument("--batch-size", type=int, default=32, help="rows decoding together at most (default 32)")
    e.add_argument("--student", default=None, help="student directory (default: the built-in student)")
    e.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="student dtype (auto: as `eval`: bf16 on CUDA and on CPUs with native bf16)")
    s = sub.add_parser("serve", help="the HTTP server under Poisson arrivals vs the offline engine loop and a "
                       "server that merges one adapter at a time (tokens/s, TTFT, time per output token)")
    s.add_argument("--out", default="docs/bench/serve", help="report directory")
    s.add_argument("--student", default=None, help="student directory (default: the built-in student)")
    s.add_argument("--bank", default=None, help="expert bank (default: --experts random experts over the student)")
    s.add_argument("--experts", type=int, default=10, help="random experts made without --bank (default 10)")
    s.add_argument("--requests", type=int, default=64, help="requests, half single experts, half two-expert "
                   "weighted mixtures (default 64)")
    s.add_argument("--rate", type=float, default=8.0, help="Poisson arrival rate, requests per second (default 8)")
    s.add_argument("--new-tokens", type=int, default=64, help="tokens each request generates (default 64)")
    s.add_argument("--batch-size", type=int, default=32, help="rows decoding together at most (default 32)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    s.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="student dtype (auto: as `serve`: bf16 on CUDA and on CPUs with native bf16)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's setting)")
    s.add_argument("--seed", type=int, default=0, help="seed of the arrival times (default 0)")
    s.add_argument("--repeats", type=int, default=2,
                   help="rounds; each runs every provider, in rotating order; figures are medians (default 2)")
    s.add_argument("--no-merged", action="store_true",
                   help="leave out the merged-adapter server (one expert or mixture at a time merged into a second "
                   "copy of the student's weights; other adapters wait until its batch is empty)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.suite == "kernels":
        from ..bench.kernels import run_kernel_bench

        run_kernel_bench(out, quick=args.quick, device=args.device)
    elif args.suite == "train":
        from ..bench.train import run_train_bench

        run_train_bench(out, student=args.student, steps=args.steps, batch_size=args.batch_size,
                        quick=args.quick, dtype=args.dtype, repeats=args.repeats)
    elif args.suite == "mix":
        from ..bench.mix import run_mix_bench

        run_mix_bench(out, student=args.student, quick=args.quick)
    elif args.suite == "infer":
        from ..bench.infer import run_infer_bench

        run_infer_bench(out, student=args.student, quick=args.quick, dtype=args.dtype, threads=args.threads)
    elif args.suite == "eval":
        from ..bench.evalloop import run_eval_bench

        run_eval_bench(out, bank=args.bank, data=args.data, tasks=args.tasks, limit=args.limit,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, student=args.student,
                       dtype=args.dtype)
    elif args.suite == "serve":
        from ..bench.serve import run_serve_bench

        run_serve_bench(out, student=args.student, bank=args.bank, requests=args.requests, rate=args.rate,
                        new_tokens=args.new_tokens, batch_size=args.batch_size, experts=args.experts,
                        device=args.device, dtype=args.dtype, threads=args.threads, seed=args.seed, repeats=args.repeats,
                        merged=not args.no_merged)
    print(f"report written under {out}")
    return 0
