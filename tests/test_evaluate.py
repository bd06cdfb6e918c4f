"""Evaluation: gold answers, extraction and scoring (exact and substring-compatible), mixed-task
evaluation against one task at a time, the accuracy table, and the `eval` command."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_student, make_random_bank
from modecotd_engine.cli import eval as eval_cli
from modecotd_engine.engine import evaluate as ev
from modecotd_engine.engine.answers import format_output
from modecotd_engine.engine.experts import ExpertBank
from modecotd_engine.engine.generate import GenerationConfig, GenerationError, GenerationResult, generate
from modecotd_engine.engine.inject import inject_experts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    return make_tiny_student(tmp_path_factory.mktemp("eval") / "student", seed=5, initializer_range=0.2)


def random_bank(model, names=("word_math", "last_letters", "coin_flips"), seed=0):
    return make_random_bank(model, names, seed=seed, b_std=0.3)


class Scripted:
    """Stands in for generation: returns fixed texts, so scoring is tested on known generations."""

    def __init__(self, texts):
        self.texts = texts
        self.calls = []

    def __call__(self, model, tokenizer, prompts, *, handle=None, gates=None, config=None, stream=None,
                 progress=False, modes=None, answers=None):
        self.calls.append({"prompts": list(prompts), "gates": gates, "modes": modes, "answers": answers})
        texts = [self.texts[p] for p in prompts]
        n = len(texts)
        return GenerationResult(texts, [len(t) for t in texts], ["stop"] * n, [0.0] * n, 0.0)


def test_gold_answer():
    assert ev.gold_answer(format_output("3 + 4 = 7.", "7")) == "7"
    assert ev.gold_answer("a --> b\n\n-->\n\n(C) END") == "(C)"
    assert ev.gold_answer(" 42 ") == "42"
    assert ev.gold_answer("yes END") == "yes"


def test_scoring_exact_and_substring(monkeypatch):
    records = [
        {"input": "q0", "output": format_output("Tom has 3 + 4 = 7.", "7")},  # training-format record
        {"input": "q1", "output": "12"},
        {"input": "q2", "output": "5"},
        {"input": "q3", "output": "2"},
        {"input": "q4", "output": "1,000"},
    ]
    fake = Scripted({
        "q0": "3 + 4 = 7.\n\n-->\n\n7 END",  # marker: right
        "q1": "So the answer is 12.",  # no marker: last number, right
        "q2": "I do not know",  # nothing to extract
        "q3": "-->\n\n26 END",  # wrong; the original substring scoring counts it right ("2" in "26")
        "q4": "--> 1000 END",  # thousands separators normalised
    })
    monkeypatch.setattr(ev, "generate_detailed", fake)
    r = ev.evaluate_records(None, None, records, task="word_math")
    assert (r.task_type, r.n, r.correct, r.unextracted) == ("arithmetic", 5, 3, 1)
    assert r.accuracy == pytest.approx(0.6)
    assert [p["correct"] for p in r.predictions] == [True, True, False, False, True]
    assert r.predictions[2]["prediction"] is None and r.predictions[3]["prediction"] == "26"
    assert r.predictions[0]["gold"] == "7" and r.predictions[0]["generation"].endswith("7 END")
    compat = ev.evaluate_records(None, None, records, task="word_math", compat_substring=True)
    assert [p["correct"] for p in compat.predictions] == [True, True, False, True, False]
    # task type from the gold answers when the name is unknown, or given explicitly
    choice = [{"input": "q5", "output": "C"}, {"input": "q6", "output": "(A)"}]
    fake.texts.update({"q5": "so (C) is right", "q6": "--> B END"})
    r2 = ev.evaluate_records(None, None, choice, task="my_quiz")
    assert r2.task_type == "choice" and r2.correct == 1
    r3 = ev.evaluate_records(None, None, choice, task="my_quiz", task_type="text")
    assert r3.task_type == "text" and r3.correct == 0


def test_evaluate_many_gives_each_request_its_answer_form(monkeypatch):
    from modecotd_engine.engine.answer_guide import AnswerForm

    fake = Scripted({"a0": "--> 1 END", "b0": "--> yes END", "c0": "--> B END"})
    monkeypatch.setattr(ev, "generate_detailed", fake)
    quiz = "c0"
    tasks = {"word_math": [{"input": "a0", "output": "1"}], "coin_flips": [{"input": "b0", "output": "yes"}],
             "my_quiz": [{"input": quiz, "output": "B"}]}
    ev.evaluate_many(None, None, tasks, config=GenerationConfig(guide_answers=True))
    assert fake.calls[-1]["answers"] == [AnswerForm.of("arithmetic", "a0"), AnswerForm.of("boolean", "b0"),
                                         AnswerForm.of("choice", quiz)]  # my_quiz: choice from its golds
    ev.evaluate_many(None, None, tasks, config=GenerationConfig(temperature=0.7), samples=2)
    assert fake.calls[-1]["answers"] is None  # not guided unless asked
    ev.evaluate_many(None, None, tasks, config=GenerationConfig(temperature=0.7, guide_answers=True), samples=2)
    assert len(fake.calls[-1]["answers"]) == 6 and fake.calls[-1]["answers"][2].task_type == "boolean"


def test_evaluate_many_serves_every_task_in_one_call(monkeypatch, base_model):
    bank = random_bank(copy.deepcopy(base_model))
    handle = inject_experts(copy.deepcopy(base_model), bank)
    fake = Scripted({"a0": "--> 1 END", "a1": "--> 2 END", "b0": "--> yes END", "c0": "--> 3 END"})
    monkeypatch.setattr(ev, "generate_detailed", fake)
    tasks = {"word_math": [{"input": "a0", "output": "1"}, {"input": "a1", "output": "3"}],
             "coin_flips": [{"input": "b0", "output": "yes"}],
             "price_math": [{"input": "c0", "output": "3"}]}
    res = ev.evaluate_many(None, None, tasks, handle=handle,
                           gates={"word_math": bank.weights_vector("word_math"),
                                  "coin_flips": bank.weights_vector({"coin_flips": 0.5, "word_math": 0.5})})
    assert len(fake.calls) == 1  # one shared generation call
    g = fake.calls[0]["gates"]
    assert g.shape == (4, 3)
    torch.testing.assert_close(g, torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0.5, 0, 0.5], [0.0, 0, 0]]))
    assert [r.correct for r in res.values()] == [1, 1, 1] and list(res) == list(tasks)
    assert fake.calls[0]["modes"] is None
    # tasks of both compositions: still one call, each row with its task's mode (the handle's by default)
    ev.evaluate_many(None, None, tasks, handle=handle, gates={"word_math": bank.weights_vector("word_math")},
                     modes={"coin_flips": "weight"})
    assert len(fake.calls) == 2 and fake.calls[1]["modes"] == ["output", "output", "weight", "output"]
    with pytest.raises(GenerationError, match="not evaluated"):
        ev.evaluate_many(None, None, tasks, handle=handle, gates={"word_math": torch.ones(3)}, modes={"nope": "weight"})
    with pytest.raises(GenerationError, match="not evaluated"):
        ev.evaluate_many(None, None, tasks, handle=handle, gates={"nope": torch.zeros(3)})
    with pytest.raises(GenerationError, match="without a MixtureHandle"):
        ev.evaluate_many(None, None, tasks, gates={"word_math": torch.ones(3)})
    with pytest.raises(GenerationError, match="record 0 has no string 'output'"):
        ev.evaluate_many(None, None, {"t": [{"input": "x"}]})


def test_mixed_task_evaluation_matches_one_task_at_a_time(base_model, tokenizer):
    """Real generation: tasks with different gates in shared batches score as when run alone."""
    model = copy.deepcopy(base_model)
    bank = random_bank(model)
    handle = inject_experts(model, bank)
    tasks = {
        "word_math": [{"input": f"Q: {a} plus {b}?\nA:", "output": str(a + b)} for a, b in ((2, 3), (7, 1))],
        "last_letters": [{"input": "Q: last letters of 'ox cat'?\nA:", "output": "xt"}],
        "coin_flips": [{"input": "Q: Is the coin still heads up?\nA:", "output": "yes"}],
    }
    gates = {"word_math": bank.weights_vector("word_math"),
             "last_letters": bank.weights_vector({"last_letters": 0.6, "coin_flips": -0.4}),
             "coin_flips": None}
    cfg = GenerationConfig(max_new_tokens=10, stop_strings=(), batch_size=3)
    together = ev.evaluate_many(model, tokenizer, tasks, handle=handle, gates=gates, config=cfg)
    for task, records in tasks.items():
        alone = ev.evaluate_records(model, tokenizer, records, task=task, handle=handle, gate=gates[task], config=cfg)
        assert [p["generation"] for p in together[task].predictions] == [p["generation"] for p in alone.predictions]
        direct = generate(model, tokenizer, [r["input"] for r in records], handle=handle,
                          gates=None if gates[task] is None else gates[task].expand(len(records), -1), config=cfg)
        assert [p["generation"] for p in alone.predictions] == direct
        assert (together[task].correct, together[task].unextracted) == (alone.correct, alone.unextracted)


def _result(task, ttype, n, correct, unextracted):
    return ev.TaskResult(task, ttype, n, correct, unextracted, [])


def test_accuracy_table():
    results = {"word_math": _result("word_math", "arithmetic", 10, 7, 1),
               "coin_flips": _result("coin_flips", "boolean", 4, 2, 0),
               "price_math": _result("price_math", "arithmetic", 5, 1, 3)}
    table = ev.accuracy_table(results, seen={"word_math", "coin_flips"})
    lines = table.strip().splitlines()
    assert lines[0] == "| task | type | seen | n | correct | accuracy | unextracted |"
    assert "| word_math | arithmetic | yes | 10 | 7 | 70.0% | 1 |" in lines
    assert "| price_math | arithmetic | no | 5 | 1 | 20.0% | 3 |" in lines
    # macro averages: seen (70% + 50%) / 2, unseen 20%, all (70 + 50 + 20) / 3
    assert "| **average seen** (2 tasks) | | | 14 | 9 | **60.0%** | 1 |" in lines
    assert "| **average unseen** (1 tasks) | | | 5 | 1 | **20.0%** | 3 |" in lines
    assert "| **average all** (3 tasks) | | | 19 | 10 | **46.7%** | 4 |" in lines
    plain = ev.accuracy_table(results)
    assert "seen" not in plain and "| **average all** (3 tasks) | | 19 | 10 | **46.7%** | 4 |" in plain
    assert ev.averages(results, seen=set()) == {"all": pytest.approx(140 / 300), "seen": None,
                                                 "unseen": pytest.approx(140 / 300)}


def _prediction(gold, prediction):
    return {"gold": gold, "prediction": prediction, "correct": prediction is not None and prediction.lower() == gold.lower()}


def test_majority_and_top_answer_show_a_constant_answer():
    # a yes/no task of 6 "No" and 4 "Yes" records answered "no" everywhere but once (and once not at all)
    golds = ["No"] * 6 + ["Yes"] * 4
    preds = ["no"] * 8 + ["Yes", None]
    rows = [_prediction(g, p) for g, p in zip(golds, preds)]
    r = ev.TaskResult("strategy", "boolean", 10, sum(x["correct"] for x in rows), 1, rows)
    assert r.accuracy == pytest.approx(0.7) and r.majority == pytest.approx(0.6)
    assert r.top_answer == ("no", pytest.approx(0.8))  # normalized: "no" and "No" are one answer
    choice = ev.TaskResult("quiz", "choice", 4, 1, 0, [_prediction(g, p) for g, p in
                                                        zip(["A", "B", "B", "C"], ["(C)", "C", "A", None])])
    assert choice.majority == pytest.approx(0.5) and choice.top_answer == ("C", pytest.approx(0.5))
    assert ev.TaskResult("none", "choice", 2, 0, 2, [_prediction("A", None)] * 2).top_answer is None
    s = r.summary()
    assert (s["majority"], s["top_answer"], s["top_answer_share"]) == (pytest.approx(0.6), "no", pytest.approx(0.8))
    lines = ev.accuracy_table({"strategy": r, "quiz": choice}).splitlines()
    assert lines[0].endswith("| unextracted | majority | top answer |")
    assert "| strategy | boolean | 10 | 7 | 70.0% | 1 | 60.0% | no (80%) |" in lines
    assert "| quiz | choice | 4 | 1 | 25.0% | 0 | 50.0% | C (50%) |" in lines
    assert lines[-1] == "| **average all** (2 tasks) | | 14 | 8 | **47.5%** | 1 | 55.0% | |"


# ------------------------------------------------------------------------------ the command


def _parse(argv):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers())
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, student_dir, base_model):
    root = tmp_path_factory.mktemp("evalcli")
    bank = random_bank(copy.deepcopy(base_model))
    bank.save(root / "bank")
    data = root / "data"
    data.mkdir()
    rows = {"word_math": [{"input": f"Q: {a}+{b}?\nA:", "output": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 5))],
            "price_math": [{"input": "Q: 9-2?\nA:", "output": "7"}]}
    for t, recs in rows.items():
        (data / f"{t}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    mixtures = root / "mixtures"
    mixtures.mkdir()
    from modecotd_engine.engine.mixture import Mixture, bank_record, save_mixture

    for t, w in (("word_math", {"word_math": 1.0}), ("price_math", {"word_math": 0.8, "coin_flips": -0.5})):
        save_mixture(Mixture(experts=list(bank.names), weights=w, mode="weight", method="search", seed=0, target=t,
                             bank=bank_record(bank, root / "bank"), shots_loss_before=None, shots_loss_after=None,
                             evaluations=None), mixtures / f"{t}.json")
    return root, student_dir


def test_eval_command_guides_answers(eval_setup):
    root, student = eval_setup
    out = root / "out_guided"
    args = _parse(["eval", "--student", str(student), "--data", str(root / "data"), "--max-new-tokens", "24",
                   "--out", str(out), "--dtype", "float32", "--no-progress", "--guide-answers"])
    assert args.func(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["generation"]["guide_answers"] is True
    # the tiny random student writes no marker: every answer is a number forced at the budget
    assert {t: (r["unextracted"], r["forced"]) for t, r in summary["tasks"].items()} == {
        "price_math": (0, 1), "word_math": (0, 3)}
    assert "| forced |" in (out / "results.md").read_text()


def test_eval_command_writes_results(eval_setup, capsys):
    root, student = eval_setup
    out = root / "out_mix"
    args = _parse(["eval", "--student", str(student), "--bank", str(root / "bank"), "--data", str(root / "data"),
                   "--mixtures", str(root / "mixtures"), "--max-new-tokens", "6", "--out", str(out),
                   "--dtype", "float32", "--no-progress"])
    assert args.func(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"price_math", "word_math"}
    assert summary["tasks"]["word_math"]["n"] == 3 and summary["tasks"]["word_math"]["seen"] is True
    assert summary["tasks"]["price_math"]["seen"] is False and summary["tasks"]["price_math"]["mode"] == "weight"
    preds = [json.loads(x) for x in (out / "predictions" / "word_math.jsonl").read_text().splitlines()]
    assert [p["gold"] for p in preds] == ["3", "7", "10"]
    assert all(set(p) >= {"input", "prediction", "generation", "correct"} for p in preds)
    md = (out / "results.md").read_text()
    assert "| word_math | arithmetic | yes | 3 |" in md and "average unseen" in md
    assert "| word_math |" in capsys.readouterr().out
    # the stored generations are what the mixture produces for those prompts
    model = copy.deepcopy(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval())
    bank = ExpertBank.load(root / "bank")
    handle = inject_experts(model, bank, mode="weight")
    tok = AutoTokenizer.from_pretrained(student)
    g = bank.weights_vector({"word_math": 1.0}).expand(3, -1)
    direct = generate(model, tok, [p["input"] for p in preds], handle=handle, gates=g,
                      config=GenerationConfig(max_new_tokens=6, stop_after_answer=True, stop_on_loop=True))
    assert [p["generation"] for p in preds] == direct  # the CLI's defaults: answer and loop stops on


def test_eval_command_errors(eval_setup):
    root, student = eval_setup
    base = ["eval", "--student", str(student), "--data", str(root / "data"), "--out", str(root / "o")]
    with pytest.raises(GenerationError, match="need --bank"):
        args = _parse(base + ["--per-task"])
        args.func(args)
    with pytest.raises(GenerationError, match=r"price_math have no expert of their own .*experts: word_math"):
        args = _parse(base + ["--bank", str(root / "bank"), "--per-task"])
        args.func(args)
    with pytest.raises(ValueError, match="unknown expert 'gsm8k'; known experts: word_math, last_letters"):
        args = _parse(base + ["--bank", str(root / "bank"), "--experts", "gsm8k"])
        args.func(args)
    with pytest.raises(ValueError, match="tasks not found: svamp"):
        args = _parse(base + ["--tasks", "svamp"])
        args.func(args)


def test_eval_help_documents_compat_substring(capsys):
    with pytest.raises(SystemExit):
        _parse(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "'26' counts as correct for gold '2'" in text


def test_majority_vote():
    from modecotd_engine.engine.evaluate import majority_vote

    assert majority_vote(["3", "3.0", "4", None], "arithmetic") == ("3", {"3": 2, "4": 1})
    assert majority_vote(["(b)", "A", "B"], "choice")[0] == "(b)"
    assert majority_vote([None, None], "boolean") == (None, {})
    assert majority_vote(["no", "yes"], "boolean")[0] == "no"  # a tie: the first answer


def test_eval_samples_vote(eval_setup):
    """K sampled generations per record: the scored prediction is their majority answer, and each
    record keeps its samples' answers."""
    root, student = eval_setup
    out = root / "out_vote"
    args = _parse(["eval", "--student", str(student), "--bank", str(root / "bank"), "--data", str(root / "data"),
                   "--per-task", "--tasks", "word_math", "--max-new-tokens", "6", "--samples", "3",
                   "--temperature", "1.0", "--dtype", "float32", "--out", str(out), "--no-progress"])
    assert args.func(args) == 0
    preds = [json.loads(x) for x in (out / "predictions" / "word_math.jsonl").read_text().splitlines()]
    from modecotd_engine.engine.evaluate import majority_vote

    for p in preds:
        assert len(p["sample_answers"]) == 3
        assert p["prediction"] == majority_vote(p["sample_answers"], "arithmetic")[0]
    assert json.loads((out / "summary.json").read_text())["generation"]["samples"] == 3
    with pytest.raises(GenerationError, match="--temperature > 0"):
        bad = _parse(["eval", "--student", str(student), "--data", str(root / "data"), "--samples", "3",
                      "--out", str(root / "o")])
        bad.func(bad)


