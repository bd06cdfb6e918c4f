"""The MoDE-CoTD protocol end to end over a data layout, one resumable stage at a time.

The layout (``../shared/data/mode-cotd`` in this project's workspace, or any directory shaped like it)::

    train/<task>.json     teacher rationales of the seen tasks (rationale, '-->', answer, END)
    learn/<task>.jsonl    a few shots per task, seen and unseen, in the training format
    dev-unseen/<task>.json  evaluation records of unseen tasks (gold answer only); never trained
                          or mixed on

Stages, each skipped when its files exist (so a killed run continues where it stopped):

1. ``data``: per seen task the last ``heldout`` records of ``train/`` are held out for evaluation
   and the ``val`` before them for validation; the rest is the training set of its expert, and their
   union the multi-task baseline's.
2. ``base``: the frozen student on every evaluation set (prompt format of the run).
3. ``experts``: every seen task's expert, trained at once (``distill.train``), the bank kept at
   ``snapshots`` evenly spaced steps.
4. ``select`` (with ``val`` and ``snapshots``): each expert's step chosen by generation on its task's
   validation records; the bank the later stages use takes every expert from its chosen step.
5. ``multitask``: the paper's baseline, one LoRA of the same rank on the union, same steps.
6. ``mixtures``: for every task with shots (seen and unseen), a weight search over the bank on its
   shots (weight and output composition), checked by generation on the shots (w = 0 included).
7. ``eval``: each system on each evaluation set; predictions kept.
8. ``report``: ``report.md`` (per-task table, seen/unseen averages, the paper's gains and Fine-tune-CoT's
   250M student beside them, time per stage) and ``report.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .atomic import atomic_write_text, replacing
from .data import read_task_dir, read_task_file, task_files_in

if TYPE_CHECKING:
    from .experts import ExpertBank

# The seen tasks of the cpu profile: the seven with the fewest training records (170-453 each).
CPU_TASKS = ("addsub", "multiarith", "single_eq", "svamp", "last_letter_concatenation", "date_understanding",
             "tracking_shuffled_objects")

# Fine-tune-CoT's 250M student (Ho et al., 2023, Table: vanilla fine-tune-CoT, GPT-3 teacher), as the
# MoDE-CoTD paper compares against; accuracy in %.
FINETUNE_COT_250M = {"single_eq": 4.6, "addsub": 9.2, "multiarith": 12.2, "gsm8k": 4.4, "aqua": 29.1, "svamp": 6.0,
                     "date_understanding": 83.8, "tracking_shuffled_objects": 48.9,
                     "last_letter_concatenation": 50.0, "coin_flip": 100.0, "commonsense_qa": 59.1,
                     "strategy_qa": 60.0}
# Rows decoding together in the evaluations: the value docs/real-data.md was measured with, not tuned.
EVAL_BATCH = 48
# The paper's average gains of MoDE-CoTD over single-model CoT distillation, in points.
PAPER_GAIN = {"seen": 6.3, "unseen": 7.8}


@dataclass
class Profile:
    """How much of the protocol to run. ``steps`` 0 means ``epochs`` over the training data."""

    tasks: tuple[str, ...]  # seen tasks; empty: every task of train/
    steps: int
    epochs: float
    batch_size: int
    lr: float
    rank: int
    targets: tuple[str, ...]
    max_len: int
    heldout: int  # records per seen task held out of train/ for evaluation
    eval_limit: int  # records per task evaluated (0: all)
    max_new_tokens: int
    budget: int  # candidates of each weight search
    finalists: int  # candidates checked by generation on the shots
    train_cap: int = 0  # training records per seen task, the first ones of train/ (0: all)
    # Validation records per seen task, held out of train/ just before its evaluation records: with
    # ``snapshots`` >= 2 each expert's training step is chosen among the snapshots by its accuracy on
    # them (early stopping per task; the evaluation records are never looked at).
    val: int = 0
    snapshots: int = 0  # banks kept at evenly spaced steps of the experts' run (the last is the final bank)
    # Guided answers (answer_guide) in every evaluation and in the mixing check by generation. Both
    # profiles set it: on run 4's bank it took generations without an answer from 14/436 (student) and
    # 3/316 (experts) to 0 at the same or better accuracy (docs/real-data.md, "Guided answers").
    guide_answers: bool = False

    @property
    def selects_steps(self) -> bool:
        """Whether the ``select`` stage chooses each expert's step (validation records and >= 2 snapshots)."""
        return self.val > 0 and self.snapshots >= 2


