"""Built-in reasoning tasks: small synthetic families with exact, rule-written rationales.

Each family draws one question from a ``random.Random`` and writes its rationale step by step in
the training format (``<rationale>\\n\\n-->\\n\\n<answer> END``), so a student can be distilled and
evaluated with no teacher and no downloaded data. The examples are deliberately short (about
40-100 student tokens, prompt included) and very regular: a 135M student fine-tuned for a few
minutes on CPU can learn to copy the steps.

Seen families (one expert each) and unseen families (held out, served by mixing the seen experts)
come in related pairs, so that a mixture has something to transfer:

    word_math     (seen, arithmetic)  <->  price_math    (unseen, arithmetic, other phrasing)
    last_letters  (seen, letters)     <->  first_letters (unseen, letters)
    coin_flips    (seen, boolean)     <->  lamp_switch   (unseen, boolean)
    swap_tracking (seen, choice), date_shift (seen, choice)

Train, eval and few-shot examples never share a question: every question is assigned to one split
by a stable hash of its text (``split_of``), and each split only keeps its own questions. This holds
for any seeds, whereas different seeds alone would let a small question space collide.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modecotd_engine.engine.atomic import atomic_write_text
from modecotd_engine.engine.answers import KNOWN_TASK_TYPES, format_output, split_output

ANSWER_PROMPT = "Infer the correct answer for the question.\n\nQ: {question}\nA:"
CHOICE_PROMPT = "Infer the correct choice for the question.\n\nQ: {question}\nA:"

SPLITS = ("train", "eval", "shots")

# Every name, item, word and color below is ONE token of the SmolLM2 tokenizer (with its leading
# space), which keeps examples short and makes the letters tasks a real spelling step.
NAMES = (
    "Ann", "Bob", "Cal", "Dan", "Kim", "Max", "Sam", "Tom",
    "Tim", "Ben", "Jack", "Mark", "Paul", "Nick", "Jane", "Adam",
)
ITEMS = ("apples", "pens", "cards", "books", "eggs", "balls", "cups", "shells", "stamps", "rocks", "toys", "hats")
GOODS = ("pen", "cup", "hat", "toy", "book", "ball", "card", "bag")
WORDS = (
    "cat", "dog", "sun", "map", "pen", "box", "cup", "hat", "leg", "bird", "fish", "tree", "milk", "rose",
    "ship", "wolf", "corn", "jam", "owl", "pig", "bell", "coat", "door", "egg", "fox", "hill", "ink", "leaf",
    "moon", "nest", "pool", "rain", "sand", "bag", "bed", "bus", "car", "hand", "home", "king", "lake",
    "lion", "ring", "road", "rock", "salt", "seed", "star", "wind",
)
COLORS = ("red", "blue", "green", "pink", "black", "white", "gray", "brown", "gold", "purple")
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)
LETTERS = "ABCDEF"


@dataclass(frozen=True)
class TaskFamily:
    """One generated task.

    Attributes:
        name: task (and expert) name.
        task_type: answer type, one of ``answers.TASK_TYPES``.
        seen: True if an expert is trained on it; False if held out for mixing.
        description: one line for listings.
        generate: draws one training record ``{"input", "output"}`` from the given generator.
    """

    name: str
    task_type: str
    seen: bool
    description: str
    generate: Callable[[random.Random], dict]


def _record(prompt: str, question: str, rationale: str, answer: str) -> dict:
    return {"input": prompt.format(question=question), "output": format_output(rationale, answer)}


def _choices(options: list[str]) -> str:
    return "Answer choices: " + ", ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options)) + "."


# ----------------------------------------------------------------------------------------------
# arithmetic


def _count_steps(rng: random.Random, total: int, verbs: tuple[str, str], units: tuple[str, ...]) -> tuple:
    """Two gain/loss steps on a running count; returns (question clauses, rationale lines, result).

    ``verbs`` is (loss, gain); ``units`` are nouns named in the clauses (``""`` for a bare number).
    """
    clauses, lines = [], [f"Start with {total}."]
    for unit in units:
        # A loss is only drawn when something is left to lose, so counts stay positive.
        if total > 1 and rng.random() < 0.5:
            k = rng.randint(1, min(9, total - 1))
            clauses.append(f"{verbs[0]} {k}{unit}")
            lines.append(f"{total} - {k} = {total - k}.")
            total -= k
        else:
            k = rng.randint(1, 9)
            clauses.append(f"{verbs[1]} {k}{unit}")
            lines.append(f"{total} + {k} = {total + k}.")
            total += k
    return clauses, lines, total


def _gen_word_math(rng: random.Random) -> dict:
    """Two gain/loss steps on a count of items."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(2, 9)
    clauses, lines, total = _count_steps(rng, start, ("loses", "gets"), ("", " more"))
    question = f"{name} has {start} {item}, {clauses[0]}, then {clauses[1]}. How many {item} does {name} have now?"
    return _record(ANSWER_PROMPT, question, "\n".join(lines), str(total))


