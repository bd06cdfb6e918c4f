"""Answer format, extraction and scoring."""

from __future__ import annotations

import pytest

from modecotd_engine.engine.answers import (
    KNOWN_TASK_TYPES,
    TASK_TYPES,
    answers_match,
    extract_answer,
    format_output,
    infer_task_type,
    normalize_answer,
    parse_number,
    parse_options,
    split_output,
)

PAPER_TASKS = (
    "addsub", "aqua", "commonsense_qa", "date_understanding", "gsm8k", "last_letter_concatenation",
    "multiarith", "openbook_qa", "reclor", "single_eq", "strategy_qa", "svamp",
    "tracking_shuffled_objects", "coin_flip",
)


# ---------------------------------------------------------------- format / split


def test_format_then_split_round_trips():
    out = format_output("Tom has 3 + 4 = 7 apples.\n", " 7 ")
    assert out == "Tom has 3 + 4 = 7 apples.\n\n-->\n\n7 END"
    assert split_output(out) == ("Tom has 3 + 4 = 7 apples.", "7")


def test_format_refuses_marker_in_answer():
    with pytest.raises(ValueError, match="marker"):
        format_output("r", "a --> b")


def test_split_without_marker_is_none():
    assert split_output("no marker here, the answer is 5") is None


def test_split_uses_last_marker():
    assert split_output("a --> b\n\n-->\n\nC END") == ("a --> b", "C")


def test_split_real_format_with_decimal_gold():
    out = "The factory dyed 61,921 + 49,500 = 111,421 yards.\n\n-->\n\n111421.0 END"
    assert split_output(out)[1] == "111421.0"
    assert extract_answer(out, "arithmetic") == "111421"


# ---------------------------------------------------------------- extraction after the marker


@pytest.mark.parametrize(
    "text, task_type, expected",
    [
        ("...so the answer is 26.\n\n-->\n\n26 END", "arithmetic", "26"),
        ("x\n\n-->\n\n16.0 END", "arithmetic", "16"),
        ("x\n\n-->\n\n$1,234.50 END", "arithmetic", "1234.5"),
        ("x\n\n-->\n\n-3 END", "arithmetic", "-3"),
        ("rationale says 99\n\n-->\n\nthe total is 12 END", "arithmetic", "12"),
        ("x\n\n-->\n\nC END", "choice", "C"),
        ("x\n\n-->\n\n(c) END", "choice", "C"),
        ("x\n\n-->\n\nB: 07/07/1972 END", "choice", "B"),
        ("x\n\n-->\n\nYes END", "boolean", "yes"),
        ("x\n\n-->\n\nFalse END", "boolean", "no"),
        ('x\n\n-->\n\n"nryn" END', "letters", "nryn"),
        ("x\n\n-->\n\nnryn END", "letters", "nryn"),
        ("x\n\n-->\n\n Paris is the capital END", "text", "Paris is the capital"),
        # A generation that ran on past its answer without END: the answer is the first line.
        ("x\n\n-->\n\n42\n\nQ: another question 7", "arithmetic", "42"),
        # "END" inside a word is not the end token.
        ("x\n\n-->\n\nWEEKEND END", "text", "WEEKEND"),
    ],
)
def test_extract_after_marker(text, task_type, expected):
    assert extract_answer(text, task_type) == expected


def test_extract_marker_with_empty_answer_is_none():
    assert extract_answer("rationale 5\n\n-->\n\n END", "arithmetic") is None
    assert extract_answer("rationale 5\n\n-->", "arithmetic") is None


def test_extract_marker_answer_without_number_is_none():
    # The model committed to an answer; a number in the rationale must not be taken instead.
    assert extract_answer("there are 5 cats\n\n-->\n\nmany END", "arithmetic") is None