@pytest.mark.parametrize("how", ["experts", "mixture"])
def test_eval_command_same_selection_for_every_task(eval_setup, how):
    """--experts SPEC and --mixture FILE serve every task with that gate; --limit cuts each task."""
    root, student = eval_setup
    out = root / f"out_{how}"
    sel = (["--experts", "word_math=0.8,coin_flips=-0.5", "--mode", "weight"] if how == "experts"
           else ["--mixture", str(root / "mixtures" / "price_math.json")])
    args = _parse(["eval", "--student", str(student), "--bank", str(root / "bank"), "--data", str(root / "data"),
                   *sel, "--limit", "2", "--max-new-tokens", "6", "--dtype", "float32", "--out", str(out),
                   "--no-progress"])
    assert args.func(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {t: r["n"] for t, r in summary["tasks"].items()} == {"price_math": 1, "word_math": 2}
    assert {r["mode"] for r in summary["tasks"].values()} == {"weight"}
    # the same predictions as the gate given by hand: a mixture file and its inline spec agree
    other = root / ("out_mixture" if how == "experts" else "out_experts")
    if other.exists():
        for t in ("word_math", "price_math"):
            assert (out / "predictions" / f"{t}.jsonl").read_text() == (other / "predictions" / f"{t}.jsonl").read_text()


def test_eval_command_compat_substring_scores_leniently(eval_setup, monkeypatch):
    """The original evaluator's rule through the command: gold '7' counts inside '17'."""
    root, student = eval_setup
    from modecotd_engine.engine import evaluate as ev
    from modecotd_engine.engine.generate import GenerationResult

    def fake_generate(model, tokenizer, prompts, **kw):
        return GenerationResult(["-->\n\n17 END"] * len(prompts), [3] * len(prompts), ["stop"] * len(prompts),
                                [0.0] * len(prompts), 0.0)

    monkeypatch.setattr(ev, "generate_detailed", fake_generate)
    results = {}
    for flag in ([], ["--compat-substring"]):
        out = root / f"out_compat{len(flag)}"
        args = _parse(["eval", "--student", str(student), "--data", str(root / "data"), "--tasks", "price_math",
                       "--out", str(out), "--no-progress", *flag])
        assert args.func(args) == 0
        results[bool(flag)] = json.loads((out / "summary.json").read_text())
    assert results[False]["tasks"]["price_math"]["correct"] == 0 and results[False]["scoring"] == "exact"
    assert results[True]["tasks"]["price_math"]["correct"] == 1


def test_eval_loop_bench_smoke(eval_setup, tmp_path):
    """`bench eval` on the tiny student: both loops run the same function and, greedy in float32,
    write the same predictions."""
    from modecotd_engine.bench.evalloop import run_eval_bench

    root, student = eval_setup
    rep = run_eval_bench(tmp_path / "b", bank=str(root / "bank"), data=str(root / "data"), limit=3,
                         max_new_tokens=8, batch_size=2, student=str(student), dtype="float32")
    assert rep["same_predictions"] is True and rep["records"] == 4
    assert set(rep["runs"]) == {"fixed batches (drain)", "continuous batching"}
    assert "speed-up" in (tmp_path / "b" / "eval-loop.md").read_text()


def test_choice_answer_given_as_option_text_is_scored_by_its_letter():
    from modecotd_engine.engine.evaluate import score_generations

    q = "Meadow voles consume Answer choices: (A) producers, (B) apex predators, (C) decomposers."
    records = [{"input": q, "output": "A"}, {"input": q, "output": "C"}]
    res = score_generations("openbook_qa", "choice", records, ["A", "C"], ["They consume producers.", "Mice."],
                            [4, 2], ["eos", "eos"])
    assert [p["prediction"] for p in res.predictions] == ["A", None]
    assert res.correct == 1 and res.unextracted == 1
