"""Training throughput: the engine's distillation loop against PEFT + transformers Trainer.

Both sides train the same experts on the same student, rank, targets and batches for the same number
of steps. The engine trains every task's expert at once (one-hot gates, logits only at supervised
positions); the baseline trains one PEFT LoRA adapter per task, one task after another, with the
transformers Trainer (full-vocabulary logits at every position, as ``model(labels=...)`` computes).
Reported: supervised tokens/s over the timed steps (the first step of each run is warm-up and not
timed), peak memory, and the final loss of each side.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .common import device_name, versions
from ..engine.data import BatchPlan, pad_token_id, tokenize_records
from ..engine.atomic import atomic_write_text
from ..engine.attention import select_attention
from ..engine.distill import LossModule, TrainConfig, lr_at, train_step
from ..engine.experts import ExpertBank
from ..engine.fused import fused_norms_enabled, use_fused_norms
from ..engine.inject import inject_experts
from ..engine.optim import ExpertAdamW
from ..engine.student import load_student
from ..engine.tasks import SEEN_TASKS, generate_records


def _env(device: torch.device) -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": device_name(device),
            **versions("peft")}


def _plan(student, tasks, n_train, batch_size, max_len, seed):
    examples = {t: tokenize_records(generate_records(t, n_train, seed), student.tokenizer, task=t,
                                    max_len=max_len)[0] for t in tasks}
    index = {t: i for i, t in enumerate(sorted(tasks))}
    return BatchPlan(examples, batch_size=batch_size, seed=seed, task_index=index,
                     pad_id=pad_token_id(student.tokenizer)), index


def _ours(student, plan, index, cfg: TrainConfig, steps: int, device) -> dict:
    model = student.model
    names = sorted(index)
    bank = ExpertBank.create(model, names, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, seed=0)
    handle = inject_experts(model, bank, trainable=True)
    params = handle.lora_parameters()
    opt = ExpertAdamW(params, len(names), lr=cfg.lr, weight_decay=0.0)
    model.train()
    loss_module = LossModule(model)
    timed_tokens, timed_s, last = 0, 0.0, {}
    for step in range(steps):
        b = plan.batch(step)
        t0 = time.perf_counter()
        # the training loop's own step function (distill.train_step), not a copy of it
        stats = train_step(loss_module, handle, opt, params, [b], names, lr=lr_at(step, cfg), clip=cfg.clip,
                           device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        task = names[int(b.task_ids[0])]
        last[task] = float(stats.task_loss_sum[task]) / max(1, stats.task_tokens[task])
        if step > 0:
            timed_tokens += b.num_tokens
            timed_s += dt
    model.eval()
    handle.remove()
    return {"tokens_per_s": timed_tokens / timed_s, "timed_tokens": timed_tokens, "timed_s": timed_s,
            "final_loss_per_task": last}


def _peft(student, plan, index, cfg: TrainConfig, steps: int, device) -> dict:
    """One PEFT adapter per task, trained with the transformers Trainer on that task's batches."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    names = sorted(index)
    per_task: dict[str, list] = {n: [] for n in names}
    task_steps: dict[str, list[int]] = {n: [] for n in names}
    for step in range(steps):  # the same batches the engine sees, split by task
        b = plan.batch(step)
        per_task[names[int(b.task_ids[0])]].append(b)
        task_steps[names[int(b.task_ids[0])]].append(step)

    class _Timer(TrainerCallback):
        def __init__(self):
            self.t = []

        def on_step_begin(self, args, state, control, **kw):
            self.t.append([time.perf_counter(), None])

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t[-1][1] = time.perf_counter()

    class _Batches(torch.utils.data.Dataset):
        def __init__(self, batches):
            self.b = batches

        def __len__(self):
            return len(self.b)

        def __getitem__(self, i):
            b = self.b[i]
            return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    timed_tokens, timed_s, last = 0, 0.0, {}
    base = student.model
    for name in names:
        batches = per_task[name]
        if not batches:
            continue
        lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=0.0)
        model = get_peft_model(base, lcfg)
        timer = _Timer()
        args = TrainingArguments(
            output_dir="/tmp/modecotd-bench-peft", per_device_train_batch_size=1, max_steps=len(batches),
            learning_rate=cfg.lr, max_grad_norm=cfg.clip, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=device.type != "cuda", disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )
        # Each batch gets the lr the engine gives it at the same global step, so both sides see the same
        # schedule and their final losses can be compared.
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
        own = task_steps[name]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i, own=own: lr_at(own[min(i, len(own) - 1)], cfg) / cfg.lr)
        trainer = Trainer(model=model, args=args, train_dataset=_Batches(batches), optimizers=(opt, sched),
                          data_collator=lambda items: items[0], callbacks=[timer])
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        last[name] = losses[-1] if losses else None
        for (t0, t1), b in list(zip(timer.t, batches))[1:]:
            timed_tokens += b.num_tokens
            timed_s += t1 - t0
        base = model.unload()  # the frozen student without LoRA layers, for the next task
    student.model = base
    return {"tokens_per_s": timed_tokens / timed_s if timed_s else None, "timed_tokens": timed_tokens,
            "timed_s": timed_s, "final_loss_per_task": last}


