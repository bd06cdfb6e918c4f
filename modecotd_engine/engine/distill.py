"""Distillation: every task's LoRA expert trained at once over one frozen student.

Each example's gate is one-hot on its task's expert, and every batch holds one task (the data plan
groups them), so the kernels' per-tile expert skipping makes the LoRA work that of a single LoRA.
Only the LoRA tensors are optimised; the loss covers the rationale, answer and END tokens only.

The loop is one function, :func:`train`, read top to bottom. Checkpoints hold the bank, AdamW's
moments, the step and the RNG state, all in safetensors/JSON (no pickle), written to a temporary
directory and renamed into place, so a run killed at any moment resumes from its last checkpoint and
ends with the same experts as an uninterrupted run (the batch order is a pure function of the step).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ..kernels.ops import BACKENDS
from .atomic import atomic_write_text, replace_dir, replacing
from .data import (MISSING_MARKER_POLICIES, PROMPT_FORMATS, BatchPlan, pad_token_id, read_task_dir, read_task_file,
                   tokenize_records)
from .experts import DEFAULT_TARGETS, ExpertBank
from .inject import inject_experts
from .loss import supervised_loss
from .optim import ExpertAdamW
from .student import DTYPE_CHOICES, default_device, load_student, model_attention

log = logging.getLogger("modecotd_engine.distill")

CHECKPOINT_KEEP = 2


def _opt(default, help: str, **cli):
    """A config field with its command-line help (and optionally ``flag``, ``choices``) in its metadata."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """Everything a distillation run depends on (saved with every checkpoint).

    Each field carries its command-line help in ``metadata``; ``modecotd-engine train`` derives one flag per
    field from it (``--batch-size`` for ``batch_size`` unless ``flag`` names another; tuples are
    comma-separated; a bool's flag sets the opposite of its default).
    Paths: ``student`` None is the built-in student; ``data`` None is the built-in seen tasks.
    """

    student: str | None = _opt(None, "student model directory (Hugging Face layout, safetensors); "
                               "default: the built-in SmolLM2-135M-Instruct")
    data: str | None = _opt(None, "directory of task files NAME.json/NAME.jsonl ({input, output} records, "
                            "output = rationale, '-->' line, answer, END); one expert per file; "
                            "default: the built-in seen tasks")
    out: str | None = _opt(None, "run directory (default: runs/<timestamp>)")
    tasks: tuple[str, ...] = _opt((), "comma-separated subset of the data's tasks (default: all)")
    rank: int = _opt(8, "LoRA rank r of every expert")
    alpha: float = _opt(16.0, "LoRA alpha (scale = alpha / rank)")
    targets: tuple[str, ...] = _opt(DEFAULT_TARGETS, "comma-separated target Linear modules: last name "
                                    "component (q_proj) or a full-name regex")
    steps: int = _opt(150, "optimizer steps")
    batch_size: int = _opt(8, "sequences per micro-batch (global)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _opt(0.1, "final lr as a fraction of --lr (cosine)")
    warmup: int = _opt(10, "linear warm-up steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    clip: float = _opt(1.0, "gradient-norm clipping threshold")
    max_len: int = _opt(256, "max tokens per example (prompt truncated from the left)")
    n_train: int = _opt(200, "built-in tasks: training examples per task")
    n_eval: int = _opt(30, "held-out examples per task scored before and after training (0 skips)")
    # built-in outputs are <= 45 SmolLM2 tokens
    eval_max_new_tokens: int = _opt(64, "generation budget per held-out example, in tokens")
    eval_batch_size: int = _opt(32, "sequences per generation batch")
    save_every: int = _opt(50, "checkpoint every N steps (and at the end)")
    snapshot_every: int = _opt(0, "also keep the bank every N steps in OUT/snapshots/step-N, never pruned (0: none); "
                               "for choosing each expert's step on held-out data (reproduce's select stage)")
    seed: int = _opt(0, "seed for data order, initialisation and built-in tasks")
    missing_marker: str = _opt("drop", "what to do with training outputs that lack the '-->' answer marker",
                               choices=MISSING_MARKER_POLICIES)
    prompt_format: str = _opt("plain", "plain: prompts as written in the data; chat: each prompt as the user "
                              "turn of the student's chat template (data.format_prompt; recorded in the bank; "
                              "infer, eval and mix then use it too)", choices=PROMPT_FORMATS)
    shared_init: bool = _opt(True, "draw an independent random A for every expert (default: all experts start "
                             "from the same A, as separate runs from one seed do, which weight-mode mixing "
                             "relies on; ExpertBank.create)", flag="--independent-init")
    device: str | None = _opt(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    dtype: str = _opt("auto", "student dtype; auto: bfloat16 on CUDA and on CPUs with native bf16 math (about 2x "
                      "faster there), float32 otherwise. LoRA weights and optimizer state stay float32",
                      choices=DTYPE_CHOICES)
    backend: str = _opt("auto", "mixture kernel backend (auto: triton on CUDA, torch on CPU)", choices=BACKENDS)
    attention: str = _opt("auto", "student attention: auto (the engine's grouped-query matmul attention on CPU "
                          "with bf16/fp16 weights, measured ~30% faster per step there; transformers' default "
                          "elsewhere), grouped, sdpa, eager")
    eval_before: bool = _opt(True, "skip the accuracy measurement before training", flag="--no-eval-before")
    progress: bool = _opt(True, "no progress bar", flag="--no-progress")
    resume: bool = _opt(False, "continue the run in --out from its last checkpoint")

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        self.targets = tuple(self.targets)
        for name in ("steps", "batch_size", "grad_accum", "rank", "max_len", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.n_eval < 0 or self.snapshot_every < 0:
            raise ValueError("warmup, n-eval and snapshot-every must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Fields that must agree between a checkpoint and the run that resumes it.
_RESUME_KEYS = ("student", "data", "tasks", "rank", "alpha", "targets", "steps", "batch_size", "grad_accum",
                "lr", "min_lr_ratio", "warmup", "weight_decay", "clip", "max_len", "n_train", "seed",
                "prompt_format", "shared_init")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    out_dir: Path
    bank_dir: Path
    steps: int
    final_loss: float | None
    tokens_per_s: float | None
    accuracy_before: dict[str, float] = field(default_factory=dict)
    accuracy_after: dict[str, float] = field(default_factory=dict)
    table: str = ""
    is_main: bool = True  # False on the non-zero ranks of a distributed run


class LossModule(nn.Module):
    """Wraps the student so DistributedDataParallel sees the loss computation as one forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, denom: float):
        # Logits only at the supervised positions, the head fused with a blocked cross-entropy (loss.py).
        loss_sum = supervised_loss(self.model, input_ids, attention_mask, labels, reduction="sum")
        return loss_sum / denom, loss_sum.detach()