# Rank 8 on every linear layer of a Llama-family block: on the same data, steps and held-out records,
# the seven cpu-profile experts' mean rose from 11.4% (q_proj, v_proj) to 15.7% (docs/real-data.md).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PROFILES = {
    # ~80 minutes of stages on a 2-core CPU with native bf16, from the stage times of docs/real-data.md's
    # runs (53 minutes with q_proj, v_proj and 240 steps; a training step costs about the same on every
    # linear layer, and 480 steps took 16.8% where 240 took 15.7% and 960 took 19.2%).
    "cpu": Profile(tasks=CPU_TASKS, steps=480, epochs=0, batch_size=8, lr=3e-3, rank=8,
                   targets=ALL_LINEAR, max_len=320, heldout=40, eval_limit=40, max_new_tokens=160,
                   budget=30, finalists=4, guide_answers=True),
    # The paper's settings: every seen task, 5 epochs, lr 5e-4, batch 16; all evaluation records.
    "full": Profile(tasks=(), steps=0, epochs=5, batch_size=16, lr=5e-4, rank=8, targets=ALL_LINEAR,
                    max_len=512, heldout=100, eval_limit=0, max_new_tokens=256, budget=40, finalists=4,
                    guide_answers=True),
}


@dataclass
class ReproduceConfig:
    data: str
    out: str
    profile: str = "cpu"
    tasks: tuple[str, ...] = ()  # overrides the profile's seen tasks
    unseen: tuple[str, ...] = ()  # default: every task of the evaluation directory without train/ data
    eval_dir: str = "dev-unseen"  # relative to ``data`` unless absolute
    prompt_format: str = "chat"
    student: str | None = None
    seed: int = 0
    progress: bool = True
    overrides: dict = field(default_factory=dict)  # Profile fields to replace
    skip: tuple[str, ...] = ()  # systems not to build or evaluate (SKIPPABLE)

    def resolved_profile(self) -> Profile:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; expected one of {', '.join(PROFILES)}")
        unknown = [s for s in self.skip if s not in SKIPPABLE]
        if unknown:
            raise ValueError(f"cannot skip {unknown}; the systems that can be left out are {', '.join(SKIPPABLE)}")
        p = replace(PROFILES[self.profile], **self.overrides)
        if self.tasks:
            p = replace(p, tasks=tuple(self.tasks))
        # A run directory continues with the values it ran with for fields whose default changed since
        # (recorded, or from before the field existed), unless --set names them.
        path = Path(self.out) / "config.json"
        if path.exists():
            recorded = json.loads(path.read_text()).get("profile", {})
            p = replace(p, **{k: recorded.get(k, v) for k, v in _EARLIER_VALUES.items() if k not in self.overrides})
        return p


# Systems a run may leave out (``--skip``), with the stages each one owns.
SKIPPABLE = {"multitask": ("multitask", "eval-multitask"),
             "search-weight": ("mixtures-weight", "eval-search-weight"),
             "search-output": ("mixtures-output", "eval-search-output"),
             "uniform": ("eval-uniform",)}


