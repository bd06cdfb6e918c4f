"""Answer format, extraction and scoring for chain-of-thought records.

A training output is the rationale, a line ``-->``, then the answer and ``END``::

    Tom has 3 + 4 = 7 apples.

    -->

    7 END

Extraction takes the text after the LAST ``-->`` up to ``END``; a generation without the marker falls
back to a rule per task type (last number, last choice letter, yes/no, final quoted string, last
line). Scoring compares normalized answers (numbers within 1e-4, letters and yes/no
case-insensitively, strings exactly); ``compat_substring=True`` reproduces the original evaluator,
which counts a prediction as right when the gold answer is a substring of it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

TASK_TYPES = ("arithmetic", "choice", "boolean", "letters", "text")

ANSWER_MARKER = "-->"
END_TOKEN = "END"

# The paper's 14 tasks, then the engine's built-in generated families (engine/tasks.py).
KNOWN_TASK_TYPES: dict[str, str] = {
    "addsub": "arithmetic",
    "aqua": "choice",
    "commonsense_qa": "choice",
    "date_understanding": "choice",
    "gsm8k": "arithmetic",
    "last_letter_concatenation": "letters",
    "multiarith": "arithmetic",
    "openbook_qa": "choice",
    "reclor": "choice",
    "single_eq": "arithmetic",
    "strategy_qa": "boolean",
    "svamp": "arithmetic",
    "tracking_shuffled_objects": "choice",
    "coin_flip": "boolean",
    # built-in families
    "word_math": "arithmetic",
    "last_letters": "letters",
    "swap_tracking": "choice",
    "date_shift": "choice",
    "coin_flips": "boolean",
    "price_math": "arithmetic",
    "first_letters": "letters",
    "lamp_switch": "boolean",
}

NUMBER_TOLERANCE = 1e-4
CHOICE_LETTERS = "ABCDEF"

# A number: thousands groups ("1,000") or plain digits, optional decimals. The sign is only taken when
# the minus is not glued to a preceding word or number ("3-2" is a range or a subtraction, not -2).
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")
_END_RE = re.compile(r"(?<![A-Za-z])END(?![A-Za-z])")
_BOOL_RE = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_BOOL_MAP = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
# Choice-letter forms, any of which may hold the final answer; the last one in the text wins.
_CHOICE_RES = (
    re.compile(r"\(([A-Fa-f])\)"),  # (C)
    re.compile(r"(?<![A-Za-z(])([A-F])\)"),  # C)
    re.compile(r"\b(?:answer|choice|option)\s+(?:is|would be|will be)\s*:?\s*\(?([A-F])\b", re.IGNORECASE),
)
# At the start of an answer segment: "C", "C.", "(c)", "C: 07/07/1972".
_CHOICE_LEAD_RE = re.compile(r"^\(?([A-Fa-f])(?:\)|(?![A-Za-z0-9]))")
# The options of a choice question: "Answer choices: (A) producers, (B) apex predators, (C) decomposers."
_OPTION_RE = re.compile(r"\(([A-F])\)\s*(.*?)\s*(?=,?\s*\([A-F]\)|\n|$)", re.DOTALL)
_QUOTED_RE = re.compile(r"\"([^\"\n]*)\"|\u201c([^\u201d\n]*)\u201d")
_STRIP_CHARS = " \t\r\n\"'`\u201c\u201d\u2018\u2019"


def _check_type(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; expected one of {', '.join(TASK_TYPES)}")


def format_output(rationale: str, answer: str) -> str:
    """Build a training output: ``"<rationale>\\n\\n-->\\n\\n<answer> END"``.

    Args:
        rationale: the reasoning text (surrounding whitespace is stripped).
        answer: the final answer; must not itself contain the ``-->`` marker.
    """
    if ANSWER_MARKER in answer:
        raise ValueError(f"answer {answer!r} contains the marker {ANSWER_MARKER!r}")
    return f"{rationale.strip()}\n\n{ANSWER_MARKER}\n\n{answer.strip()} {END_TOKEN}"


def _answer_segment(text: str) -> str:
    """Text after the last marker, cut at ``END`` (or, when END is missing, at the first non-empty line)."""
    seg = text.rsplit(ANSWER_MARKER, 1)[1]
    m = _END_RE.search(seg)
    if m is not None:
        return seg[: m.start()].strip()
    # A generation that ran past the answer without END: the answer is its first line.
    for line in seg.splitlines():
        if line.strip():
            return line.strip()
    return ""


def split_output(output: str) -> tuple[str, str] | None:
    """Split a training output into ``(rationale, answer)``; None when there is no ``-->`` marker."""
    if ANSWER_MARKER not in output:
        return None
    rationale = output.rsplit(ANSWER_MARKER, 1)[0].strip()
    return rationale, _answer_segment(output)


def _parse_decimal(text: str) -> Decimal | None:
    s = text.strip().strip(_STRIP_CHARS).replace(",", "").replace("$", "").strip().rstrip(".")
    if not s:
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def _plain(d: Decimal) -> str:
    """``1000`` -> ``"1000"``, ``16.0`` -> ``"16"``, ``12.30`` -> ``"12.3"`` (exact, no float rounding)."""
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def parse_number(text: str) -> float | None:
    """Parse one number written as ``"1,000"``, ``"$12.30"``, ``"43.0"`` or ``"-5"``; None if not a number."""
    d = _parse_decimal(text)
    return None if d is None else float(d)


def _last_number(text: str) -> str | None:
    found = _NUMBER_RE.findall(text)
    return _plain(Decimal(found[-1].replace(",", ""))) if found else None


def _last_choice(text: str) -> str | None:
    best_pos, best = -1, None
    for pattern in _CHOICE_RES:
        for m in pattern.finditer(text):
            if m.start(1) > best_pos:
                best_pos, best = m.start(1), m.group(1).upper()
    return best


def parse_options(question: str) -> dict[str, str]:
    """The options of a choice question, letter -> text (``"(A) producers, (B) apex predators."`` ->
    ``{"A": "producers", "B": "apex predators"}``); empty when the question lists none. Only the text
    after the last ``Answer choices:`` is read when the question has that phrase."""
    idx = question.lower().rfind("answer choices:")
    tail = question[idx:] if idx >= 0 else question
    out = {}
    for m in _OPTION_RE.finditer(tail):
        text = m.group(2).strip().rstrip(".,;").strip()
        if text:
            out.setdefault(m.group(1), text)
    return out


def _choice_by_option_text(text: str, options: dict[str, str]) -> str | None:
    """The option whose text the generation states last (whole words, case-insensitive); a longer
    option text ending at the same place wins ("white ball" over "ball")."""
    low = " ".join(text.lower().split())
    best_key, best = (-1, 0), None
    for letter, option in options.items():
        pat = re.compile(r"(?<![a-z0-9])" + re.escape(" ".join(option.lower().split())) + r"(?![a-z0-9])")
        for m in pat.finditer(low):
            key = (m.end(), len(option))
            if key > best_key:
                best_key, best = key, letter
    return best


def _bool_word(text: str, last: bool) -> str | None:
    found = _BOOL_RE.findall(text)
    if not found:
        return None
    return _BOOL_MAP[(found[-1] if last else found[0]).lower()]


def _letters_answer(text: str) -> str | None:
    quoted = _QUOTED_RE.findall(text)
    if quoted:
        a, b = quoted[-1]
        return (a or b).strip()
    tokens = text.split()
    if not tokens:
        return None
    tok = tokens[-1].strip(_STRIP_CHARS).rstrip(".,;:!?").strip(_STRIP_CHARS)
    return tok or None


def extract_answer(text: str, task_type: str, question: str | None = None) -> str | None:
    """Extract the normalized final answer from a generated or training output.

    With a ``-->`` marker the answer is the text after the last marker up to ``END``; without it a
    rule per type is applied to the whole text: arithmetic -> last number; choice -> last choice
    letter A-F (``"(C)"``, ``"C)"``, ``"answer is C"``); boolean -> last yes/no/true/false;
    letters -> final double-quoted string, else last token; text -> last non-empty line.

    A choice answer written as an option's text instead of its letter ("Meadow voles consume
    producers.") is mapped to that option's letter when ``question`` lists the options
    (``parse_options``); the letter rules come first.

    Args:
        text: the output text (rationale and answer, or a bare generation).
        task_type: one of ``TASK_TYPES``.
        question: the prompt, for the options of a choice question (optional).

    Returns:
        arithmetic: a plain number string (``"1000"``, ``"12.5"``); choice: an upper-case letter;
        boolean: ``"yes"`` or ``"no"``; letters/text: the stripped string. None if nothing was found.
    """
    _check_type(task_type)
    if ANSWER_MARKER in text:
        seg = _answer_segment(text)
        if not seg:
            return None
        if task_type == "arithmetic":
            return _last_number(seg)
        if task_type == "choice":
            m = _CHOICE_LEAD_RE.match(seg)
            found = m.group(1).upper() if m else _last_choice(seg)
            return found or (_choice_by_option_text(seg, parse_options(question)) if question else None)
        if task_type == "boolean":
            return _bool_word(seg, last=False)
        if task_type == "letters":
            return _letters_answer(seg)
        return seg.strip(_STRIP_CHARS) or None
    if task_type == "arithmetic":
        return _last_number(text)
    if task_type == "choice":
        found = _last_choice(text)
        return found or (_choice_by_option_text(text, parse_options(question)) if question else None)
    if task_type == "boolean":
        return _bool_word(text, last=True)
    if task_type == "letters":
        return _letters_answer(text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def normalize_answer(answer: str, task_type: str) -> str:
    """Canonical form of an already-extracted (or gold) answer, used for exact comparison."""
    _check_type(task_type)
    s = answer.strip().strip(_STRIP_CHARS)
    if task_type == "arithmetic":
        d = _parse_decimal(s)
        return s if d is None else _plain(d)
    if task_type == "choice":
        m = re.fullmatch(r"\(?([A-Fa-f])\)?\.?", s)
        return m.group(1).upper() if m else s.upper()
    if task_type == "boolean":
        return _BOOL_MAP.get(s.rstrip(".").lower(), s.lower())
    return s.rstrip(".").strip(_STRIP_CHARS)


def answers_match(pred: str | None, gold: str, task_type: str, compat_substring: bool = False) -> bool:
    """Whether a prediction matches the gold answer.

    Args:
        pred: the extracted prediction (``extract_answer``), or with ``compat_substring`` the raw
            prediction text; None (nothing extracted) never matches.
        gold: the gold answer.
        task_type: one of ``TASK_TYPES``.
        compat_substring: score as the original evaluator did: right when the stripped gold answer
            is a substring of the prediction text (so ``"C END"`` matches ``"C"`` and ``"26"``
            matches ``"2"``). Kept only to reproduce published numbers.
    """
    _check_type(task_type)
    if pred is None:
        return False
    if compat_substring:
        g = gold.strip()
        return bool(g) and g in pred
    if task_type == "arithmetic":
        p, g = parse_number(pred), parse_number(gold)
        if p is not None and g is not None:
            return abs(p - g) <= NUMBER_TOLERANCE
        return normalize_answer(pred, task_type) == normalize_answer(gold, task_type)
    return normalize_answer(pred, task_type) == normalize_answer(gold, task_type)


def infer_task_type(name: str, golds: Sequence[str] = (), default: str | None = None) -> str:
    """Task type of a task: its name in ``KNOWN_TASK_TYPES``, else inferred from its gold answers.

    Args:
        name: task name (file stem), e.g. ``"gsm8k"``.
        golds: gold answers; all numbers -> arithmetic, all single letters A-F -> choice, all
            yes/no/true/false -> boolean.
        default: the type to use when neither rule decides.

    Raises:
        ValueError: the type cannot be decided and no default was given.
    """
    if name in KNOWN_TASK_TYPES:
        return KNOWN_TASK_TYPES[name]
    if name.lower() in KNOWN_TASK_TYPES:
        return KNOWN_TASK_TYPES[name.lower()]
    vals = [g.strip() for g in golds if g is not None and g.strip()]
    if vals:
        if all(parse_number(v) is not None for v in vals):
            return "arithmetic"
        if all(re.fullmatch(r"\(?[A-Fa-f]\)?", v) for v in vals):
            return "choice"
        if all(v.rstrip(".").lower() in _BOOL_MAP for v in vals):
            return "boolean"
    if default is not None:
        _check_type(default)
        return default
    raise ValueError(
        f"cannot infer the task type of {name!r} from its name or its gold answers; "
        f"pass --task-type (one of {', '.join(TASK_TYPES)})"
    )
