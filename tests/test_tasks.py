"""Built-in tasks: determinism, exact rationales (answers recomputed here from the question text),
disjoint train/eval/shot questions, and the files ``write_builtin`` writes."""

from __future__ import annotations

import json
import re

import pytest

from modecotd_engine.engine.answers import KNOWN_TASK_TYPES, answers_match, extract_answer, split_output
from modecotd_engine.engine.data import EXPERT_NAME_RE, read_task_dir
from modecotd_engine.engine.tasks import (
    BUILTIN_TASKS,
    SEEN_TASKS,
    UNSEEN_TASKS,
    generate_eval,
    generate_records,
    generate_shots,
    split_of,
    write_builtin,
)

ALL_TASKS = tuple(BUILTIN_TASKS)
N = 60


def _question(record: dict) -> str:
    m = re.fullmatch(r"Infer the correct (?:answer|choice) for the question\.\n\nQ: (.*)\nA:", record["input"], re.S)
    assert m, record["input"]
    return m.group(1)


def _choices(question: str) -> tuple[str, dict[str, str]]:
    stem, _, tail = question.partition(" Answer choices: ")
    assert tail.endswith("."), question
    return stem, dict(re.findall(r"\(([A-F])\) ([^,]+?)(?:,|\.$)", tail))


def _check_equations(rationale: str) -> list[int]:
    """Every 'a op b = c' in the rationale is true arithmetic; returns the results in order."""
    results = []
    for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", rationale):
        a, b, c = int(a), int(b), int(c)
        assert c == (a + b if op == "+" else a - b), rationale
        results.append(c)
    return results


# Independent solvers: each parses the question text and computes the answer itself.


def _solve_count(question: str, loss: str, gain: str) -> str:
    m = re.match(r"\w+ has (\d+) (?:\w+), (.*)\. How many", question)
    total, rest = int(m.group(1)), m.group(2)
    steps = re.findall(rf"({loss}|{gain}) (\d+)", rest)
    assert len(steps) == 2, question
    for verb, k in steps:
        total += int(k) if verb == gain else -int(k)
    assert total >= 0
    return str(total)


def _solve_letters(question: str, which: str) -> str:
    words = re.search(r'"([a-z ]+)"', question).group(1).split()
    assert len(words) == 3
    return "".join(w[-1] if which == "last" else w[0] for w in words)


def _solve_swaps(question: str) -> str:
    stem, choices = _choices(question)
    holding = dict(re.findall(r"(\w+) has (\w+)", stem.split(".")[0]))
    for a, b in re.findall(r"(\w+) and (\w+) swap", stem):
        holding[a], holding[b] = holding[b], holding[a]
    asked = re.search(r"What does (\w+) have\?", stem).group(1)
    return next(letter for letter, color in choices.items() if color == holding[asked])


def _solve_date(question: str) -> str:
    stem, choices = _choices(question)
    m = re.match(r"Today is (\w+) (\d+)\. What (?:is|was) the date (\d+) days (from today|ago)\?", stem)
    month, day, k, direction = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    target = f"{month} {day + k if direction == 'from today' else day - k}"
    matches = [letter for letter, text in choices.items() if text == target]
    assert len(matches) == 1, question
    return matches[0]


def _solve_toggles(question: str, verb: str) -> str:
    toggles = len(re.findall(rf"\w+ {verb} it\.", question))
    keeps = len(re.findall(r"\w+ does not \w+ it\.", question))
    assert toggles + keeps == 3, question
    return "yes" if toggles % 2 == 0 else "no"


SOLVERS = {
    "word_math": lambda q: _solve_count(q, "loses", "gets"),
    "price_math": lambda q: _solve_count(q, "pays", "earns"),
    "last_letters": lambda q: _solve_letters(q, "last"),
    "first_letters": lambda q: _solve_letters(q, "first"),
    "swap_tracking": _solve_swaps,
    "date_shift": _solve_date,
    "coin_flips": lambda q: _solve_toggles(q, "flips"),
    "lamp_switch": lambda q: _solve_toggles(q, "switches"),
}


def test_registry():
    assert len(SEEN_TASKS) >= 5 and len(UNSEEN_TASKS) >= 2
    assert set(SEEN_TASKS) | set(UNSEEN_TASKS) == set(BUILTIN_TASKS)
    assert not set(SEEN_TASKS) & set(UNSEEN_TASKS)
    assert set(SOLVERS) == set(BUILTIN_TASKS)
    for name, fam in BUILTIN_TASKS.items():
        assert fam.name == name and EXPERT_NAME_RE.fullmatch(name)
        assert KNOWN_TASK_TYPES[name] == fam.task_type
        assert fam.description
    # Each unseen task shares its answer type with a seen one, so a mixture has something to transfer.
    seen_types = {BUILTIN_TASKS[n].task_type for n in SEEN_TASKS}
    assert all(BUILTIN_TASKS[n].task_type in seen_types for n in UNSEEN_TASKS)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_generation_is_deterministic_in_seed(name):
    a = generate_records(name, N, seed=3)
    assert a == generate_records(name, N, seed=3)
    assert a != generate_records(name, N, seed=4)
    assert generate_eval(name, 10, seed=3) == generate_eval(name, 10, seed=3)
    assert len({r["input"] for r in a}) == N  # no duplicate questions within a split