# ---------------------------------------------------------------- extraction without the marker


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3 + 4 = 7, then 7 * 2 = 14.", "14"),
        ("They dyed 61,921 + 49,500 = 111,421 yards.", "111421"),
        ("It costs $12.30 in total.", "12.3"),
        ("The temperature is -5 degrees.", "-5"),
        ("Pages 3-4 were read.", "4"),  # a range, not -4
        ("We need 1, 2, 3 of them.", "3"),  # a list, not a thousands group
        ("The answer is 43.0.", "43"),
        ("no digits at all", None),
    ],
)
def test_extract_arithmetic_fallback(text, expected):
    assert extract_answer(text, "arithmetic") == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is (C) 20.", "C"),
        ("so (b) is right", "B"),
        ("I pick C) since it fits.", "C"),
        ("Therefore, the answer is D.", "D"),
        ("The answer is: E", "E"),
        ("First (A) looks good but (D) is better", "D"),
        ("A dog can breathe air.", None),  # a leading article is not a choice
        ("The answer is G.", None),  # only A-F
    ],
)
def test_extract_choice_fallback(text, expected):
    assert extract_answer(text, "choice") == expected


OBQA = "Meadow voles consume Answer choices: (A) producers, (B) apex predators, (C) decomposers, (D) detritivores."
TRACK = ("Infer the correct choice for the question.\n\nQ: ... At the end of the game, Alice has the \nWhich choice "
         "is true? Answer choices: (A) orange ball, (B) white ball, (C) blue ball.\nA:")


def test_parse_options_of_both_prompt_formats():
    assert parse_options(OBQA) == {"A": "producers", "B": "apex predators", "C": "decomposers", "D": "detritivores"}
    assert parse_options(TRACK) == {"A": "orange ball", "B": "white ball", "C": "blue ball"}
    assert parse_options("Q: (A) 1,000, (B) 2,000.\nA:") == {"A": "1,000", "B": "2,000"}
    assert parse_options("Q: How many apples?\nA:") == {}


@pytest.mark.parametrize(
    "text, question, expected",
    [
        ("Meadow voles consume Producers.", OBQA, "A"),  # case-insensitive
        ("Not decomposers: they are detritivores", OBQA, "D"),  # the option stated last
        ("Alice has the white ball.", TRACK, "B"),  # "white ball" ends where "ball" would
        ("Alice has a ball.", TRACK, None),  # no option's whole text
        ("They eat producerss.", OBQA, None),  # whole words only
        ("The answer is (C), not producers.", OBQA, "C"),  # a letter comes first
        ("-->\n\napex predators END", OBQA, "B"),  # after the marker too
        ("Meadow voles consume producers.", None, None),  # no question, no options
    ],
)
def test_extract_choice_by_option_text(text, question, expected):
    assert extract_answer(text, "choice", question=question) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Is it? Yes, it is.", "yes"),
        ("At first yes, but in the end no.", "no"),
        ("This statement is true.", "yes"),
        ("That is FALSE.", "no"),
        ("Perhaps.", None),
        ("The notion is unknown.", None),  # "no" inside a word does not count
    ],
)
def test_extract_boolean_fallback(text, expected):
    assert extract_answer(text, "boolean") == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ('The last letter of "Colton" is "n".\nSo the final answer is "nryn".', "nryn"),
        ("So the answer is nryn.", "nryn"),
        ("\u201cab\u201d then \u201ccd\u201d", "cd"),
        ("", None),
    ],
)
def test_extract_letters_fallback(text, expected):
    assert extract_answer(text, "letters") == expected


def test_extract_text_fallback_is_last_line():
    assert extract_answer("step one\nstep two\n\n  Paris  \n\n", "text") == "Paris"
    assert extract_answer("  \n ", "text") is None


def test_unknown_type_raises():
    with pytest.raises(ValueError, match="unknown task type"):
        extract_answer("x", "numeric")
    with pytest.raises(ValueError, match="unknown task type"):
        answers_match("1", "1", "numeric")


# ---------------------------------------------------------------- normalization and scoring


@pytest.mark.parametrize(
    "answer, task_type, expected",
    [
        ("16.0", "arithmetic", "16"),
        ("1,000", "arithmetic", "1000"),
        ("$12.30", "arithmetic", "12.3"),
        ("(c)", "choice", "C"),
        ("B.", "choice", "B"),
        ("True", "boolean", "yes"),
        ("NO", "boolean", "no"),
        ('"nryn".', "letters", "nryn"),
    ],
)
def test_normalize_answer(answer, task_type, expected):
    assert normalize_answer(answer, task_type) == expected


def test_parse_number():
    assert parse_number("1,000") == 1000.0
    assert parse_number("$12.30") == 12.3
    assert parse_number("-5") == -5.0
    assert parse_number("seven") is None
    assert parse_number("") is None
    assert parse_number("nan") is None