def _gen_price_math(rng: random.Random) -> dict:
    """The same two-step count, phrased as paying for and selling goods."""
    name = rng.choice(NAMES)
    goods = rng.sample(GOODS, 2)
    start = rng.randint(5, 15)
    clauses, lines, total = _count_steps(rng, start, ("pays", "earns"), (f" for a {goods[0]}", f" for a {goods[1]}"))
    question = f"{name} has {start} coins, {clauses[0]}, then {clauses[1]}. How many coins does {name} have now?"
    return _record(ANSWER_PROMPT, question, "\n".join(lines), str(total))


# ----------------------------------------------------------------------------------------------
# letters


def _gen_letter_concat(rng: random.Random, which: str) -> dict:
    words = rng.sample(WORDS, 3)
    pick = (lambda w: w[-1]) if which == "last" else (lambda w: w[0])
    question = f'Take the {which} letters of the words in "{" ".join(words)}" and concatenate them.'
    answer = "".join(pick(w) for w in words)
    steps = [f'The {which} letter of "{w}" is "{pick(w)}".' for w in words]
    return _record(ANSWER_PROMPT, question, "\n".join(steps), answer)


def _gen_last_letters(rng: random.Random) -> dict:
    return _gen_letter_concat(rng, "last")


def _gen_first_letters(rng: random.Random) -> dict:
    return _gen_letter_concat(rng, "first")


# ----------------------------------------------------------------------------------------------
# choice


def _gen_swap_tracking(rng: random.Random) -> dict:
    """Three people hold balls; two swaps; which ball does one of them end with."""
    people = rng.sample(NAMES, 3)
    colors = rng.sample(COLORS, 3)
    holding = dict(zip(people, colors))
    pairs = rng.sample([(0, 1), (0, 2), (1, 2)], 2)
    asked = rng.choice(people)
    swaps, lines = [], []
    for a, b in pairs:
        pa, pb = people[a], people[b]
        swaps.append(f"{pa} and {pb} swap")
        holding[pa], holding[pb] = holding[pb], holding[pa]
        lines.append(", ".join(f"{p} {holding[p]}" for p in people) + ".")
    letter = LETTERS[colors.index(holding[asked])]
    start = ", ".join(f"{p} has {c}" for p, c in zip(people, colors))
    question = f"{start}. {swaps[0]}, then {swaps[1]}. What does {asked} have? {_choices(colors)}"
    lines.append(f"{asked} has {holding[asked]}, which is ({letter}).")
    return _record(CHOICE_PROMPT, question, "\n".join(lines), letter)