def run_train_bench(out_dir: Path, *, student: str | None = None, steps: int = 20, batch_size: int = 8,
                    quick: bool = False, dtype: str | None = None, repeats: int = 3) -> dict:
    """Measure both trainers side by side; write train-bench.json and train-bench.md into ``out_dir``.

    ``dtype`` None is the training loop's default (``--dtype auto``: bfloat16 on CUDA and on CPUs
    with native bf16 math). The PEFT side runs on the same student in the same dtype, once as a PEFT
    user gets it (transformers' default attention and RMSNorm) and, where the engine swaps in its own
    attention or norms for this device and dtype, once more given those, so the share of the
    speed-up that comes from them is visible.

    The runs go in ``repeats`` rounds, each round running every trainer once, in alternating order
    (engine first, then last), so slow drifts of a shared machine hit both sides alike. Each
    speed-up is the median over the rounds of that round's ratio.
    """
    if quick:
        steps, repeats = min(steps, 10), 1
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st = load_student(student, dtype=dtype or "auto")
    device = st.device
    engine_attention = st.model.config._attn_implementation
    engine_norms = fused_norms_enabled(st.model)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, warmup=2)
    tasks = list(SEEN_TASKS)
    plan, index = _plan(st, tasks, n_train=max(steps * batch_size, 64), batch_size=batch_size,
                        max_len=cfg.max_len, seed=0)

    have_peft = importlib.util.find_spec("peft") is not None
    default_attention = select_attention(st.model, device, st.dtype, "sdpa")
    # who -> (trainer, attention, engine RMSNorm): the engine, PEFT as shipped, PEFT given the engine's choices
    setups = {"ours": (_ours, engine_attention, engine_norms), "peft0": (_peft, default_attention, False),
              "peft1": (_peft, engine_attention, engine_norms)}
    variants = [False] + ([True] if (engine_attention != default_attention or engine_norms) else [])
    order = ["ours"] + ([f"peft{int(g)}" for g in variants] if have_peft else [])
    rounds: list[dict] = []
    try:
        for i in range(repeats):
            runs: dict = {}
            for who in (order if i % 2 == 0 else order[::-1]):
                trainer, attention, norms = setups[who]
                select_attention(st.model, device, st.dtype, attention)
                use_fused_norms(st.model, norms)
                runs[who] = trainer(st, plan, index, cfg, steps, device)
                runs[who].update(attention=attention, norm="engine" if norms else "transformers")
            rounds.append(runs)
    finally:
        select_attention(st.model, device, st.dtype, engine_attention)
        use_fused_norms(st.model, engine_norms)

    def summary(key: str) -> dict:
        runs = [r[key] for r in rounds]
        tps = [r["tokens_per_s"] for r in runs]
        return {**runs[0], "tokens_per_s": statistics.median(tps), "tokens_per_s_per_round": tps,
                "timed_tokens": sum(r["timed_tokens"] for r in runs), "timed_s": sum(r["timed_s"] for r in runs)}

    ours = summary("ours")
    baselines = []
    for given in (variants if have_peft else []):
        run = summary(f"peft{int(given)}")
        run["label"] = ("PEFT + Trainer, given the engine's attention and RMSNorm" if given
                        else "PEFT + Trainer (transformers defaults)")
        ratios = [r["ours"]["tokens_per_s"] / r[f"peft{int(given)}"]["tokens_per_s"] for r in rounds]
        run["speedup_per_round"] = ratios
        run["speedup"] = statistics.median(ratios)
        baselines.append(run)
    report = {"env": _env(device), "student": str(st.path), "dtype": str(st.dtype), "steps": steps,
              "batch_size": batch_size, "rank": cfg.rank, "targets": list(cfg.targets), "tasks": tasks,
              "repeats": repeats, "ours": ours, "peft_trainer": baselines}
    target = 2.0 if device.type == "cuda" else 1.5
    lines = [
        "# Training throughput: engine vs PEFT + Trainer", "",
        f"{report['env']['date']}, {report['env']['device']}, torch {report['env']['torch']}, transformers "
        f"{report['env']['transformers']}, peft {report['env']['peft']}; student {st.path.name} ({st.dtype}), "
        f"{steps} steps of batch {batch_size}, rank {cfg.rank}, targets {', '.join(cfg.targets)}; "
        f"{repeats} round(s), each trainer once per round in alternating order", "",
        "| trainer | attention | RMSNorm | supervised tokens/s (median) | per round | engine speed-up (median) | per round |",
        "|---|---|---|---:|---|---:|---|",
        f"| engine (all experts at once) | {ours['attention']} | {ours['norm']} | {ours['tokens_per_s']:.1f} | "
        f"{', '.join(f'{v:.1f}' for v in ours['tokens_per_s_per_round'])} | | |",
    ]
    for run in baselines:
        lines.append(f"| {run['label']} | {run['attention']} | {run['norm']} | {run['tokens_per_s']:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in run['tokens_per_s_per_round'])} | {run['speedup']:.2f}x | "
                     f"{', '.join(f'{v:.2f}x' for v in run['speedup_per_round'])} |")
    if baselines:
        report["speedup"] = baselines[0]["speedup"]
        met = "met" if report["speedup"] >= target else "NOT met"
        lines += ["", f"speed-up over PEFT + Trainer as shipped: {report['speedup']:.2f}x, median of {repeats} "
                  f"round(s) (target >= {target}x on this device: {met})"]
        if len(baselines) > 1:
            lines.append(f"speed-up over PEFT + Trainer given the engine's attention and RMSNorm: "
                         f"{baselines[1]['speedup']:.2f}x")
        lines += ["", "final loss per task (last batch of each task, first round; engine / " +
                  " / ".join(r["label"] for r in baselines) + "): " + ", ".join(
                      f"{t} {ours['final_loss_per_task'].get(t, float('nan')):.3f} / " + " / ".join(
                          f"{(r['final_loss_per_task'].get(t) or float('nan')):.3f}" for r in baselines)
                      for t in sorted(index))]
    flags = f" --dtype {dtype}" if dtype else ""
    lines += ["", f"Command: `modecotd-engine bench train --steps {steps} --repeats {repeats}{flags} --out DIR`"]
    atomic_write_text(out_dir / "train-bench.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out_dir / "train-bench.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return report
