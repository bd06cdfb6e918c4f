"""How much the frozen student's own yes/no preference knows about the answer.

For every record of a yes/no task the student reads the prompt (in the prompt format eval uses) and
this script takes, at the first position it would generate, the log-probability of the answer
words for "yes" (True, Yes, ...) against those for "no": score = logsumexp over the yes words' first
tokens - logsumexp over the no words'. Then per task:

* AUC: the probability that a "yes" record scores above a "no" record (0.5: the preference carries
  nothing about the answer), with its standard error (Hanley and McNeil, 1982);
* accuracy of the preference as it is (yes when score > 0), of a label-free calibration (yes for the
  records scoring above the median), and of a constant answer (the majority gold answer).

If the AUC is near 0.5, no reweighting of the student's yes/no answer (contextual calibration, a
threshold chosen on shots) can lift its accuracy above a constant answer: the information is not there.

    python benchmarks/answer_signal.py --data ../shared/data/mode-cotd/dev-unseen \\
        --tasks strategy_qa,coin_flip --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modecotd_engine.engine.atomic import atomic_write_text  # noqa: E402
from modecotd_engine.engine.data import encode_prompt, format_prompt, pad_token_id, read_task_dir  # noqa: E402
from modecotd_engine.engine.evaluate import gold_answer  # noqa: E402

YES_WORDS = ("True", "Yes", "yes", "true", " True", " Yes", " yes", " true")
NO_WORDS = ("False", "No", "no", "false", " False", " No", " no", " false")
YES_GOLD = {"yes", "true"}
NO_GOLD = {"no", "false"}


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half."""
    if not pos or not neg:
        raise ValueError("AUC needs at least one record of each answer")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def auc_stderr(a: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC estimate (Hanley and McNeil, 1982)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def answer_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """First tokens of the yes words and of the no words; a token both start with (a byte tokenizer's
    leading space) says nothing about either and is left out."""
    def first(words):
        return {tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words}

    yes, no = first(YES_WORDS), first(NO_WORDS)
    yes, no = yes - no, no - yes
    if not yes or not no:
        raise ValueError("the tokenizer gives the yes and the no words no first token of their own")
    return sorted(yes), sorted(no)


@torch.no_grad()
def scores(model, tokenizer, prompts: list[str], *, prompt_format: str, batch_size: int = 16) -> list[float]:
    """log P(yes words) - log P(no words) at the first generated position of every prompt."""
    yes, no = answer_tokens(tokenizer)
    pad = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, format_prompt(tokenizer, p, prompt_format)) for p in prompts[i:i + batch_size]]
        width = max(map(len, ids))
        x = torch.tensor([[pad] * (width - len(s)) + s for s in ids], device=device)  # left padded
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids], device=device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = torch.log_softmax(model(input_ids=x, attention_mask=mask, position_ids=pos).logits[:, -1].float(), -1)
        out += (torch.logsumexp(logp[:, yes], -1) - torch.logsumexp(logp[:, no], -1)).tolist()
    return out


def measure(model, tokenizer, records: list[dict], *, prompt_format: str) -> dict:
    golds = [gold_answer(r["output"]).strip().lower() for r in records]
    bad = sorted({g for g in golds if g not in YES_GOLD | NO_GOLD})
    if bad:
        raise ValueError(f"not a yes/no task: gold answers {bad[:5]}")
    is_yes = [g in YES_GOLD for g in golds]
    s = scores(model, tokenizer, [r["input"] for r in records], prompt_format=prompt_format)
    pos = [v for v, y in zip(s, is_yes) if y]
    neg = [v for v, y in zip(s, is_yes) if not y]
    a = auc(pos, neg)
    median = statistics.median(s)
    n = len(s)
    return {"n": n, "yes": len(pos), "auc": a, "auc_stderr": auc_stderr(a, len(pos), len(neg)),
            "accuracy_as_is": sum((v > 0) == y for v, y in zip(s, is_yes)) / n,
            "yes_as_is": sum(v > 0 for v in s) / n,
            "accuracy_median": sum((v > median) == y for v, y in zip(s, is_yes)) / n,
            "constant": max(len(pos), len(neg)) / n, "scores": s, "gold_yes": is_yes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="evaluation directory: NAME.json/.jsonl of {input, output}")
    ap.add_argument("--tasks", required=True, help="comma-separated yes/no tasks of --data")
    ap.add_argument("--limit", type=int, default=0, help="records per task (default: all)")
    ap.add_argument("--student", default=None, help="student directory (default: the built-in student)")
    ap.add_argument("--prompt-format", default="chat", choices=("chat", "plain"),
                    help="how the prompt is shown to the student, as eval's --prompt-format (default: chat)")
    ap.add_argument("--out", required=True, help="output directory: signal.json and signal.md")
    args = ap.parse_args(argv)

    from modecotd_engine.engine.student import load_student

    t0 = time.perf_counter()
    student = load_student(args.student)
    student.model.eval()
    files = read_task_dir(args.data, require_marker=False)
    results = {}
    for t in args.tasks.split(","):
        if t not in files:
            raise SystemExit(f"{args.data}: no task {t!r} (found: {', '.join(sorted(files))})")
        recs = files[t].records[: args.limit] if args.limit else files[t].records
        results[t] = measure(student.model, student.tokenizer, recs, prompt_format=args.prompt_format)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    cmd = "python benchmarks/answer_signal.py " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_text(out / "signal.json", json.dumps({"command": cmd, "seconds": seconds, "tasks": results}) + "\n")
    lines = ["# The student's yes/no preference against the answer", "", f"- command: `{cmd}`",
             f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}; torch {torch.__version__}; {seconds:.0f} s", "",
             "| task | n | yes | AUC (+- s.e.) | answers yes as is | accuracy as is | accuracy, median threshold "
             "| constant answer |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t, r in results.items():
        lines.append(f"| {t} | {r['n']} | {r['yes']} | {r['auc']:.3f} +- {r['auc_stderr']:.3f} | "
                     f"{r['yes_as_is']:.1%} | {r['accuracy_as_is']:.1%} | {r['accuracy_median']:.1%} | "
                     f"{r['constant']:.1%} |")
    atomic_write_text(out / "signal.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