class _Stages:
    """Times and skips stages; ``stages.json`` records how long each took when it ran."""

    def __init__(self, out: Path, skip: tuple[str, ...] = ()):
        self.path = out / "stages.json"
        self.times = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.skipped = {stage for system in skip for stage in SKIPPABLE[system]}

    def run(self, name: str, done: Path, fn):
        if name in self.skipped:
            print(f"[{name}] skipped")
            return
        if done.exists():
            print(f"[{name}] done already ({done})")
            return
        print(f"[{name}] ...", flush=True)
        t0 = time.perf_counter()
        fn()
        self.times[name] = round(time.perf_counter() - t0, 1)
        atomic_write_text(self.path, json.dumps(self.times, indent=2) + "\n")
        print(f"[{name}] {self.times[name]:.0f} s", flush=True)


def reproduce(cfg: ReproduceConfig, *, header: list[str] = ()) -> Path:
    """Run (or continue) the protocol; returns the path of ``report.md``, which opens with ``header``
    (the command, device, versions and date: the caller knows them)."""
    root, out = Path(cfg.data), Path(cfg.out)
    prof = cfg.resolved_profile()
    layout = _read_layout(root, cfg, prof)
    out.mkdir(parents=True, exist_ok=True)
    record = json.loads(json.dumps({"config": asdict(cfg), "profile": asdict(prof), "seen": layout["seen"],
                                    "unseen": layout["unseen"]}, default=str))
    _check_same_run(out / "config.json", record)
    atomic_write_text(out / "config.json", json.dumps(record, indent=2) + "\n")
    stages = _Stages(out, cfg.skip)
    stages.run("data", out / "data" / "done", lambda: _prepare_data(layout, prof, out / "data"))
    steps = prof.steps or _epoch_steps(out / "data" / "train", prof)
    stages.run("experts", out / "experts" / "bank" / "experts.json",
               lambda: _train(cfg, prof, out / "data" / "train", out / "experts", steps,
                              snapshot_every=_snapshot_every(prof, steps)))
    stages.run("multitask", out / "multitask" / "bank" / "experts.json",
               lambda: _train(cfg, prof, out / "data" / "multitask", out / "multitask", steps))
    session = _Session(cfg, out)
    if prof.selects_steps:
        stages.run("select", out / "experts" / "selected" / "experts.json", lambda: session.select(layout, steps))
    stages.run("base", out / "eval" / "base" / "summary.json", lambda: session.eval_base(layout))
    stages.run("eval-experts", out / "eval" / "experts" / "summary.json", lambda: session.eval_experts(layout))
    stages.run("eval-multitask", out / "eval" / "multitask" / "summary.json",
               lambda: session.eval_multitask(layout))
    for mode in ("weight", "output"):
        stages.run(f"mixtures-{mode}", out / "mixtures" / mode / "done",
                   lambda: session.mix_all(layout, prof, mode))
        stages.run(f"eval-search-{mode}", out / "eval" / f"search-{mode}" / "summary.json",
                   lambda: session.eval_mixtures(layout, mode))
    stages.run("eval-uniform", out / "eval" / "uniform" / "summary.json", lambda: session.eval_uniform(layout))
    return write_report(out, layout, stages.times, header=header)


# Settings that may differ between the commands continuing one output directory: none changes a stage's
# files (``overrides`` is checked through the profile it resolves to; ``out`` may have been moved; a
# skipped system can be built by a later command).
_FREE_FIELDS = {"progress", "overrides", "out", "skip"}
# Profile fields added after runs were made, with the value those runs had (their default now differs):
# a run directory continues with its recorded value, or this one when it was recorded before the field
# (ReproduceConfig.resolved_profile); --set naming another value is a change of settings and refused.
_EARLIER_VALUES = {"guide_answers": False}


