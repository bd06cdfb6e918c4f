"""`modecotd-engine train`: distill every task's expert at once over the frozen student."""

from __future__ import annotations

import argparse

from ..engine.distill import TrainConfig, train
from .config_flags import add_config_flags, config_from_args


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
    add_config_flags(p, TrainConfig)  # one flag per TrainConfig field, help from its metadata
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = config_from_args(TrainConfig, args)
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