@dataclass
class StepStats:
    """What one optimizer step measured; tensors are read (a device sync) only where logged."""

    tokens: int  # supervised tokens of the global step
    task_loss_sum: dict[str, torch.Tensor]  # task -> summed loss of this process's share
    task_tokens: dict[str, int]  # task -> supervised tokens of this process's share
    grad_norm: torch.Tensor


def train_step(loss_module: nn.Module, handle, opt: ExpertAdamW, params: list[torch.Tensor], micro: list,
               names: list[str], *, lr: float, clip: float, device: torch.device, world: int = 1, rank: int = 0,
               autocast=None) -> StepStats:
    """One optimizer step over the micro-batches ``micro`` (the whole global batch): each example's
    gate one-hot on its task's expert, the supervised-token loss (sum / the step's token count, so
    micro-batches and processes add up to one token-mean), backward, clipping, and the per-expert
    AdamW step on the experts present (the others keep weights, moments and step count).

    ``loss_module`` is a ``LossModule`` or its DistributedDataParallel wrapper; gradients are then
    all-reduced once, on the last micro-batch (``no_sync`` on the others). ``train`` and
    ``bench train`` both run this function.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    denom = float(sum(b.num_tokens for b in micro))  # token-mean over the whole global step
    task_loss: dict[str, torch.Tensor] = {}
    task_tok: dict[str, int] = {}
    part = slice(rank, None, world)  # this rank's share of each global batch
    for i, batch in enumerate(micro):
        ids, am, lab = batch.input_ids[part], batch.attention_mask[part], batch.labels[part]
        handle.set_gates(nn.functional.one_hot(batch.task_ids[part], len(names)).to(device=device, dtype=torch.float32))
        sync = (loss_module.no_sync() if isinstance(loss_module, nn.parallel.DistributedDataParallel)
                and i < len(micro) - 1 else nullcontext())
        with sync:
            with autocast or nullcontext():
                loss, loss_sum = loss_module(ids.to(device), am.to(device), lab.to(device), denom / world)
            loss.backward()
        task = names[int(batch.task_ids[0])]  # the data plan keeps one task per micro-batch
        task_loss[task] = task_loss[task] + loss_sum if task in task_loss else loss_sum
        task_tok[task] = task_tok.get(task, 0) + int((lab[:, 1:] != -100).sum())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step(sorted({int(t) for b in micro for t in b.task_ids.tolist()}))
    opt.zero_grad(set_to_none=True)
    handle.set_gates(None)
    return StepStats(int(denom), task_loss, task_tok, grad_norm)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a distillation; returns where the experts are and the before/after accuracy.

    A process group this call opens (``torchrun``) is destroyed before it returns or raises: left to the
    interpreter's exit, gloo's worker threads are torn down unjoined and the process aborts
    ("terminate called without an active exception") after a run that succeeded.
    """
    opened = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        return _train(cfg)
    finally:
        if opened and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig) -> TrainResult:
    # ---------------------------------------------------------------- setup
    world, rank = _init_distributed()
    main = rank == 0
    torch.manual_seed(cfg.seed)
    if world > 1 and not cfg.out:
        raise ValueError("a distributed run needs --out (every process must write to the same directory)")
    out = Path(cfg.out) if cfg.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    ckpt_root = out / "checkpoints"
    resume_from = _latest_checkpoint(ckpt_root)
    if resume_from is not None and not cfg.resume:
        raise FileExistsError(f"{out} already holds checkpoints; pass --resume to continue that run, "
                              "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if main:
        print(f"run directory: {out}")
    device = torch.device(cfg.device) if cfg.device else default_device(rank)
    student = load_student(cfg.student, dtype=cfg.dtype, device=device, attention=cfg.attention)
    dtype = student.dtype
    if main:
        print(f"student: {student.path} ({dtype} on {device}, attention {model_attention(student.model)}; "
              "LoRA weights and optimizer state in float32)")
    model, tok = student.model, student.tokenizer

    task_files, eval_sets = _load_tasks(cfg, out, main)
    names = sorted(task_files)
    task_index = {n: i for i, n in enumerate(names)}
    examples, tok_stats = {}, {}
    for n in names:
        examples[n], tok_stats[n] = tokenize_records(task_files[n].records, tok, task=n, max_len=cfg.max_len,
                                                     prompt_format=cfg.prompt_format)
    if main:
        _report_data(task_files, tok_stats)
    plan = BatchPlan(examples, batch_size=cfg.batch_size, seed=cfg.seed, task_index=task_index,
                     pad_id=pad_token_id(tok))

    bank = ExpertBank.create(model, names, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
                             student=student.identity, seed=cfg.seed, shared_init=cfg.shared_init,
                             prompt_format=cfg.prompt_format)
    handle = inject_experts(model, bank, backend=cfg.backend, trainable=True)
    params = handle.lora_parameters()
    opt = ExpertAdamW(params, len(names), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    start = 0
    if resume_from is not None:
        start = _load_checkpoint(resume_from, cfg, bank, opt)
        if main:
            print(f"resumed from {resume_from} at step {start}")
    loss_module = LossModule(model)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(loss_module)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    results_before = {}
    if main and cfg.n_eval and cfg.eval_before and start == 0:
        results_before = _evaluate(model, tok, handle, bank, eval_sets, cfg, "before", out)

    # ---------------------------------------------------------------- loop
    metrics_path = out / "metrics.jsonl"
    if main:
        _keep_metrics_before(metrics_path, start)
    bar = _progress(cfg.steps, start, main and cfg.progress)
    loss_val, tps_total, tokens_total, time_total = None, 0.0, 0, 0.0
    model.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        micro = [plan.batch(step * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
        stats = train_step(loss_module, handle, opt, params, micro, names, lr=lr, clip=cfg.clip, device=device,
                           world=world, rank=rank, autocast=autocast)
        denom, task_loss, task_tok, grad_norm = stats.tokens, stats.task_loss_sum, stats.task_tokens, stats.grad_norm
        dt = time.perf_counter() - t0
        if step > start:  # the first step of a process pays for warm-up; keep it out of the rate
            tokens_total += int(denom)
            time_total += dt
        # .item() syncs the device: once per step, for the log line
        losses = {t: float(v) / max(1, task_tok[t]) for t, v in task_loss.items()}
        if world > 1:
            step_loss = _all_reduce_sum(sum(float(v) for v in task_loss.values())) / denom
        else:
            step_loss = sum(float(v) for v in task_loss.values()) / denom
        loss_val = step_loss
        tps = denom / dt
        if main:
            rec = {"step": step + 1, "loss": round(step_loss, 5), "task_loss": {k: round(v, 5) for k, v in losses.items()},
                   "lr": lr, "grad_norm": round(float(grad_norm), 4), "tokens": int(denom), "dt_s": round(dt, 4),
                   "tokens_per_s": round(tps, 1), "peak_mem_mb": round(_peak_mem_mb(device), 1)}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tps:.0f}")
        done = step + 1
        if main and (done % cfg.save_every == 0 or done == cfg.steps):
            _save_checkpoint(ckpt_root, done, cfg, bank, opt)
        if main and cfg.snapshot_every and done % cfg.snapshot_every == 0:
            bank.save(snapshot_dir(out, done))  # experts.json is written last: a bank without it is incomplete
        if world > 1:
            dist.barrier()
    bar.close()
    model.eval()
    if tokens_total and time_total:
        tps_total = tokens_total / time_total

    # ---------------------------------------------------------------- finish
    bank_dir = out / "bank"
    result = TrainResult(out, bank_dir, cfg.steps, loss_val, tps_total or None, is_main=main)
    if main:
        bank.save(bank_dir)
        _plot_losses(metrics_path, out / "loss.png")
        if cfg.n_eval:
            results_after = _evaluate(model, tok, handle, bank, eval_sets, cfg, "after", out)
            result.accuracy_after = {t: r.accuracy for t, r in results_after.items()}
            result.accuracy_before = {t: r.accuracy for t, r in results_before.items()}
            result.table = _before_after_table(results_before, results_after)
            atomic_write_text(out / "accuracy.md", result.table + "\n")
            atomic_write_text(out / "accuracy.json",
                              json.dumps({"before": result.accuracy_before, "after": result.accuracy_after}, indent=2))
        atomic_write_text(out / "summary.json", json.dumps(
            {"steps": cfg.steps, "world_size": world, "final_loss": loss_val, "tokens_per_s": result.tokens_per_s,
             "bank": str(bank_dir), "config": asdict(cfg)}, indent=2, default=str))
    if world > 1:
        dist.barrier()
    return result


# ---------------------------------------------------------------------- data
def _load_tasks(cfg: TrainConfig, out: Path, main: bool):
    """Training task files and held-out evaluation records, from ``cfg.data`` or the built-in tasks.

    The built-in tasks are written once under ``<out>/data`` (train/ and non-overlapping eval/ files), so
    the run's data can be read like any other and every process of a distributed run reads the same files.
    """
    from .tasks import write_builtin

    if cfg.data is None:
        data_dir = out / "data"
        if main and not (data_dir / "train").is_dir():
            tmp = out / ".data.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            write_builtin(tmp, n_train=cfg.n_train, n_eval=max(cfg.n_eval, 1), seed=cfg.seed)
            replace_dir(tmp, data_dir)
        if dist.is_initialized():
            dist.barrier()
        files = read_task_dir(data_dir / "train", missing_marker=cfg.missing_marker)
        evals = {}
        if cfg.n_eval:
            for n in files:
                recs = read_task_file(data_dir / "eval" / f"{n}.jsonl", require_marker=False).records
                evals[n] = recs[: cfg.n_eval]
    else:
        files = read_task_dir(cfg.data, missing_marker=cfg.missing_marker)
        evals = {}
        if cfg.n_eval:  # held out from the end of each task file, not trained on
            for n, tf in files.items():
                k = min(cfg.n_eval, len(tf.records) // 5)
                if k:
                    evals[n] = tf.records[-k:]
                    tf.records = tf.records[:-k]
    if cfg.tasks:
        unknown = sorted(set(cfg.tasks) - set(files))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the data has {sorted(files)}")
        files = {n: files[n] for n in cfg.tasks}
        evals = {n: v for n, v in evals.items() if n in files}
    return files, evals


def _report_data(task_files, tok_stats) -> None:
    for n, tf in task_files.items():
        st = tok_stats[n]
        extra = []
        if tf.missing_marker:
            extra.append(f"{tf.missing_marker} without '-->' marker")
        for key in ("truncated", "dropped"):
            if st.get(key):
                extra.append(f"{st[key]} {key}")
        print(f"task {n}: {len(tf.records)} examples" + (f" ({', '.join(extra)})" if extra else ""))


# ---------------------------------------------------------------------- evaluation
def _evaluate(model, tok, handle, bank, eval_sets, cfg, label, out: Path):
    from .answers import infer_task_type
    from .evaluate import evaluate_many, gold_answer
    from .generate import GenerationConfig

    if not eval_sets:
        return {}
    gen_cfg = GenerationConfig(max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size,
                               prompt_format=cfg.prompt_format, stop_after_answer=True, stop_on_loop=True)
    gates = {t: bank.weights_vector(t) for t in eval_sets}
    # A task whose name and golds say nothing of its type is scored on its answer line ("text"):
    # the run has trained by then, and the table must not fail for want of a type.
    types = {t: infer_task_type(t, [gold_answer(r["output"]) for r in recs], default="text")
             for t, recs in eval_sets.items()}
    t0 = time.perf_counter()
    with torch.no_grad():
        res = evaluate_many(model, tok, eval_sets, task_types=types, handle=handle, gates=gates, config=gen_cfg,
                            progress=cfg.progress)
    pred_dir = out / f"predictions-{label}"
    pred_dir.mkdir(exist_ok=True)
    for t, r in res.items():  # what the student wrote, for reading the table's numbers
        atomic_write_text(pred_dir / f"{t}.jsonl", "".join(json.dumps(p) + "\n" for p in r.predictions))
    print(f"held-out accuracy {label} training ({time.perf_counter() - t0:.0f} s): "
          + ", ".join(f"{t} {r.accuracy:.0%}" for t, r in res.items()))
    return res


def _before_after_table(before, after) -> str:
    rows = ["| task | n | before | after | gain |", "|---|---:|---:|---:|---:|"]
    for t, ra in after.items():
        rb = before.get(t)
        b = f"{rb.accuracy:.1%}" if rb else "-"
        gain = f"{(ra.accuracy - rb.accuracy) * 100:+.1f} pt" if rb else "-"
        rows.append(f"| {t} | {ra.n} | {b} | {ra.accuracy:.1%} | {gain} |")
    if after:
        mean_a = sum(r.accuracy for r in after.values()) / len(after)
        mean_b = (sum(before[t].accuracy for t in after if t in before) / len(after)) if before else None
        rows.append(f"| **mean** | | {'-' if mean_b is None else f'{mean_b:.1%}'} | {mean_a:.1%} | "
                    f"{'-' if mean_b is None else f'{(mean_a - mean_b) * 100:+.1f} pt'} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------- checkpoints
def snapshot_dir(out: str | Path, step: int) -> Path:
    """Where ``--snapshot-every`` keeps the bank of step ``step`` of the run in ``out``."""
    return Path(out) / "snapshots" / f"step-{step:07d}"


def snapshots(out: str | Path) -> dict[int, Path]:
    """The complete bank snapshots of the run in ``out``, by step."""
    found = {}
    for p in sorted((Path(out) / "snapshots").glob("step-*")):
        if (p / "experts.json").is_file():
            found[int(p.name.split("-")[1])] = p
    return found


def _save_checkpoint(root: Path, step: int, cfg: TrainConfig, bank: ExpertBank, opt: ExpertAdamW) -> Path:
    """Write checkpoint ``step-N`` atomically (temp dir + rename), then point ``latest`` at it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    bank.save(tmp / "bank")
    tensors = {"rng.torch": torch.get_rng_state()}
    tensors.update({f"opt.{k}": v for k, v in opt.state_tensors().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "trainer.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps({"step": step, "config": asdict(cfg)}, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    replace_dir(tmp, final)
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-CHECKPOINT_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _keep_metrics_before(path: Path, start: int) -> None:
    """Drop the log lines of steps after ``start``: a killed run may have logged steps past its last
    checkpoint, and the resumed run logs them again (a fresh run, start 0, keeps nothing)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "trainer.json").is_file():
            return cand
    # the pointer may lag a rename by one crash: fall back to the newest complete checkpoint
    done = sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file())
    return done[-1] if done else None


def _load_checkpoint(path: Path, cfg: TrainConfig, bank: ExpertBank, opt: ExpertAdamW) -> int:
    meta = json.loads((path / "trainer.json").read_text())
    saved = meta["config"]
    diffs = []
    for k in _RESUME_KEYS:
        mine = getattr(cfg, k)
        theirs = saved.get(k)
        if isinstance(mine, tuple):
            theirs = tuple(theirs or ())
        if mine != theirs:
            diffs.append(f"{k}: checkpoint {theirs!r}, now {mine!r}")
    if diffs:
        raise ValueError(f"cannot resume from {path}: the run's settings differ ({'; '.join(diffs)})")
    saved_bank = ExpertBank.load(path / "bank")
    if saved_bank.names != bank.names:
        raise ValueError(f"cannot resume from {path}: experts {saved_bank.names} differ from {bank.names}")
    with torch.no_grad():
        for m in bank.modules:
            bank.lora_a[m].copy_(saved_bank.lora_a[m])
            bank.lora_b[m].copy_(saved_bank.lora_b[m])
    tensors = load_file(str(path / "trainer.safetensors"))
    torch.set_rng_state(tensors["rng.torch"])
    opt.load_state_tensors({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")},
                           source=str(path / "trainer.safetensors"))
    return int(meta["step"])


# ---------------------------------------------------------------------- small helpers
def _init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_reduce_sum(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="distill", unit="step", dynamic_ncols=True)


def _plot_losses(metrics_path: Path, png: Path) -> None:
    """Loss per task against the step (raw, and an EMA to read the trend)."""
    if not metrics_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_task: dict[str, list[tuple[int, float]]] = {}
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        for t, v in rec["task_loss"].items():
            per_task.setdefault(t, []).append((rec["step"], v))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for t, pts in sorted(per_task.items()):
        xs, ys = zip(*pts)
        ema, smooth = ys[0], []
        for y in ys:
            ema = 0.8 * ema + 0.2 * y
            smooth.append(ema)
        line, = ax.plot(xs, smooth, label=t)
        ax.plot(xs, ys, color=line.get_color(), alpha=0.25, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss on supervised tokens (nats)")
    ax.set_title("distillation loss per task expert")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with replacing(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
