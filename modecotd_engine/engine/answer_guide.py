"""Guided answers: every generation ends with an answer of its task's type after the ``-->`` marker.

Measured on real data (docs/real-data.md), the experts carry their own task's answer form to
questions of another type ("Therefore, the answer is Yes. --> A END" on a yes/no question) or never
reach the marker (a rationale repeated until the token budget), so most of their generations on
unseen tasks had no answer at all. A guided row keeps its rationale free and fixes only what comes
after the marker, the way zero-shot CoT's second stage asks for the answer in a given form
("Therefore, among A through E, the answer is"):

* after a marker the row writes itself, the next tokens are restricted to the answer form
  (:class:`AnswerForm`): one of a finite set of answers (a choice question's option letters,
  Yes/No), or a number (digits, one sign, decimal point and thousands commas), or free text for
  the other types; then ``END``;
* a row that is about to end while its text holds no answer (``answers.extract_answer`` finds none)
  gets the marker written for it and answers the same way: when its token budget leaves only room
  for the marker and an answer, when it enters a loop, or when it picks EOS or a token holding
  ``END`` (the marker's first token replaces that pick). Such rows are reported with finish reason
  ``"forced"``.

A row whose text holds an answer is left to end as it would unguided (the base student's "... so the
answer is yes." and EOS; a rationale cut at the budget whose last lines name an option), so a guided
run changes only the generations an unguided one leaves without an answer or answers after the marker
in another type's form. Measured on real data (docs/real-data.md): forcing an answer also where the
text held one won 4 records and lost 4 against the extraction rules.

The token tables (which ids are whitespace, digits, which spell the marker) are built once per
tokenizer from its vocabulary (:func:`guide_tables`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .answers import ANSWER_MARKER, CHOICE_LETTERS, END_TOKEN, TASK_TYPES, extract_answer, parse_options

BOOLEAN_ANSWERS = ("Yes", "No", "yes", "no", "True", "False")
# Choice letters used when a question lists no "(A) ..." options.
DEFAULT_CHOICES = CHOICE_LETTERS[:5]
# Tokens of a number answer at most (digits are single tokens in SmolLM2's vocabulary).
NUMBER_TOKENS = 12
# Tokens of a free-text answer (letters, text) at most before END is written for it.
FREE_TOKENS = 12
# Whitespace tokens a row may write between its own marker and its answer ("-->\n\nYes").
MARKER_WHITESPACE = 3
# What the marker is written as (the training format: rationale, blank line, marker, blank line).
MARKER_TEXT = f"\n\n{ANSWER_MARKER}\n\n"


@dataclass(frozen=True)
class AnswerForm:
    """What a request's answer must look like.

    Attributes:
        task_type: one of ``answers.TASK_TYPES``.
        choices: the finite answers (choice: option letters; boolean: Yes/No in both cases, True/False); empty for
            number (arithmetic) and free-text (letters, text) answers.
        question: the prompt's question, for deciding whether a rationale already holds an answer
            (an option's text counts for its letter).
    """

    task_type: str
    choices: tuple[str, ...] = ()
    question: str | None = None

    def __post_init__(self):
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"unknown task type {self.task_type!r}; expected one of {', '.join(TASK_TYPES)}")

    @classmethod
    def of(cls, task_type: str, question: str | None = None) -> "AnswerForm":
        """The form of a task type: a choice question's letters come from its ``(A) ...`` options
        (A-E when it lists none), a boolean answer is Yes or No."""
        if task_type == "choice":
            letters = tuple(sorted(parse_options(question))) if question else ()
            return cls(task_type, letters or tuple(DEFAULT_CHOICES), question)
        if task_type == "boolean":
            return cls(task_type, BOOLEAN_ANSWERS, question)
        return cls(task_type, (), question)

    def answered(self, text: str) -> bool:
        """Whether ``text`` already holds an answer of this form (``extract_answer`` finds one)."""
        return extract_answer(text, self.task_type, question=self.question) is not None


# ------------------------------------------------------------------------------------------------
# per-tokenizer tables


@dataclass
class GuideTables:
    """Token ids a guide needs, for one tokenizer."""

    marker: list[int]  # MARKER_TEXT as it is tokenized after a rationale
    end: list[int]  # " END" as it follows an answer
    whitespace: list[int]  # tokens that decode to whitespace only
    digits: list[int]  # tokens that decode to digits only
    sign: list[int]  # "-"
    separators: list[int]  # "." and ","
    closes_marker: set[int]  # tokens whose text holds the marker's last character
    spell_end: set[int]  # tokens whose text holds END (a row that writes one ends)
    _answers: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        self.digits_set, self.whitespace_set = set(self.digits), set(self.whitespace)

    def answer_ids(self, tokenizer, answer: str) -> list[int]:
        """``answer``'s ids as written after the marker's blank line."""
        if answer not in self._answers:
            self._answers[answer] = tokenizer.encode(answer, add_special_tokens=False)
        return self._answers[answer]


_TABLES: "weakref.WeakKeyDictionary[object, GuideTables]" = weakref.WeakKeyDictionary()


def _middle(tokenizer, before: str, middle: str, after: str) -> list[int]:
    """The ids of ``middle`` as tokenized between ``before`` and ``after`` (byte-level BPE tokenizes a
    piece differently by context: ``"\\n\\n"`` alone is one token, two after ``">"``)."""
    whole = tokenizer.encode(before + middle + after, add_special_tokens=False)
    head = tokenizer.encode(before, add_special_tokens=False)
    tail = tokenizer.encode(after, add_special_tokens=False)
    if whole[: len(head)] == head and whole[len(whole) - len(tail):] == tail and len(whole) > len(head) + len(tail):
        mid = whole[len(head): len(whole) - len(tail)]
        if tokenizer.decode(mid) == middle:
            return mid
    return tokenizer.encode(middle, add_special_tokens=False)


def guide_tables(tokenizer) -> GuideTables:
    """The :class:`GuideTables` of ``tokenizer``, built on first use (one decode of the vocabulary)."""
    try:
        return _TABLES[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    whitespace = [i for i, s in enumerate(vocab) if s and not s.strip()]
    digits = [i for i, s in enumerate(vocab) if s.isascii() and s.isdigit()]
    last = ANSWER_MARKER[-1]
    tables = GuideTables(
        marker=_middle(tokenizer, "So the answer is 7.", MARKER_TEXT, "7 END"),
        end=_middle(tokenizer, "7", f" {END_TOKEN}", ""),
        whitespace=whitespace,
        digits=digits,
        sign=[i for i, s in enumerate(vocab) if s == "-"],
        separators=[i for i, s in enumerate(vocab) if s in (".", ",")],
        closes_marker={i for i, s in enumerate(vocab) if last in s},
        spell_end={i for i, s in enumerate(vocab) if END_TOKEN in s},
    )
    try:
        _TABLES[tokenizer] = tables
    except TypeError:  # a tokenizer that cannot be weakly referenced: built again next time
        pass
    return tables


# ------------------------------------------------------------------------------------------------
# one row's guide

FREE, MARKER, ANSWER, DONE = "free", "marker", "answer", "done"


class AnswerGuide:
    """The answer state of one decoding row.

    Phases: ``free`` (the rationale; nothing is restricted), ``marker`` (the marker is being written
    for the row, one forced token per step), ``answer`` (tokens restricted to the form; END is
    written for the row once its answer is whole), ``done`` (the answer and END are written).

    The decoder asks, before it picks a row's token: :meth:`forced` (a token the row must take) or
    :meth:`allowed` (the ids it may take; None: any); after: :meth:`advance` with the token taken.
    """

    def __init__(self, form: AnswerForm, tables: GuideTables, tokenizer):
        self.form, self.tables = form, tables
        self.phase = FREE
        self.marker_forced = False
        self.queue: list[int] = []  # forced tokens still to come
        self.written: list[int] = []  # answer tokens written so far
        self.whitespace = 0
        self.settled = False  # the budget check ran (it decodes the text once)
        self.trie: dict | None = None
        if form.choices:
            self.trie = {}
            for answer in form.choices:
                node = self.trie
                for t in tables.answer_ids(tokenizer, answer):
                    node = node.setdefault(t, {})
                node[None] = {}  # an answer ends here
        limit = max((len(tables.answer_ids(tokenizer, a)) for a in form.choices), default=0)
        self.answer_limit = limit if form.choices else NUMBER_TOKENS if form.task_type == "arithmetic" else FREE_TOKENS
        self.reserve = len(tables.marker) + self.answer_limit + len(tables.end)

    # ---- before the pick

    def forced(self) -> int | None:
        """The token the row must take now, or None."""
        return self.queue[0] if self.queue else None

    def allowed(self, room: int | None = None) -> list[int] | None:
        """The ids the row may take now (answer phase), or None for no restriction. ``room``: tokens
        the row may still generate; whitespace after its own marker is allowed only while the answer
        and END still fit after it."""
        if self.phase != ANSWER or self.queue:
            return None
        t = self.tables
        lead = (not self.written and not self.marker_forced and self.whitespace < MARKER_WHITESPACE
                and (room is None or room > self.answer_limit + len(t.end)))
        if self.trie is not None:
            node = self._node()
            ids = [k for k in node if k is not None]
            return ids + (t.whitespace if lead else [])
        if self.form.task_type == "arithmetic":
            if not self.written:
                return t.digits + t.sign + (t.whitespace if lead else [])
            if self.written[-1] in t.digits_set:
                return t.digits + t.separators + t.end[:1]
            return t.digits  # after a sign or a separator: a digit
        return None  # free text up to END (or the answer limit)

    def _node(self) -> dict:
        node = self.trie
        for tok in self.written:
            node = node[tok]
        return node

    # ---- after the pick

    def start_marker(self) -> None:
        """Write the marker for this row from the next step on (it ended without an answer)."""
        self.phase = MARKER
        self.marker_forced = True
        self.queue = list(self.tables.marker)

    def advance(self, token: int, tail: str | None) -> None:
        """Record the token the row took; ``tail`` is the decoded end of its text when the token may
        have closed a marker the row wrote itself (None otherwise)."""
        if self.queue:
            self.queue.pop(0)
            if self.phase == MARKER:
                if not self.queue:
                    self.phase = ANSWER
                return
            if self.phase == ANSWER and not self.queue:  # END written
                self.phase = DONE
            return
        if self.phase == FREE:
            if tail is not None and tail.rstrip().endswith(ANSWER_MARKER):
                self.phase = ANSWER
            return
        if self.phase != ANSWER:
            return
        t = self.tables
        if (not self.written and token in t.whitespace_set and not self.marker_forced
                and self.whitespace < MARKER_WHITESPACE):
            self.whitespace += 1  # the blank line between the row's own marker and its answer
            return
        if self.trie is None and t.end and token == t.end[0]:  # a number or free answer wrote END itself
            self.queue = list(t.end[1:])
            if not self.queue:
                self.phase = DONE
            return
        if self.trie is not None and token not in self._node():
            self.queue = list(t.end)  # not an allowed token (the decoder restricts, so never): the answer ends
            return
        self.written.append(token)
        if self.trie is not None:
            if None in self._node():  # a whole answer: END follows
                self.queue = list(t.end)
        elif len(self.written) >= self.answer_limit:
            self.queue = list(t.end)

    @property
    def done(self) -> bool:
        return self.phase == DONE


def new_guide(form: AnswerForm, tokenizer) -> AnswerGuide:
    """A fresh :class:`AnswerGuide` for one row."""
    return AnswerGuide(form, guide_tables(tokenizer), tokenizer)


def restrict(logits: torch.Tensor, rows: list[int], allowed: list[list[int]]) -> torch.Tensor:
    """``logits`` (b, V) with every id outside ``allowed[k]`` set to -inf in row ``rows[k]``."""
    out = logits.clone()
    for j, ids in zip(rows, allowed):
        keep = torch.tensor(ids, device=logits.device, dtype=torch.long)
        row = torch.full_like(out[j], float("-inf"))
        row[keep] = logits[j, keep]
        out[j] = row
    return out


__all__ = [
    "BOOLEAN_ANSWERS",
    "DEFAULT_CHOICES",
    "MARKER_TEXT",
    "AnswerForm",
    "AnswerGuide",
    "GuideTables",
    "guide_tables",
    "new_guide",
    "restrict",
]