def _gen_date_shift(rng: random.Random) -> dict:
    """A date a few days before or after today, within the month, picked from three choices."""
    month = rng.choice(MONTHS)
    k = rng.randint(2, 9)
    later = rng.random() < 0.5
    if later:
        day = rng.randint(1, 28 - k)
        target, wrong_way = day + k, day - k
        ask, step = f"{k} days from today", f"{day} + {k} = {day + k}"
    else:
        day = rng.randint(k + 1, 28)
        target, wrong_way = day - k, day + k
        ask, step = f"{k} days ago", f"{day} - {k} = {day - k}"
    # Distractors: the other direction (when it is a real date) and an off-by-one slip.
    off_by_one = target + 1 if rng.random() < 0.5 else target - 1
    distractors = [d for d in (wrong_way, off_by_one, target + 2, target - 2) if 1 <= d <= 28 and d != target]
    options = [target] + list(dict.fromkeys(distractors))[:2]
    rng.shuffle(options)
    letter = LETTERS[options.index(target)]
    verb = "is" if later else "was"
    question = (
        f"Today is {month} {day}. What {verb} the date {ask}? {_choices([f'{month} {d}' for d in options])}"
    )
    rationale = f"{step}, so {month} {target}, which is ({letter})."
    return _record(CHOICE_PROMPT, question, rationale, letter)


# ----------------------------------------------------------------------------------------------
# boolean


def _gen_toggle(rng: random.Random, thing: str, start: str, states: tuple[str, str], verbs: tuple[str, str]) -> dict:
    """Three people each toggle a two-state thing or not; is it still in its start state?

    Args:
        thing: the object ("coin"); start: its start state as said in the question ("heads up").
        states: short names of (start state, other state) used in the rationale ("heads", "tails").
        verbs: (base form, third person) of the toggling verb ("flip", "flips").
    """
    people = rng.sample(NAMES, 3)
    state = 0
    clauses, lines = [f"A {thing} is {start}."], []
    for p in people:
        if rng.random() < 0.5:
            state = 1 - state
            clauses.append(f"{p} {verbs[1]} it.")
            lines.append(f"{p} {verbs[1]}: {states[state]}.")
        else:
            clauses.append(f"{p} does not {verbs[0]} it.")
            lines.append(f"{p} does not {verbs[0]}: {states[state]}.")
    answer = "yes" if state == 0 else "no"
    clauses.append(f"Is it still {start}?")
    return _record(ANSWER_PROMPT, " ".join(clauses), "\n".join(lines), answer)


def _gen_coin_flips(rng: random.Random) -> dict:
    return _gen_toggle(rng, "coin", "heads up", ("heads", "tails"), ("flip", "flips"))


def _gen_lamp_switch(rng: random.Random) -> dict:
    return _gen_toggle(rng, "lamp", "on", ("on", "off"), ("switch", "switches"))


# ----------------------------------------------------------------------------------------------
# registry


def _family(name: str, seen: bool, description: str, generate: Callable[[random.Random], dict]) -> TaskFamily:
    return TaskFamily(name, KNOWN_TASK_TYPES[name], seen, description, generate)


BUILTIN_TASKS: dict[str, TaskFamily] = {
    f.name: f
    for f in (
        _family("word_math", True, "two-step add/subtract word problems on small counts", _gen_word_math),
        _family("last_letters", True, "concatenate the last letters of three short words", _gen_last_letters),
        _family("swap_tracking", True, "track balls through two swaps, pick the final one", _gen_swap_tracking),
        _family("date_shift", True, "a date a few days before/after today, from three choices", _gen_date_shift),
        _family("coin_flips", True, "is the coin still heads up after three people flip or not", _gen_coin_flips),
        _family("price_math", False, "two-step buy/sell problems with coins (unseen phrasing)", _gen_price_math),
        _family("first_letters", False, "concatenate the first letters of three short words", _gen_first_letters),
        _family("lamp_switch", False, "is the lamp still on after three people switch it or not", _gen_lamp_switch),
    )
}
SEEN_TASKS: tuple[str, ...] = tuple(n for n, f in BUILTIN_TASKS.items() if f.seen)
UNSEEN_TASKS: tuple[str, ...] = tuple(n for n, f in BUILTIN_TASKS.items() if not f.seen)