def _check_same_run(path: Path, record: dict) -> None:
    """Refuse to continue a run directory whose recorded settings differ from this command's: the
    stages already there were computed with the old ones, and a report mixing both would be wrong."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    changed = []
    for part in ("config", "profile"):
        recorded = old.get(part, {})
        before = {**_EARLIER_VALUES, **recorded} if part == "profile" else recorded
        for k in sorted(set(before) | set(record[part])):
            if k in _FREE_FIELDS or k not in before:  # a field newer than the run: its default
                continue
            if before[k] != record[part].get(k):
                note = "" if k in recorded else " (recorded before the field)"
                changed.append(f"{k}: {before[k]!r}{note} -> {record[part].get(k)!r}")
    for k in ("seen", "unseen"):
        if old.get(k) != record[k]:
            changed.append(f"{k}: {old.get(k)!r} -> {record[k]!r}")
    if changed:
        raise ValueError(f"{path.parent} was run with other settings ({'; '.join(changed)}); continue it with its "
                         f"own settings (see {path}) or give a new --out")


# ------------------------------------------------------------------------------------------- data
def _read_layout(root: Path, cfg: ReproduceConfig, prof: Profile) -> dict:
    for sub in ("train", "learn"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root}: no {sub}/ directory (expected the MoDE-CoTD layout: train/, learn/, "
                                    f"{cfg.eval_dir}/)")
    eval_dir = Path(cfg.eval_dir) if Path(cfg.eval_dir).is_absolute() else root / cfg.eval_dir
    train_tasks = sorted(p.stem for p in task_files_in(root / "train"))
    seen = list(prof.tasks) or train_tasks
    missing = [t for t in seen if t not in train_tasks]
    if missing:
        raise ValueError(f"seen task(s) {missing} have no file in {root / 'train'} (found: {train_tasks})")
    eval_tasks = sorted(p.stem for p in task_files_in(eval_dir)) if eval_dir.is_dir() else []
    unseen = list(cfg.unseen) or [t for t in eval_tasks if t not in train_tasks]
    missing = [t for t in unseen if t not in eval_tasks]
    if missing:
        raise ValueError(f"unseen task(s) {missing} have no evaluation file in {eval_dir} (found: {eval_tasks})")
    shots = {p.stem: p for p in task_files_in(root / "learn")}
    return {"root": str(root), "eval_dir": str(eval_dir), "seen": seen, "unseen": unseen,
            "shots": {t: str(shots[t]) for t in seen + unseen if t in shots}}


def _prepare_data(layout: dict, prof: Profile, d: Path) -> None:
    """train/<t>.json minus its last ``heldout`` records; eval/<t>.json those records (and the unseen
    evaluation records); multitask/multitask.json the union of the training sets.

    The learn/ shots of a seen task are drawn from its train/ records; a held-out record that is also
    a shot is not evaluated (mixing sees it), and neither is it trained on.
    """
    root = Path(layout["root"])
    union = []
    for t in layout["seen"]:
        records = read_task_file(root / "train" / f"{t}.json").records
        cut = prof.heldout + prof.val
        if len(records) <= cut:
            raise ValueError(f"task {t}: {len(records)} records, cannot hold out {prof.heldout} + {prof.val}")
        shots = set()
        if t in layout["shots"]:
            shots = {r["input"] for r in read_task_file(layout["shots"][t], missing_marker="keep").records}
        train, held = records[:-cut], [r for r in records[-prof.heldout:] if r["input"] not in shots]
        val = [r for r in records[len(records) - cut:len(records) - prof.heldout] if r["input"] not in shots]
        if prof.train_cap:
            train = train[:prof.train_cap]
        atomic_write_text(d / "train" / f"{t}.json", json.dumps(train, ensure_ascii=False) + "\n")
        atomic_write_text(d / "eval" / f"{t}.json", json.dumps(_limit(held, prof), ensure_ascii=False) + "\n")
        if prof.val:
            atomic_write_text(d / "val" / f"{t}.json", json.dumps(val, ensure_ascii=False) + "\n")
        union.extend(train)
    g = torch.Generator().manual_seed(0)
    union = [union[i] for i in torch.randperm(len(union), generator=g).tolist()]
    atomic_write_text(d / "multitask" / "multitask.json", json.dumps(union, ensure_ascii=False) + "\n")
    for t in layout["unseen"]:
        records = read_task_dir(layout["eval_dir"], require_marker=False)[t].records
        atomic_write_text(d / "eval" / f"{t}.json", json.dumps(_limit(records, prof), ensure_ascii=False) + "\n")
    atomic_write_text(d / "done", "")


def _limit(records: list, prof: Profile) -> list:
    return records[: prof.eval_limit] if prof.eval_limit else records


def _epoch_steps(train_dir: Path, prof: Profile) -> int:
    n = sum(len(tf.records) for tf in read_task_dir(train_dir).values())
    return max(1, round(prof.epochs * n / prof.batch_size))


def _snapshot_every(prof: Profile, steps: int) -> int:
    """Steps between the experts' snapshots; 0 when no step is to be chosen."""
    return max(1, steps // prof.snapshots) if prof.selects_steps else 0


def _train(cfg: ReproduceConfig, prof: Profile, data: Path, out: Path, steps: int, *, snapshot_every: int = 0) -> None:
    from .distill import TrainConfig, train

    resume = (out / "checkpoints").is_dir()
    train(TrainConfig(student=cfg.student, data=str(data), out=str(out), rank=prof.rank, targets=prof.targets,
                      steps=steps, batch_size=prof.batch_size, lr=prof.lr, max_len=prof.max_len, n_eval=0,
                      seed=cfg.seed, prompt_format=cfg.prompt_format, progress=cfg.progress, resume=resume,
                      warmup=min(20, max(1, steps // 10)), snapshot_every=snapshot_every))


def compose_bank(banks: dict[int, ExpertBank], choice: dict[str, int]) -> ExpertBank:
    """One bank whose expert ``name`` is taken from ``banks[choice[name]]`` (experts not in ``choice``
    from the bank of the largest key). The banks must hold the same experts over the same modules."""
    last = banks[max(banks)]
    for key, b in banks.items():
        if b.names != last.names or b.modules != last.modules or b.rank != last.rank:
            raise ValueError(f"bank {key} holds other experts, modules or rank than bank {max(banks)}")
    lora_a = {m: t.clone() for m, t in last.lora_a.items()}
    lora_b = {m: t.clone() for m, t in last.lora_b.items()}
    for name, key in choice.items():
        i = last.index(name)
        for m in last.modules:
            lora_a[m][i] = banks[key].lora_a[m][i]
            lora_b[m][i] = banks[key].lora_b[m][i]
    return replace(last, names=list(last.names), lora_a=lora_a, lora_b=lora_b)


# ---------------------------------------------------------------------------------- eval and mix
class _Session:
    """The student loaded once, with the bank injected, for every evaluation and mixture."""

    def __init__(self, cfg: ReproduceConfig, out: Path):
        self.cfg, self.out = cfg, out
        self._student = self._bank = self._handle = None

    def _load(self):
        if self._student is None:
            from .experts import ExpertBank
            from .inject import inject_experts
            from .student import load_student

            self._student = load_student(self.cfg.student)
            self._bank = ExpertBank.load(self.bank_dir, student=self._student)
            self._handle = inject_experts(self._student.model, self._bank)
        return self._student, self._bank, self._handle

    @property
    def bank_dir(self) -> Path:
        """The experts every later stage uses: the per-task choice of ``select`` where it ran."""
        selected = self.out / "experts" / "selected"
        return selected if (selected / "experts.json").is_file() else self.out / "experts" / "bank"

    def _records(self, tasks, split: str = "eval") -> dict[str, list]:
        return {t: read_task_file(self.out / "data" / split / f"{t}.json", require_marker=False).records
                for t in tasks}

    def _config(self, prompt_format: str):
        from .generate import GenerationConfig

        prof = self.cfg.resolved_profile()
        return GenerationConfig(max_new_tokens=prof.max_new_tokens, batch_size=EVAL_BATCH, prompt_format=prompt_format,
                                stop_after_answer=True, stop_on_loop=True, guide_answers=prof.guide_answers)

    def _evaluate(self, name: str, tasks: list[str], gates: dict, *, mode: str = "output",
                  handle=None, prompt_format: str | None = None, split: str = "eval", dest: Path | None = None):
        from .evaluate import averages, evaluate_many

        student, bank, own = self._load()
        handle = handle or own
        handle.set_mode(mode)
        fmt = prompt_format or self.cfg.prompt_format
        res = evaluate_many(student.model, student.tokenizer, self._records(tasks, split), handle=handle,
                            gates=gates, config=self._config(fmt), progress=self.cfg.progress)
        d = dest or self.out / "eval" / name
        for t, r in res.items():
            atomic_write_text(d / "predictions" / f"{t}.jsonl",
                              "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in r.predictions))
        seen = set(json.loads((self.out / "config.json").read_text())["seen"])
        summary = {"system": name, "mode": mode, "prompt_format": fmt,
                   "tasks": {t: dict(r.summary(), seen=t in seen,
                                     no_answer=sum(p["prediction"] is None for p in r.predictions),
                                     generated_tokens=sum(p["num_tokens"] for p in r.predictions))
                             for t, r in res.items()},
                   "averages": averages(res, seen=seen)}
        atomic_write_text(d / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"  {name}: " + ", ".join(f"{t} {r.accuracy:.0%}" for t, r in res.items()), flush=True)
        return summary

    def eval_base(self, layout):
        tasks = layout["seen"] + layout["unseen"]
        self._evaluate("base", tasks, {t: None for t in tasks})

    def eval_experts(self, layout):
        _, bank, _ = self._load()
        self._evaluate("experts", layout["seen"], {t: bank.weights_vector(t) for t in layout["seen"]})

    def select(self, layout, steps: int):
        """Score every snapshot's experts on their tasks' validation records; write the bank that takes
        each expert from its best step (ties: the later step) and ``experts/selection.json``."""
        from .distill import snapshots

        candidates = snapshots(self.out / "experts")
        candidates[steps] = self.out / "experts" / "bank"  # the final bank, snapshot or not
        seen = layout["seen"]
        scores, banks = {}, {}
        for step, path in sorted(candidates.items()):
            banks[step], summ = self._evaluate_bank(path, f"step-{step}", seen,
                                                    lambda b: {t: b.weights_vector(t) for t in seen}, split="val",
                                                    dest=self.out / "select" / f"step-{step:07d}")
            scores[step] = {t: summ["tasks"][t]["accuracy"] for t in seen}
        choice = {t: max(scores, key=lambda s: (scores[s][t], s)) for t in layout["seen"]}
        composed = compose_bank(banks, choice)
        atomic_write_text(self.out / "experts" / "selection.json", json.dumps(
            {"chosen": choice, "val_accuracy": {t: {str(s): scores[s][t] for s in sorted(scores)}
                                                for t in layout["seen"]}}, indent=2) + "\n")
        composed.save(self.out / "experts" / "selected")  # experts.json last: the stage's done marker
        print("  steps chosen: " + ", ".join(f"{t} {s}" for t, s in choice.items()), flush=True)
        self._student = None  # the later stages load the chosen bank (``bank_dir``)

    def eval_multitask(self, layout):
        tasks = layout["seen"] + layout["unseen"]
        self._evaluate_bank(self.out / "multitask" / "bank", "multitask", tasks,
                            lambda b: {t: torch.ones(1) for t in tasks})

    def _evaluate_bank(self, path: Path, name: str, tasks: list[str], gates, **kwargs):
        """:meth:`_evaluate` with the bank in ``path`` injected in place of the session's (one injection
        at a time; the session's goes back after). ``gates``: bank -> task gates. Returns (bank, summary)."""
        from .experts import ExpertBank
        from .inject import inject_experts

        student, own_bank, own = self._load()
        bank = ExpertBank.load(path, student=student)
        own.remove()
        try:
            handle = inject_experts(student.model, bank)
            try:
                return bank, self._evaluate(name, tasks, gates(bank), handle=handle, **kwargs)
            finally:
                handle.remove()
        finally:
            self._handle = inject_experts(student.model, own_bank)

    def mix_all(self, layout, prof: Profile, mode: str):
        from .mix import mix
        from .mixture import save_mixture

        student, bank, handle = self._load()
        d = self.out / "mixtures" / mode
        for t, path in layout["shots"].items():
            if (d / f"{t}.json").exists():
                continue
            shots = read_task_file(path, require_marker=True, missing_marker="drop").records
            m = mix(bank, student, shots, method="search", mode=mode, budget=prof.budget, seed=self.cfg.seed,
                    target=t, bank_dir=str(self.bank_dir), handle=handle,
                    finalists=prof.finalists, verify_max_new_tokens=prof.max_new_tokens,
                    guide_answers=prof.guide_answers, progress=self.cfg.progress)
            save_mixture(m, d / f"{t}.json")
            picked = m.info["finalists"][m.info["chosen"]]
            print(f"  {t}: shots loss {m.shots_loss_before:.3f} -> {m.shots_loss_after:.3f}, "
                  f"{picked['correct']}/{len(shots)} shots right, w = "
                  + " ".join(f"{v:+.2f}" for v in m.weights.values()), flush=True)
        atomic_write_text(d / "done", "")

    def eval_mixtures(self, layout, mode: str):
        from .mixture import load_mixture

        _, bank, _ = self._load()
        tasks = [t for t in layout["seen"] + layout["unseen"] if t in layout["shots"]]
        gates = {t: bank.weights_vector(load_mixture(self.out / "mixtures" / mode / f"{t}.json").weights)
                 for t in tasks}
        self._evaluate(f"search-{mode}", tasks, gates, mode=mode)

    def eval_uniform(self, layout):
        _, bank, _ = self._load()
        tasks = layout["unseen"]
        self._evaluate("uniform", tasks, {t: torch.full((bank.num_experts,), 1.0 / bank.num_experts)
                                          for t in tasks}, mode="weight")


# ----------------------------------------------------------------------------------------- report
SYSTEMS = ("base", "multitask", "experts", "search-weight", "search-output", "uniform")


def write_report(out: Path, layout: dict, times: dict, *, header: list[str] = ()) -> Path:
    """``report.md`` and ``report.png`` from the evaluation summaries found under ``out/eval``."""
    found = {s: json.loads((out / "eval" / s / "summary.json").read_text())
             for s in SYSTEMS if (out / "eval" / s / "summary.json").exists()}
    tasks = layout["seen"] + layout["unseen"]
    # every system answers the same records: the first summary that has it gives a task's majority answer
    floor = {t: next((found[s]["tasks"][t]["majority"] for s in found
                      if found[s]["tasks"].get(t, {}).get("majority") is not None), None) for t in tasks}
    head = "| task | seen | n | " + " | ".join(found) + " | constant answer | Fine-tune-CoT 250M |"
    rows = [head, "|" + "---|" * (5 + len(found))]

    def cell(s, t):
        r = found[s]["tasks"].get(t)
        return "-" if r is None else f"{100 * r['accuracy']:.1f}"

    for t in tasks:
        n = next((found[s]["tasks"][t]["n"] for s in found if t in found[s]["tasks"]), 0)
        ref = FINETUNE_COT_250M.get(t)
        rows.append(f"| {t} | {'yes' if t in layout['seen'] else 'no'} | {n} | "
                    + " | ".join(cell(s, t) for s in found)
                    + f" | {'-' if floor[t] is None else f'{100 * floor[t]:.1f}'} | {'-' if ref is None else ref} |")
    for group, names in (("seen", layout["seen"]), ("unseen", layout["unseen"])):
        vals = []
        for s in found:
            accs = [found[s]["tasks"][t]["accuracy"] for t in names if t in found[s]["tasks"]]
            vals.append("-" if len(accs) < len(names) or not accs else f"{100 * sum(accs) / len(accs):.1f}")
        floors = [floor[t] for t in names]
        const = "-" if not floors or None in floors else f"{100 * sum(floors) / len(floors):.1f}"
        rows.append(f"| **mean {group}** | | | " + " | ".join(vals) + f" | {const} | |")
    no_answer = []
    for s, summ in found.items():
        n = sum(r["n"] for r in summ["tasks"].values())
        k = sum(r.get("no_answer", r.get("unextracted", 0)) for r in summ["tasks"].values())
        forced = sum(r.get("forced", 0) for r in summ["tasks"].values())
        no_answer.append(f"{s} {k}/{n} ({100 * k / max(1, n):.1f}%)"
                         + (f", {forced} answered after a forced marker" if forced else ""))
    text = ["# Real-data reproduction", "", *header, "",
            "Accuracy in % per task and system (exact match after answer extraction). Systems: `base` the frozen "
            "student; `multitask` one LoRA on the union of the seen tasks' data; `experts` each seen task's own "
            "expert; `search-weight` / `search-output` a weight search over the bank on the task's shots "
            "(learn/), weight or output composition, checked by generation on the shots with w = 0 among the "
            "candidates; `uniform` the plain average of the experts. `constant answer`: the accuracy of "
            "giving every record the task's most common gold answer, the floor below which a system's accuracy "
            "says nothing about its reasoning (a student that answers every yes/no question \"no\" scores "
            "the share of \"no\").", "",
            *rows, "",
            "Generations without an extractable answer: " + "; ".join(no_answer) + ".", "",
            f"The paper's average gains over single-model CoT distillation: +{PAPER_GAIN['seen']} points seen, "
            f"+{PAPER_GAIN['unseen']} unseen.", "",
            *_selection_lines(out),
            "Time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + ".", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(text))
    _plot(found, tasks, out / "report.png", floor)
    return path


def _selection_lines(out: Path) -> list[str]:
    path = out / "experts" / "selection.json"
    if not path.exists():
        return []
    sel = json.loads(path.read_text())
    parts = [f"{t} {s} (" + ", ".join(f"{k}: {100 * v:.0f}" for k, v in sel["val_accuracy"][t].items()) + ")"
             for t, s in sel["chosen"].items()]
    return ["Each expert's training step, chosen by accuracy (%) on its task's validation records per step: "
            + "; ".join(parts) + ".", ""]


def _plot(found: dict, tasks: list[str], png: Path, floor: dict[str, float | None] | None = None) -> None:
    """Grouped bars per task, one per system; a black line across each task's group marks its
    constant-answer accuracy (``floor``, the majority gold answer) where it is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(tasks)), 4.5))
    width = 0.8 / max(1, len(found))
    for i, (s, summ) in enumerate(found.items()):
        xs = [j + i * width for j, t in enumerate(tasks) if t in summ["tasks"]]
        ys = [100 * summ["tasks"][t]["accuracy"] for t in tasks if t in summ["tasks"]]
        ax.bar(xs, ys, width=width, label=s)
    marked = False
    for j, t in enumerate(tasks):
        if floor and floor.get(t) is not None:
            ax.hlines(100 * floor[t], j - width / 2, j + 0.8 - width / 2, colors="black", linewidth=1.5,
                      label=None if marked else "constant answer")
            marked = True
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
    ax.set_xticklabels([t.replace("_", "\n", 1) for t in tasks], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("MoDE-CoTD protocol on real data")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with replacing(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