@pytest.mark.parametrize(
    "pred, gold, task_type",
    [
        ("43", "43.0", "arithmetic"),
        ("1,000", "1000", "arithmetic"),
        ("0.33333", "0.33334", "arithmetic"),  # within 1e-4
        ("c", "C", "choice"),
        ("(C)", "C", "choice"),
        ("Yes", "yes", "boolean"),
        ("true", "Yes", "boolean"),
        ('"nryn"', "nryn", "letters"),
        (" nryn ", "nryn", "letters"),
        ("Paris", "Paris", "text"),
    ],
)
def test_answers_match_true(pred, gold, task_type):
    assert answers_match(pred, gold, task_type)


@pytest.mark.parametrize(
    "pred, gold, task_type",
    [
        ("26", "2", "arithmetic"),
        ("43.001", "43", "arithmetic"),  # outside 1e-4
        ("C END", "C", "choice"),  # strict scoring takes an extracted answer, not raw text
        ("B", "C", "choice"),
        ("no", "yes", "boolean"),
        ("NRYN", "nryn", "letters"),  # strings are exact
        (None, "5", "arithmetic"),
    ],
)
def test_answers_match_false(pred, gold, task_type):
    assert not answers_match(pred, gold, task_type)


def test_compat_substring_reproduces_the_original_evaluator():
    # The original evaluator counts the gold as found anywhere in the prediction text.
    assert answers_match("C END", "C", "choice", compat_substring=True)
    assert answers_match("26", "2", "arithmetic", compat_substring=True)
    assert not answers_match("26", "2", "arithmetic")
    assert not answers_match("B END", "C", "choice", compat_substring=True)
    assert not answers_match(None, "C", "choice", compat_substring=True)
    assert not answers_match("anything", "  ", "text", compat_substring=True)


def test_extract_then_match_on_paper_style_outputs():
    cases = [
        ("Melanie catches 8 trout.\nTom catches 2 times as many.\n\n-->\n\n16.0 END", "16", "arithmetic"),
        ("Therefore, the answer is (E) 20.\n\n-->\n\nE END", "E", "choice"),
        ("It is only after all of these steps...\n\n-->\n\nNo END", "no", "boolean"),
        ('So the final answer would be "nryn".\n\n-->\n\nnryn END', "nryn", "letters"),
    ]
    for out, gold, task_type in cases:
        assert answers_match(extract_answer(out, task_type), gold, task_type), out


# ---------------------------------------------------------------- task types


def test_known_task_types_cover_the_paper_tasks():
    for name in PAPER_TASKS:
        assert KNOWN_TASK_TYPES[name] in TASK_TYPES, name
    assert KNOWN_TASK_TYPES["gsm8k"] == "arithmetic"
    assert KNOWN_TASK_TYPES["aqua"] == "choice"
    assert KNOWN_TASK_TYPES["strategy_qa"] == "boolean"
    assert KNOWN_TASK_TYPES["coin_flip"] == "boolean"
    assert KNOWN_TASK_TYPES["last_letter_concatenation"] == "letters"
    assert all(t in TASK_TYPES for t in KNOWN_TASK_TYPES.values())


def test_infer_task_type_name_first():
    # The name wins even when the golds look like something else.
    assert infer_task_type("aqua", ["1", "2"]) == "choice"
    assert infer_task_type("GSM8K") == "arithmetic"


@pytest.mark.parametrize(
    "golds, expected",
    [
        (["1", "2.5", "1,000", "-3"], "arithmetic"),
        (["A", "c", "(D)"], "choice"),
        (["Yes", "no", "True", "false"], "boolean"),
    ],
)
def test_infer_task_type_from_golds(golds, expected):
    assert infer_task_type("my_task", golds) == expected


def test_infer_task_type_default_and_error():
    assert infer_task_type("my_task", ["abc", "def"], default="letters") == "letters"
    assert infer_task_type("my_task", [], default="text") == "text"
    with pytest.raises(ValueError, match="--task-type"):
        infer_task_type("my_task", ["abc", "1"])
    with pytest.raises(ValueError, match="--task-type"):
        infer_task_type("my_task")
    with pytest.raises(ValueError, match="unknown task type"):
        infer_task_type("my_task", ["abc"], default="numeric")