def split_of(question: str) -> str:
    """The split a question belongs to: a stable hash of its text (1/10 eval, 1/10 shots, rest train)."""
    bucket = int.from_bytes(hashlib.blake2b(question.encode("utf-8"), digest_size=8).digest(), "big") % 10
    return "eval" if bucket == 0 else "shots" if bucket == 1 else "train"


def _family_or_raise(name: str) -> TaskFamily:
    if name not in BUILTIN_TASKS:
        raise KeyError(f"unknown built-in task {name!r}; known: {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name]


def _draw(name: str, n: int, seed: int, split: str) -> list[dict]:
    """``n`` distinct records of one split, deterministic in ``(name, split, seed)``."""
    family = _family_or_raise(name)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # str seeds are hashed with SHA-512 by random.seed, so this is stable across processes.
    rng = random.Random(f"{name}/{split}/{seed}")
    records, questions = [], set()
    max_draws = 200 * n + 1000
    for _ in range(max_draws):
        if len(records) == n:
            break
        rec = family.generate(rng)
        if rec["input"] in questions or split_of(rec["input"]) != split:
            continue
        questions.add(rec["input"])
        records.append(rec)
    if len(records) < n:
        raise ValueError(f"task {name!r} has too few distinct {split} questions for n={n} (got {len(records)})")
    return records


def generate_records(name: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct training records ``{"input", "output"}`` (rationale, ``-->``, answer ``END``)."""
    return _draw(name, n, seed, "train")


def generate_shots(name: str, n: int, seed: int) -> list[dict]:
    """``n`` few-shot records in the training format, disjoint from train and eval questions."""
    return _draw(name, n, seed, "shots")


def generate_eval(name: str, n: int, seed: int) -> list[dict]:
    """``n`` evaluation records ``{"input", "output": gold answer}``, disjoint from train questions."""
    out = []
    for rec in _draw(name, n, seed, "eval"):
        split = split_output(rec["output"])
        assert split is not None  # every generator writes the marker
        out.append({"input": rec["input"], "output": split[1]})
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


def write_builtin(out_dir: Path, *, n_train: int = 200, n_eval: int = 50, n_shots: int = 5, seed: int = 0) -> dict:
    """Write the built-in tasks as task files.

    Layout: ``out_dir/train/<task>.jsonl`` (seen tasks, training format), ``out_dir/eval/<task>.jsonl``
    (all tasks, gold answers), ``out_dir/shots/<task>.jsonl`` (all tasks, training format, for
    mixing) and ``out_dir/tasks.json`` (task types, seen/unseen, counts, seed).

    Args:
        out_dir: destination directory (created).
        n_train: training records per seen task.
        n_eval: evaluation records per task.
        n_shots: few-shot records per task.
        seed: generation seed; each split derives its own stream from it.

    Returns:
        The manifest written to ``tasks.json``: ``{"seed", "seen", "unseen", "tasks": {name: {...}},
        "files": {relative path: record count}}``.
    """
    out_dir = Path(out_dir)
    files: dict[str, int] = {}
    for name, family in BUILTIN_TASKS.items():
        parts = [("eval", generate_eval(name, n_eval, seed)), ("shots", generate_shots(name, n_shots, seed))]
        if family.seen:
            parts.insert(0, ("train", generate_records(name, n_train, seed)))
        for split, records in parts:
            _write_jsonl(out_dir / split / f"{name}.jsonl", records)
            files[f"{split}/{name}.jsonl"] = len(records)
    manifest = {
        "format_version": 1,
        "seed": seed,
        "seen": list(SEEN_TASKS),
        "unseen": list(UNSEEN_TASKS),
        "tasks": {
            n: {"type": f.task_type, "seen": f.seen, "description": f.description} for n, f in BUILTIN_TASKS.items()
        },
        "files": files,
    }
    atomic_write_text(out_dir / "tasks.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
