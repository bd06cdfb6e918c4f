"""`modecotd-engine train`: distill every task's expert at once over the frozen student."""

from __future__ import annotations

import argparse

from ..engine.data import PROMPT_FORMATS
from ..engine.distill import TrainConfig, train

_D = TrainConfig()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="distill chain-of-thought into one LoRA expert per task (all tasks at once)",
        description="Train one LoRA expert per task over the frozen student, all tasks in the same run: each "
        "example's gate is one-hot on its task. With no arguments: the built-in student "
        "(SmolLM2-135M-Instruct) on the built-in seen tasks, outputs under runs/<timestamp>/. "
        "Multi-process: torchrun --nproc-per-node N modecotd-engine train --out DIR ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--student", default=None, help="student model directory (Hugging Face layout, safetensors); "
                   "default: the built-in SmolLM2-135M-Instruct")
    p.add_argument("--data", default=None, help="directory of task files NAME.json/NAME.jsonl "
                   "({input, output} records, output = rationale, '-->' line, answer, END); one expert per file; "
                   "default: the built-in seen tasks")
    p.add_argument("--tasks", default="", help="comma-separated subset of the data's tasks (default: all)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--rank", type=int, default=_D.rank, help="LoRA rank r of every expert")
    p.add_argument("--alpha", type=float, default=_D.alpha, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--targets", default=",".join(_D.targets),
                   help="comma-separated target Linear modules: last name component (q_proj) or a full-name regex")
    p.add_argument("--steps", type=int, default=_D.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help="sequences per micro-batch (global)")
    p.add_argument("--grad-accum", type=int, default=_D.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=_D.lr, help="peak learning rate (AdamW)")
    p.add_argument("--min-lr-ratio", type=float, default=_D.min_lr_ratio, help="final lr as a fraction of --lr (cosine)")
    p.add_argument("--warmup", type=int, default=_D.warmup, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=_D.weight_decay, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=_D.clip, help="gradient-norm clipping threshold")
    p.add_argument("--max-len", type=int, default=_D.max_len, help="max tokens per example (prompt truncated from the left)")
    p.add_argument("--n-train", type=int, default=_D.n_train, help="built-in tasks: training examples per task")
    p.add_argument("--n-eval", type=int, default=_D.n_eval,
                   help="held-out examples per task scored before and after training (0 skips)")
    p.add_argument("--eval-max-new-tokens", type=int, default=_D.eval_max_new_tokens,
                   help="generation budget per held-out example, in tokens")
    p.add_argument("--eval-batch-size", type=int, default=_D.eval_batch_size, help="sequences per generation batch")
    p.add_argument("--no-eval-before", action="store_true", help="skip the accuracy measurement before training")
    p.add_argument("--save-every", type=int, default=_D.save_every, help="checkpoint every N steps (and at the end)")
    p.add_argument("--seed", type=int, default=_D.seed, help="seed for data order, initialisation and built-in tasks")
    p.add_argument("--missing-marker", choices=["drop", "keep", "error"], default=_D.missing_marker,
                   help="what to do with training outputs that lack the '-->' answer marker")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=_D.prompt_format,
                   help="plain: prompts as written in the data; chat: each prompt as the user turn of the student's "
                   "chat template (recorded in the bank; infer, eval and mix then use it too)")
    p.add_argument("--independent-init", action="store_true",
                   help="draw an independent random A for every expert (default: all experts start from the same A, "
                   "as separate runs from one seed do, which weight-mode mixing relies on)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=_D.dtype,
                   help="student dtype; auto: bfloat16 on CUDA and on CPUs with native bf16 math (about 2x "
                   "faster there), float32 otherwise. LoRA weights and optimizer state stay float32")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default=_D.backend,
                   help="mixture kernel backend (auto: triton on CUDA, torch on CPU)")
    p.add_argument("--attention", default=_D.attention,
                   help="student attention: auto (the engine's grouped-query matmul attention on CPU with bf16/fp16 "
                   "weights, measured ~30%% faster per step there; transformers' default elsewhere), grouped, sdpa, eager")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = TrainConfig(
        student=args.student, data=args.data, out=args.out, resume=args.resume,
        tasks=tuple(t for t in args.tasks.split(",") if t), rank=args.rank, alpha=args.alpha,
        targets=tuple(t for t in args.targets.split(",") if t), steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
        weight_decay=args.weight_decay, clip=args.clip, max_len=args.max_len, n_train=args.n_train,
        n_eval=args.n_eval, eval_max_new_tokens=args.eval_max_new_tokens, eval_batch_size=args.eval_batch_size,
        eval_before=not args.no_eval_before, save_every=args.save_every, seed=args.seed,
        missing_marker=args.missing_marker, device=args.device, dtype=args.dtype, backend=args.backend,
        attention=args.attention, prompt_format=args.prompt_format, shared_init=not args.independent_init,
        progress=not args.no_progress,
    )
    res = train(cfg)
    if not res.is_main:
        return 0
    print(f"experts: {res.bank_dir}")
    print(f"metrics: {res.out_dir / 'metrics.jsonl'}  loss curves: {res.out_dir / 'loss.png'}")
    if res.tokens_per_s:
        print(f"throughput: {res.tokens_per_s:.0f} supervised tokens/s")
    if res.table:
        print("\nheld-out accuracy per task expert:\n" + res.table)
    return 0