@pytest.mark.parametrize("name", ALL_TASKS)
def test_rationale_and_answer_are_correct(name):
    fam = BUILTIN_TASKS[name]
    for rec in generate_records(name, N, seed=0) + generate_shots(name, 5, seed=0):
        question = _question(rec)
        split = split_output(rec["output"])
        assert split is not None and rec["output"].endswith(" END")
        rationale, answer = split
        expected = SOLVERS[name](question)
        assert answer == expected, (rec, expected)
        assert extract_answer(rec["output"], fam.task_type) == expected
        if fam.task_type == "arithmetic":
            # The chain of equations is true and ends at the answer.
            assert _check_equations(rationale)[-1] == int(expected)
        if fam.task_type == "letters":
            for word, letter in re.findall(r'letter of "(\w+)" is "(\w)"', rationale):
                assert letter == (word[-1] if name == "last_letters" else word[0])
        if fam.task_type == "choice":
            assert rationale.endswith(f"({expected}).")
        if name == "date_shift":
            _check_equations(rationale)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_examples_are_short(name):
    # A proxy for the student's token budget (about 40-100 tokens with a 49k BPE vocabulary).
    for rec in generate_records(name, N, seed=1):
        assert len(rec["input"]) + len(rec["output"]) <= 330, rec


@pytest.mark.parametrize("name", ALL_TASKS)
def test_eval_records_hold_the_gold_answer(name):
    fam = BUILTIN_TASKS[name]
    for rec in generate_eval(name, 20, seed=0):
        assert "-->" not in rec["output"]
        assert rec["output"] == SOLVERS[name](_question(rec))
        assert answers_match(rec["output"], rec["output"], fam.task_type)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_train_eval_shots_never_share_a_question(name):
    train = {r["input"] for r in generate_records(name, 300, seed=0)}
    for seed in (0, 1, 2):
        ev = {r["input"] for r in generate_eval(name, 50, seed=seed)}
        shots = {r["input"] for r in generate_shots(name, 5, seed=seed)}
        assert len(ev) == 50 and len(shots) == 5
        assert not train & ev and not train & shots and not ev & shots
    assert {split_of(q) for q in train} == {"train"}


def test_answers_are_balanced():
    for name in ("swap_tracking", "date_shift", "coin_flips", "lamp_switch"):
        golds = [split_output(r["output"])[1] for r in generate_records(name, 200, seed=0)]
        counts = {g: golds.count(g) for g in set(golds)}
        # Every option is used and none dominates: a constant guess cannot score well.
        assert len(counts) >= 2 and max(counts.values()) < 0.5 * len(golds) + 20, (name, counts)


def test_bad_requests():
    with pytest.raises(KeyError, match="unknown built-in task"):
        generate_records("nope", 1, seed=0)
    with pytest.raises(ValueError, match="n must be"):
        generate_eval("word_math", -1, seed=0)
    assert generate_records("word_math", 0, seed=0) == []


def test_write_builtin(tmp_path):
    manifest = write_builtin(tmp_path, n_train=20, n_eval=8, n_shots=5, seed=7)
    assert manifest["seen"] == list(SEEN_TASKS) and manifest["unseen"] == list(UNSEEN_TASKS)
    assert json.loads((tmp_path / "tasks.json").read_text()) == manifest
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind

    train = read_task_dir(tmp_path / "train")
    assert list(train) == sorted(SEEN_TASKS)
    assert all(len(tf.records) == 20 and tf.missing_marker == 0 for tf in train.values())
    ev = read_task_dir(tmp_path / "eval", require_marker=False)
    assert list(ev) == sorted(BUILTIN_TASKS)
    assert all(len(tf.records) == 8 for tf in ev.values())
    shots = read_task_dir(tmp_path / "shots")
    assert list(shots) == sorted(BUILTIN_TASKS)
    assert all(len(tf.records) == 5 and tf.missing_marker == 0 for tf in shots.values())

    assert train["word_math"].records == generate_records("word_math", 20, seed=7)
    for name in BUILTIN_TASKS:
        ev_q = {r["input"] for r in ev[name].records}
        shot_q = {r["input"] for r in shots[name].records}
        train_q = {r["input"] for r in train[name].records} if name in train else set()
        assert not ev_q & shot_q and not ev_q & train_q and not shot_q & train_q
    assert manifest["files"]["train/word_math.jsonl"] == 20
    assert "train/price_math.jsonl" not in manifest["files"]
