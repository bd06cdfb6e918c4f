"""Guided answers: the answer forms, the per-tokenizer tables, one row's guide step by step, and the
decoder with guided rows on the tiny student (forced marker at the budget, after EOS, an answer of
the form after a marker the row wrote itself, the free rationale untouched)."""

from __future__ import annotations

import re

import pytest
import torch

from modecotd_engine.engine import decoder as decoder_module
from modecotd_engine.engine.answer_guide import (BOOLEAN_ANSWERS, DEFAULT_CHOICES, MARKER_TEXT, AnswerForm,
                                                 guide_tables, new_guide, restrict)
from modecotd_engine.engine.answers import extract_answer
from modecotd_engine.engine.evaluate import accuracy_table, evaluate_many
from modecotd_engine.engine.generate import GenerationConfig, GenerationError, generate_detailed

pytestmark = pytest.mark.usefixtures("one_thread")

CHOICE_Q = "Which one? Answer choices: (A) a red ball, (B) a cube, (C) a cone."
BOOL_Q = "Infer True(yes) or False(no) for the question.\n\nIs the coin still heads up?\nA:"
MATH_Q = "Tom has 3 apples and gets 4 more. How many?"


def ids_of(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------------
# forms and tables


def test_answer_form_of_each_type():
    assert AnswerForm.of("choice", CHOICE_Q).choices == ("A", "B", "C")
    assert AnswerForm.of("choice", "no options here").choices == tuple(DEFAULT_CHOICES)
    assert AnswerForm.of("choice").choices == tuple(DEFAULT_CHOICES)
    assert AnswerForm.of("boolean", BOOL_Q).choices == BOOLEAN_ANSWERS
    assert AnswerForm.of("arithmetic", MATH_Q).choices == ()
    assert AnswerForm.of("letters").choices == ()
    with pytest.raises(ValueError, match="unknown task type 'maths'"):
        AnswerForm("maths")


def test_answered_uses_the_extraction_rules():
    form = AnswerForm.of("choice", CHOICE_Q)
    assert form.answered("so it must be (B).")
    assert form.answered("It rolls, so a red ball.")  # an option's text counts for its letter
    assert not form.answered("I am not sure.")
    assert AnswerForm.of("boolean").answered("So the answer is no.")
    assert not AnswerForm.of("boolean").answered("The coin is heads up.")


def test_tables_of_the_byte_tokenizer(tokenizer):
    t = guide_tables(tokenizer)
    assert tokenizer.decode(t.marker) == MARKER_TEXT
    assert tokenizer.decode(t.end) == " END"
    assert sorted(tokenizer.decode([i]) for i in t.digits) == list("0123456789")
    assert {tokenizer.decode([i]) for i in t.sign} == {"-"}
    assert {tokenizer.decode([i]) for i in t.separators} == {".", ","}
    assert set(ids_of(tokenizer, "\n \t")) <= set(t.whitespace)
    assert not set(ids_of(tokenizer, "aZ0-")) & set(t.whitespace)
    assert ids_of(tokenizer, ">")[0] in t.closes_marker
    assert guide_tables(tokenizer) is t  # built once per tokenizer


def test_restrict_masks_all_but_the_allowed_ids():
    logits = torch.randn(3, 10, dtype=torch.float64)
    out = restrict(logits, [0, 2], [[1, 4], [9]])
    assert torch.equal(out[1], logits[1])
    assert torch.equal(out[0, [1, 4]], logits[0, [1, 4]]) and torch.isinf(out[0]).sum() == 8
    assert out[2].argmax() == 9 and torch.isinf(out[2]).sum() == 9
    assert torch.equal(logits, logits.clone())  # the input is not changed in place


# ------------------------------------------------------------------------------------------------
# one row's guide, driven by hand


def feed(guide, tokenizer, tokens, text_so_far=""):
    """Advance ``guide`` over ``tokens`` as the decoder would (a tail when a token may close a marker)."""
    out = list(tokenizer.encode(text_so_far, add_special_tokens=False))
    for t in tokens:
        f = guide.forced()
        assert f is None or f == t, "a forced token must be taken"
        allowed = guide.allowed()
        assert allowed is None or t in allowed, f"token {tokenizer.decode([t])!r} is not allowed"
        out.append(t)
        tail = tokenizer.decode(out[-6:]) if t in guide.tables.closes_marker else None
        guide.advance(t, tail)
    return out


def drain(guide):
    """Take every token the guide forces; the tokens taken."""
    out = []
    while guide.forced() is not None:
        out.append(guide.forced())
        guide.advance(out[-1], None)
    return out


def test_guide_after_a_marker_the_row_wrote(tokenizer):
    g = new_guide(AnswerForm.of("boolean", BOOL_Q), tokenizer)
    feed(g, tokenizer, ids_of(tokenizer, "It is heads up. -->"))
    assert g.phase == "answer" and not g.marker_forced
    allowed = {tokenizer.decode([i]) for i in g.allowed()}
    assert {"Y", "N", "y", "n", "T", "F"} <= allowed and "\n" in allowed and "A" not in allowed
    feed(g, tokenizer, ids_of(tokenizer, "\n\nYes"))
    # "Yes" is a whole answer: END is written for the row, then it is done
    end = drain(g)
    assert tokenizer.decode(end) == " END" and g.done


def test_guide_whitespace_after_the_marker_is_bounded(tokenizer):
    g = new_guide(AnswerForm.of("choice", CHOICE_Q), tokenizer)
    feed(g, tokenizer, ids_of(tokenizer, "so -->\n\n\n"))  # three whitespace tokens: the most allowed
    assert {tokenizer.decode([i]) for i in g.allowed()} == {"A", "B", "C"}


def test_guide_no_whitespace_when_only_the_answer_fits(tokenizer):
    g = new_guide(AnswerForm.of("choice", CHOICE_Q), tokenizer)
    feed(g, tokenizer, ids_of(tokenizer, "so -->"))
    end = len(g.tables.end)
    assert "\n" in {tokenizer.decode([i]) for i in g.allowed(room=2 + end)}
    assert {tokenizer.decode([i]) for i in g.allowed(room=1 + end)} == {"A", "B", "C"}  # the letter, then END


def test_guide_ends_the_answer_on_a_token_it_did_not_allow(tokenizer):
    g = new_guide(AnswerForm.of("choice", CHOICE_Q), tokenizer)
    g.start_marker()
    feed(g, tokenizer, g.tables.marker)
    g.advance(ids_of(tokenizer, "Z")[0], None)  # never allowed: the decoder restricts the logits first
    end = drain(g)
    assert tokenizer.decode(end) == " END" and g.done


def test_guide_number_answer(tokenizer):
    g = new_guide(AnswerForm.of("arithmetic", MATH_Q), tokenizer)
    g.start_marker()
    feed(g, tokenizer, g.tables.marker)
    assert g.phase == "answer" and g.marker_forced
    first = {tokenizer.decode([i]) for i in g.allowed()}
    assert first == set("0123456789-")  # a forced marker is followed by the answer at once
    feed(g, tokenizer, ids_of(tokenizer, "-1"))
    assert {tokenizer.decode([i]) for i in g.allowed()} == set("0123456789.,") | {" "}  # " " starts " END"
    feed(g, tokenizer, ids_of(tokenizer, ",0"))
    feed(g, tokenizer, ids_of(tokenizer, " END"))
    assert g.done


def test_guide_number_answer_ends_at_its_limit(tokenizer):
    g = new_guide(AnswerForm.of("arithmetic"), tokenizer)
    g.start_marker()
    feed(g, tokenizer, g.tables.marker + ids_of(tokenizer, "1" * g.answer_limit))
    rest = drain(g)
    assert tokenizer.decode(rest) == " END" and g.done
    assert g.reserve == len(g.tables.marker) + g.answer_limit + len(g.tables.end)


# ------------------------------------------------------------------------------------------------
# the decoder with guided rows


FORMS = [AnswerForm.of("boolean", BOOL_Q), AnswerForm.of("choice", CHOICE_Q), AnswerForm.of("arithmetic", MATH_Q),
         AnswerForm.of("letters", "Take the last letters of 'ant bee'.")]
PROMPTS = [BOOL_Q, CHOICE_Q, MATH_Q, "Take the last letters of 'ant bee'."]
ANSWER_RE = {"boolean": r"(Yes|No|yes|no|True|False)", "choice": r"[ABC]", "arithmetic": r"-?\d[\d.,]*",
             "letters": r"(?s).{0,12}"}  # up to FREE_TOKENS bytes


def test_guided_rows_end_with_an_answer_of_their_form(base_model, tokenizer):
    # The random tiny student never writes the marker: every guided row gets it at its budget.
    cfg = GenerationConfig(max_new_tokens=60, stop_strings=("END",), batch_size=4)
    free = generate_detailed(base_model, tokenizer, PROMPTS, config=cfg)
    res = generate_detailed(base_model, tokenizer, PROMPTS, config=cfg, answers=FORMS)
    for form, text, reason, n, free_text in zip(FORMS, res.texts, res.finish_reasons, res.num_tokens, free.texts):
        assert reason == "forced", (text, reason)
        rationale, _, answer = text.partition(MARKER_TEXT)
        assert re.fullmatch(ANSWER_RE[form.task_type] + " END", answer), repr(answer)
        assert free_text.startswith(rationale)  # the rationale is the free generation's, untouched
        assert n <= 60
        if form.task_type != "letters":
            assert extract_answer(text, form.task_type, question=form.question) is not None


def test_unguided_rows_beside_guided_ones_are_unchanged(base_model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=40, stop_strings=("END",), batch_size=4)
    free = generate_detailed(base_model, tokenizer, PROMPTS, config=cfg)
    mixed = generate_detailed(base_model, tokenizer, PROMPTS, config=cfg, answers=[FORMS[0], None, FORMS[2], None])
    assert mixed.texts[1] == free.texts[1] and mixed.texts[3] == free.texts[3]
    assert mixed.finish_reasons[0] == mixed.finish_reasons[2] == "forced"


def _scripted(monkeypatch, script):
    """Replace the first picks of every row with ``script`` (token ids), then let the model choose."""
    original = decoder_module._pick_tokens
    calls = {"n": 0}

    def pick(logits, samplers):
        out = original(logits, samplers)
        k = calls["n"]
        calls["n"] += 1
        if k < len(script):
            out = torch.full_like(out, script[k])
        return out

    monkeypatch.setattr(decoder_module, "_pick_tokens", pick)


def test_a_marker_the_row_writes_is_followed_by_an_answer_of_its_form(base_model, tokenizer, monkeypatch):
    _scripted(monkeypatch, ids_of(tokenizer, "Heads. -->"))
    cfg = GenerationConfig(max_new_tokens=60, stop_strings=("END",), batch_size=2)
    res = generate_detailed(base_model, tokenizer, PROMPTS[:2], config=cfg, answers=FORMS[:2])
    for form, text, reason in zip(FORMS[:2], res.texts, res.finish_reasons):
        assert reason == "stop", (text, reason)  # the row wrote its marker: an ordinary end at END
        assert text.startswith("Heads. -->")
        answer = text[len("Heads. -->"):]
        assert re.fullmatch(r"\s{0,3}" + ANSWER_RE[form.task_type] + " END", answer), repr(answer)


def test_eos_without_an_answer_writes_the_marker(base_model, tokenizer, monkeypatch):
    eos = tokenizer.eos_token_id
    _scripted(monkeypatch, ids_of(tokenizer, "Hmm") + [eos])
    cfg = GenerationConfig(max_new_tokens=40, stop_strings=("END",), batch_size=2)
    res = generate_detailed(base_model, tokenizer, [BOOL_Q, BOOL_Q], config=cfg, answers=[FORMS[0], None])
    assert res.finish_reasons[1] == "eos" and res.texts[1] == "Hmm"
    assert res.finish_reasons[0] == "forced"
    assert re.fullmatch("Hmm" + re.escape(MARKER_TEXT) + ANSWER_RE["boolean"] + " END", res.texts[0])


def test_eos_after_an_answer_is_kept(base_model, tokenizer, monkeypatch):
    eos = tokenizer.eos_token_id
    _scripted(monkeypatch, ids_of(tokenizer, "So no.") + [eos])
    cfg = GenerationConfig(max_new_tokens=40, stop_strings=("END",), batch_size=1)
    res = generate_detailed(base_model, tokenizer, [BOOL_Q], config=cfg, answers=[FORMS[0]])
    assert res.finish_reasons == ["eos"] and res.texts == ["So no."]


def test_end_without_an_answer_writes_the_marker(base_model, tokenizer, monkeypatch):
    # The byte tokenizer spells END over three tokens; SmolLM2 has " END" and "END" as one token each.
    # Here "E" stands for such a token.
    e = ids_of(tokenizer, "E")[0]
    monkeypatch.setattr(guide_tables(tokenizer), "spell_end", {e})
    _scripted(monkeypatch, ids_of(tokenizer, "Hmm E"))
    cfg = GenerationConfig(max_new_tokens=40, stop_strings=("END",), batch_size=1)
    res = generate_detailed(base_model, tokenizer, [BOOL_Q], config=cfg, answers=[FORMS[0]])
    assert res.finish_reasons == ["forced"]
    assert re.fullmatch("Hmm " + re.escape(MARKER_TEXT) + ANSWER_RE["boolean"] + " END", res.texts[0])


def test_a_row_that_holds_an_answer_ends_as_unguided(base_model, tokenizer, monkeypatch):
    # (a guided row that loops ends there when its text holds an answer: as unguided with stop_on_loop)
    cfg = GenerationConfig(max_new_tokens=30, stop_strings=("END",), batch_size=1, stop_on_loop=True)
    _scripted(monkeypatch, ids_of(tokenizer, "So no."))
    free = generate_detailed(base_model, tokenizer, [BOOL_Q], config=cfg)
    _scripted(monkeypatch, ids_of(tokenizer, "So no."))
    guided = generate_detailed(base_model, tokenizer, [BOOL_Q], config=cfg, answers=[FORMS[0]])
    assert guided.texts == free.texts and guided.finish_reasons == free.finish_reasons
    assert guided.texts[0].startswith("So no.") and MARKER_TEXT not in guided.texts[0]
    # at its budget: an answer in the text ("no"), so no marker is written and it runs to the budget
    script = ids_of(tokenizer, "So no, it is not heads up: Tom flips it twice.")
    _scripted(monkeypatch, script)
    guided = generate_detailed(base_model, tokenizer, [BOOL_Q], config=cfg, answers=[FORMS[0]])
    assert guided.texts == [tokenizer.decode(script[:30])] and guided.finish_reasons == ["length"]
    _scripted(monkeypatch, ids_of(tokenizer, "Tom flips it twice, Ann once; then"))  # no answer in it
    cfg = GenerationConfig(max_new_tokens=60, stop_strings=("END",), batch_size=1, stop_on_loop=True)
    guided = generate_detailed(base_model, tokenizer, [BOOL_Q], config=cfg, answers=[FORMS[0]])
    assert guided.finish_reasons == ["forced"] and MARKER_TEXT in guided.texts[0]


def test_a_loop_writes_the_marker(base_model, tokenizer, monkeypatch):
    _scripted(monkeypatch, ids_of(tokenizer, "ab" * 6))  # "abab..." is a 2-token piece repeated
    cfg = GenerationConfig(max_new_tokens=80, stop_strings=("END",), batch_size=1)
    res = generate_detailed(base_model, tokenizer, [BOOL_Q], config=cfg, answers=[FORMS[0]])
    assert res.finish_reasons == ["forced"]
    assert res.texts[0].startswith("abababab" + MARKER_TEXT)  # the 4th repeat is the loop


def test_answers_must_match_the_prompts(base_model, tokenizer):
    with pytest.raises(GenerationError, match="one form"):
        generate_detailed(base_model, tokenizer, PROMPTS, answers=FORMS[:2])


def test_evaluate_with_guided_answers_counts_forced_answers(base_model, tokenizer):
    tasks = {"coin_flip": [{"input": BOOL_Q, "output": "yes"}] * 3,
             "openbook_qa": [{"input": CHOICE_Q, "output": "B"}] * 2}
    cfg = GenerationConfig(max_new_tokens=40, batch_size=8, guide_answers=True)
    res = evaluate_many(base_model, tokenizer, tasks, config=cfg)
    assert all(r.unextracted == 0 for r in res.values())
    assert res["coin_flip"].forced == 3 and res["openbook_qa"].forced == 2
    assert res["coin_flip"].summary()["forced"] == 3
    table = accuracy_table(res)
    head, _, first = table.splitlines()[:3]
    assert head.endswith("| forced | majority | top answer |") and "| 0 | 3 | 100.0% |" in first
    plain = evaluate_many(base_model, tokenizer, tasks, config=GenerationConfig(max_new_tokens=40, batch_size=8))
    assert all(r.forced == 0 for r in plain.values()) and "forced" not in accuracy_table(plain)
