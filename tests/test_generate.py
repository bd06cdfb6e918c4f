"""Batched generation with per-request experts: KV cache against full re-forward, mixed batches
against one request at a time, left padding, stop strings, EOS, sampling, streaming, expert specs."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_tiny_student, make_random_bank
from modecotd_engine.engine.experts import ExpertBank, ExpertBankError
from modecotd_engine.engine.generate import (
    GenerationConfig,
    GenerationError,
    PromptError,
    answer_complete,
    is_looping,
    generate,
    generate_detailed,
    parse_expert_spec,
)
from modecotd_engine.engine import decoder as decoder_module
from modecotd_engine.engine.inject import inject_experts

PROMPTS = [
    "Q: Tom has 3 apples and gets 4 more. How many?\nA:",
    "Hi",
    "Take the last letters of 'ant bee cow'.",
    "Is the coin still heads up?",
]
NO_STOP = GenerationConfig(max_new_tokens=12, stop_strings=())

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    # The conftest student with a wider init: its greedy continuations vary from token to token
    # (the default init mostly repeats the last byte), so padding, cache or gate mistakes show.
    return make_tiny_student(tmp_path_factory.mktemp("gen") / "student", seed=3, initializer_range=0.2)


def random_bank(model, names=("add", "letters", "coins"), seed=0):
    return make_random_bank(model, names, seed=seed, b_std=0.3)


@pytest.fixture()
def injected(base_model):
    model = copy.deepcopy(base_model)
    bank = random_bank(model)
    return model, inject_experts(model, bank)


def greedy_no_cache(model, tokenizer, prompt, n_tokens, handle=None, gate=None):
    """Oracle: re-run the whole sequence every step, no cache, no padding, one request."""
    ids = tokenizer(prompt)["input_ids"]
    out = []
    ctx = handle.gated(gate[None]) if handle is not None and gate is not None else _null()
    with torch.no_grad(), ctx:
        for _ in range(n_tokens):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


GATES = torch.tensor([
    [1.0, 0.0, 0.0],  # one expert
    [0.0, 0.5, 0.5],  # an equal mixture
    [0.7, -0.4, 1.2],  # a searched-style mixture with a negative weight
    [0.0, 0.0, 0.0],  # no experts: the frozen student
])


# ------------------------------------------------------------------------------------ KV cache


def test_cache_matches_full_reforward_frozen(base_model, tokenizer):
    res = generate_detailed(base_model, tokenizer, PROMPTS, config=NO_STOP)
    for i, prompt in enumerate(PROMPTS):
        want = greedy_no_cache(base_model, tokenizer, prompt, 12)
        assert res.token_ids[i] == want and res.num_tokens[i] == 12
        assert res.texts[i] == tokenizer.decode(want, skip_special_tokens=True), f"prompt {i}"


def test_cache_matches_full_reforward_with_experts(injected, tokenizer):
    model, handle = injected
    res = generate_detailed(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=NO_STOP)
    frozen = generate(model, tokenizer, PROMPTS, config=NO_STOP)
    for i, prompt in enumerate(PROMPTS):
        want = greedy_no_cache(model, tokenizer, prompt, 12, handle=handle, gate=GATES[i])
        assert res.token_ids[i] == want
        assert res.texts[i] == tokenizer.decode(want, skip_special_tokens=True), f"prompt {i}"
    # the experts really act (else the comparison above says nothing about them) ...
    assert all(res.texts[i] != frozen[i] for i in range(3))
    # ... and a zero gate row is the frozen student
    assert res.texts[3] == frozen[3]
    assert handle.state.gates is None  # generation leaves the handle as it found it


# ------------------------------------------------------------------------------ mixed batches


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_mixed_batch_equals_one_at_a_time(injected, tokenizer, mode):
    model, handle = injected
    handle.set_mode(mode)
    alone = [generate(model, tokenizer, [p], handle=handle, gates=GATES[i : i + 1], config=NO_STOP)[0]
             for i, p in enumerate(PROMPTS)]
    together = generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=NO_STOP)
    assert together == alone
    assert len(set(alone)) == len(alone)
    # batches cut across the requests (3 + 1, sorted by length) give the same texts
    split = generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES,
                     config=GenerationConfig(max_new_tokens=12, stop_strings=(), batch_size=3))
    assert split == alone


def test_rows_of_both_modes_decode_together_and_compute_what_they_compute_alone(injected, tokenizer):
    """Per-row composition: requests in weight and output mode in one call get the texts each mode
    gives them in a call of its own, in the batches of a single call."""
    model, handle = injected
    modes = ["weight", "output", "weight", "output"]
    alone = {}
    for m in ("output", "weight"):
        handle.set_mode(m)
        alone[m] = generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=NO_STOP)
    assert alone["output"][2] != alone["weight"][2]  # row 2's mixture composes differently by mode
    handle.set_mode("output")
    res = generate_detailed(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=NO_STOP, modes=modes)
    assert res.texts == [alone[m][i] for i, m in enumerate(modes)]
    assert res.forward_calls <= generate_detailed(model, tokenizer, PROMPTS, handle=handle, gates=GATES,
                                                  config=NO_STOP).forward_calls  # one batch, not one per mode
    assert handle.state.mode == "output" and handle.state.row_modes is None  # the handle as it was
    with pytest.raises(GenerationError, match="one mode per prompt"):
        generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=NO_STOP, modes=modes[:2])
    with pytest.raises(GenerationError, match="unknown composition"):
        generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=NO_STOP, modes=["sum"] * 4)


def test_left_padding_does_not_change_results(injected, base_model, tokenizer, monkeypatch):
    short = "Hi"
    alone = generate(base_model, tokenizer, [short], config=NO_STOP)[0]
    long_prompt = "A much longer prompt that forces many pad tokens in front of the short one. " * 3
    # prompts of similar length share a prefill run: a few pad tokens in front of the shorter
    near = [long_prompt, long_prompt[:-3], long_prompt[:-9]]
    near_alone = [generate(base_model, tokenizer, [p], config=NO_STOP)[0] for p in near]
    assert generate(base_model, tokenizer, near, config=NO_STOP) == near_alone
    # one prefill run for everything (no length runs): 230 pad tokens in front of "Hi"
    monkeypatch.setattr(decoder_module, "PREFILL_SPLIT_RATIO", 0.0)
    batch = generate(base_model, tokenizer, [long_prompt, short, long_prompt[:20]], config=NO_STOP)
    assert batch[1] == alone
    model, handle = injected
    runs = generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=NO_STOP)
    monkeypatch.undo()
    assert generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=NO_STOP) == runs
    # the logits of the padded row equal the unpadded ones (not just their argmax)
    ids_s = tokenizer([short])["input_ids"][0]
    ids_l = tokenizer([long_prompt])["input_ids"][0]
    pad = len(ids_l) - len(ids_s)
    x = torch.tensor([ids_l, [0] * pad + ids_s])
    mask = torch.tensor([[1] * len(ids_l), [0] * pad + [1] * len(ids_s)])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = base_model(input_ids=x, attention_mask=mask, position_ids=pos).logits[1, -1]
        ref = base_model(input_ids=torch.tensor([ids_s])).logits[0, -1]
    torch.testing.assert_close(padded, ref, atol=1e-5, rtol=1e-5)


def test_finished_rows_leave_the_batch(injected, tokenizer):
    """EOS in one request mid-way drops its row (cache, gates); the others are unaffected."""
    model, handle = injected
    first = generate_detailed(model, tokenizer, [PROMPTS[0]], handle=handle, gates=GATES[:1], config=NO_STOP)
    tokens = first.token_ids[0]
    k = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    model.generation_config.eos_token_id = tokens[k]
    try:
        alone = [generate_detailed(model, tokenizer, [p], handle=handle, gates=GATES[i : i + 1], config=NO_STOP)
                 for i, p in enumerate(PROMPTS)]
        together = generate_detailed(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=NO_STOP)
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert together.texts == [a.texts[0] for a in alone]
    assert together.finish_reasons[0] == "eos" and together.num_tokens[0] == k
    assert together.texts[0] == tokenizer.decode(tokens[:k])
    assert together.num_tokens == [a.num_tokens[0] for a in alone]
    assert max(together.num_tokens) == 12  # someone kept going after request 0 stopped


def test_prefill_runs():
    from modecotd_engine.engine.decoder import _prefill_chunks

    assert _prefill_chunks([62, 60, 53, 40, 39, 10], ratio=0.85) == [(0, 3), (3, 5), (5, 6)]
    assert _prefill_chunks([5], ratio=0.85) == [(0, 1)]
    assert _prefill_chunks([9, 3, 1], ratio=0.0) == [(0, 3)]


# ------------------------------------------------------------------------------ stop strings


def test_stop_strings(base_model, tokenizer):
    full = generate(base_model, tokenizer, PROMPTS, config=GenerationConfig(max_new_tokens=20, stop_strings=()))
    # a stop string taken from inside request 0's text (two printable ASCII characters)
    text0 = full[0]
    at = next(i for i in range(3, len(text0) - 2) if text0[i : i + 2].isascii() and text0[i : i + 2].isprintable())
    stop = text0[at : at + 2]
    cfg = GenerationConfig(max_new_tokens=20, stop_strings=("\x00never", stop))
    res = generate_detailed(base_model, tokenizer, PROMPTS, config=cfg)
    assert res.texts[0] == text0[: text0.find(stop) + len(stop)]
    assert res.finish_reasons[0] == "stop" and res.num_tokens[0] < 20
    for i in range(1, len(PROMPTS)):
        cut = full[i].find(stop)
        if cut >= 0:
            assert res.texts[i] == full[i][: cut + len(stop)] and res.finish_reasons[i] == "stop"
        else:
            assert res.texts[i] == full[i] and res.finish_reasons[i] == "length"


def test_stream_pieces_join_to_the_text(injected, tokenizer):
    model, handle = injected
    full = generate(model, tokenizer, [PROMPTS[2]], handle=handle, gates=GATES[1:2], config=NO_STOP)[0]
    stop = next(full[i : i + 2] for i in range(2, len(full) - 2) if full[i : i + 2].isascii())
    pieces: list[str] = []
    cfg = GenerationConfig(max_new_tokens=12, stop_strings=(stop,))
    text = generate(model, tokenizer, [PROMPTS[2]], handle=handle, gates=GATES[1:2], config=cfg,
                    stream=pieces.append)[0]
    assert text.endswith(stop) and full.startswith(text)
    assert "".join(pieces) == text and len(pieces) > 1


# ---------------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible(injected, tokenizer):
    model, handle = injected
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7, stop_strings=())
    a = generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=cfg)
    b = generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=cfg)
    assert a == b
    other = generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES,
                     config=GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=8,
                                             stop_strings=()))
    assert other != a
    greedy10 = generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES,
                        config=GenerationConfig(max_new_tokens=10, stop_strings=()))
    assert a != greedy10
    greedy = generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=NO_STOP)
    # a nucleus too small to hold more than the top token is greedy decoding
    tiny_p = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3, stop_strings=())
    assert generate(model, tokenizer, PROMPTS, handle=handle, gates=GATES, config=tiny_p) == greedy


# ------------------------------------------------------------------------------- bad requests


def test_bad_requests(base_model, tokenizer, injected):
    with pytest.raises(PromptError, match="prompt 1 is empty") as err:
        generate(base_model, tokenizer, ["ok", "   "])
    assert err.value.index == 1
    ctx = base_model.config.max_position_embeddings
    with pytest.raises(PromptError, match=f"model context is {ctx} tokens"):
        generate(base_model, tokenizer, ["x" * (ctx + 5)])
    with pytest.raises(GenerationError, match="not one string"):
        generate(base_model, tokenizer, "a prompt")
    with pytest.raises(GenerationError, match="without a MixtureHandle"):
        generate(base_model, tokenizer, ["a"], gates=torch.ones(1, 3))
    model, handle = injected
    with pytest.raises(GenerationError, match=r"\(num_prompts=2, E=3\)"):
        generate(model, tokenizer, ["a", "b"], handle=handle, gates=torch.ones(2, 2))
    with pytest.raises(GenerationError, match="single prompt"):
        generate(base_model, tokenizer, ["a", "b"], stream=print)
    with pytest.raises(GenerationError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    assert generate(base_model, tokenizer, []) == []


def test_budget_capped_by_context(tmp_path, tokenizer):
    d = make_tiny_student(tmp_path / "short", seed=1, initializer_range=0.2, max_position_embeddings=16)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    res = generate_detailed(model, tokenizer, ["0123456789"], config=GenerationConfig(max_new_tokens=50,
                                                                                      stop_strings=()))
    assert res.num_tokens == [6] and res.finish_reasons == ["length"]


# ------------------------------------------------------------------------------- expert specs


def test_parse_expert_spec(base_model):
    bank = random_bank(copy.deepcopy(base_model))
    torch.testing.assert_close(parse_expert_spec("letters", bank), torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(parse_expert_spec("add, coins", bank), torch.tensor([0.5, 0.0, 0.5]))
    torch.testing.assert_close(parse_expert_spec("add=0.7,coins=-0.3", bank), torch.tensor([0.7, 0.0, -0.3]))
    with pytest.raises(ExpertBankError, match="unknown expert 'gsm8k'; known experts: add, letters, coins"):
        parse_expert_spec("add,gsm8k", bank)
    with pytest.raises(GenerationError, match=r"piece 'coins=0\.3x': weight '0\.3x' is not a number"):
        parse_expert_spec("add=0.7,coins=0.3x", bank)
    with pytest.raises(GenerationError, match="to every expert"):
        parse_expert_spec("add=0.7,coins", bank)
    with pytest.raises(GenerationError, match="twice"):
        parse_expert_spec("add,add", bank)
    with pytest.raises(GenerationError, match="empty piece"):
        parse_expert_spec("add,,coins", bank)
    with pytest.raises(GenerationError, match="empty expert spec"):
        parse_expert_spec(" ", bank)


# ------------------------------------------------------------------------------ the command


def _parse(argv):
    import argparse

    from modecotd_engine.cli import infer as infer_cli

    parser = argparse.ArgumentParser()
    infer_cli.register(parser.add_subparsers())
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, student_dir, base_model):
    from modecotd_engine.engine.mixture import Mixture, bank_record, save_mixture

    root = tmp_path_factory.mktemp("infercli")
    bank = random_bank(copy.deepcopy(base_model))
    bank.save(root / "bank")
    save_mixture(Mixture(experts=list(bank.names), weights={"add": 0.7, "coins": -0.4}, mode="weight",
                         method="search", seed=0, target="t", bank=bank_record(bank, root / "bank"),
                         shots_loss_before=None, shots_loss_after=None, evaluations=None), root / "mix.json")
    return root, student_dir


def _run(argv):
    args = _parse(argv)
    return args.func(args)


def test_infer_command_mixed_requests(cli_setup, base_model, tokenizer):
    root, student = cli_setup
    requests = [
        {"id": "a", "prompt": PROMPTS[0], "experts": "add"},
        {"id": "b", "input": PROMPTS[1], "experts": "letters=0.5,coins=0.5"},
        {"id": "c", "prompt": PROMPTS[2], "mixture": "mix.json"},  # relative to the request file
        {"id": "d", "prompt": PROMPTS[3], "experts": None},  # the frozen student
        {"id": "e", "prompt": PROMPTS[0]},  # the command's default: --experts coins
    ]
    (root / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests) + "\n")
    out = root / "answers.jsonl"
    assert _run(["infer", "--student", str(student), "--dtype", "float32", "--bank", str(root / "bank"), "--experts", "coins",
                 "--input", str(root / "req.jsonl"), "--out", str(out), "--max-new-tokens", "8", "--no-stop"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["id"] for g in got] == list("abcde") and all(g["num_tokens"] == 8 for g in got)

    model = copy.deepcopy(base_model)
    bank = ExpertBank.load(root / "bank")
    handle = inject_experts(model, bank)
    cfg = GenerationConfig(max_new_tokens=8, stop_strings=())
    out_rows = torch.stack([bank.weights_vector("add"), bank.weights_vector({"letters": 0.5, "coins": 0.5}),
                            torch.zeros(3), bank.weights_vector("coins")])
    want = generate(model, tokenizer, [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[0]], handle=handle,
                    gates=out_rows, config=cfg)
    handle.set_mode("weight")  # the mixture file's composition
    want_c = generate(model, tokenizer, [PROMPTS[2]], handle=handle,
                      gates=bank.weights_vector({"add": 0.7, "coins": -0.4})[None], config=cfg)[0]
    assert [g["output"] for g in got] == [want[0], want[1], want_c, want[2], want[3]]


def test_infer_command_single_prompt_streams(cli_setup, base_model, tokenizer, capsys, monkeypatch):
    import io

    root, student = cli_setup
    want = generate(base_model, tokenizer, [PROMPTS[1]], config=GenerationConfig(max_new_tokens=6))[0]
    assert _run(["infer", "--student", str(student), "--dtype", "float32", "--prompt", PROMPTS[1], "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == want + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[1] + "\n"))  # one trailing newline is dropped
    assert _run(["infer", "--student", str(student), "--dtype", "float32", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out == want + "\n" and "tokens/s" in captured.err


def test_infer_command_guides_answers(cli_setup, capsys):
    root, student = cli_setup
    prompt = "Is the coin still heads up?"
    assert _run(["infer", "--student", str(student), "--dtype", "float32", "--prompt", prompt,
                 "--max-new-tokens", "30", "--answer-type", "boolean"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"\n\n-->\n\n(Yes|No|yes|no|True|False) END\n$", captured.out), captured.out
    assert "finished by forced" in captured.err


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi", "experts": "add,gsm8k"}', r"line 2: unknown expert 'gsm8k'; known experts: add, letters, coins"),
    ('{"prompt": "hi", "experts": "add=1/3"}', r"line 2: expert spec piece 'add=1/3': weight '1/3' is not a number"),
    ('{"prompt": "   "}', r"line 2: empty prompt"),
    ('{"prompt": "hi", "experts": "add"', r"line 2: not JSON"),
    ('{"prompt": "' + "x" * 1100 + '"}', r"line 2: prompt has 1100 tokens; the model context is 1024 tokens"),
    ('{"prompt": "hi", "mixture": "nowhere.json"}', r"line 2: mixture file not found"),
])
def test_infer_command_bad_requests(cli_setup, line, message):
    root, student = cli_setup
    path = root / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        _run(["infer", "--student", str(student), "--dtype", "float32", "--bank", str(root / "bank"), "--input", str(path)])


def test_infer_command_needs_a_bank_for_experts(cli_setup):
    root, student = cli_setup
    with pytest.raises(GenerationError, match="need --bank"):
        _run(["infer", "--student", str(student), "--dtype", "float32", "--experts", "add", "--prompt", "hi"])
    with pytest.raises(GenerationError, match="empty prompt"):
        _run(["infer", "--student", str(student), "--dtype", "float32", "--prompt", ""])


def test_infer_command_router_mixture(cli_setup, base_model, tokenizer):
    """A router mixture is served in its own group with the routers attached, beside gated requests."""
    from modecotd_engine.engine.mixture import Mixture, bank_record, save_mixture

    root, student = cli_setup
    bank = ExpertBank.load(root / "bank")
    gen = torch.Generator().manual_seed(11)
    state = {m: torch.randn(bank.num_experts, k, generator=gen) for m, (k, _n) in bank.modules.items()}
    save_mixture(Mixture(experts=list(bank.names), weights={n: 1 / 3 for n in bank.names}, mode="output",
                         method="router", seed=0, target="t", bank=bank_record(bank, root / "bank"),
                         shots_loss_before=None, shots_loss_after=None, evaluations=None, top_k=2,
                         router_state=state), root / "routed.json")
    requests = [{"prompt": PROMPTS[0], "mixture": str(root / "routed.json")}, {"prompt": PROMPTS[1], "experts": "add"}]
    (root / "req_router.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    out = root / "answers_router.jsonl"
    assert _run(["infer", "--student", str(student), "--dtype", "float32", "--bank", str(root / "bank"), "--input",
                 str(root / "req_router.jsonl"), "--out", str(out), "--max-new-tokens", "8", "--no-stop"]) == 0
    got = [json.loads(x)["output"] for x in out.read_text().splitlines()]

    model = copy.deepcopy(base_model)
    handle = inject_experts(model, bank)
    cfg = GenerationConfig(max_new_tokens=8, stop_strings=())
    plain = generate(model, tokenizer, [PROMPTS[1]], handle=handle, gates=bank.weights_vector("add")[None],
                     config=cfg)[0]
    handle.attach_router(state, top_k=2)
    routed = generate(model, tokenizer, [PROMPTS[0]], handle=handle, config=cfg)[0]
    handle.detach_router()
    assert got == [routed, plain]
    assert routed != generate(model, tokenizer, [PROMPTS[0]], config=cfg)[0]  # the routers act


def test_infer_bench_smoke(tmp_path, student_dir):
    """The benchmark runs end to end on the tiny student; our mixed batch and PEFT agree on every text."""
    from modecotd_engine.bench.infer import run_infer_bench

    res = run_infer_bench(tmp_path / "bench", student=str(student_dir), quick=True, threads=1, dtype="float32")
    assert set(res["providers"]) >= {"base student (floor)", "ours: mixed batch", "PEFT: mixed-adapter batch",
                                     "PEFT: merged, task by task"}
    ours = res["providers"]["ours: mixed batch"]
    assert ours["tokens"] == 64 * res["workload"]["new_tokens_per_request"] and ours["tokens_per_s"] > 0
    assert res["greedy_text_agreement"] == {"ours vs PEFT mixed-adapter batch": 1.0, "ours vs PEFT merged": 1.0,
                                            "our floor vs transformers generate": 1.0}
    saved = json.loads((tmp_path / "bench" / "infer.json").read_text())
    assert saved["device"] and saved["versions"]["torch"] and saved["date"]
    assert "| ours: mixed batch |" in (tmp_path / "bench" / "infer.md").read_text()


# ------------------------------------------------------------------------------------ loop guards


def test_is_looping_finds_short_cycles_only():
    assert is_looping([5, 5, 5, 5])
    assert is_looping([1, 2, 3, 7, 8, 7, 8, 7, 8, 7, 8])
    assert not is_looping([7, 8, 7, 8, 7, 8])  # three repeats, not four
    assert not is_looping([1, 2, 3, 4, 5, 6, 7, 8])
    assert not is_looping(list(range(17)) * 4)  # period 17 > LOOP_MAX_PERIOD
    assert is_looping(list(range(16)) * 4)


def test_answer_complete():
    assert answer_complete("so 3 + 4 = 7.\n\n-->\n\n7\n")
    assert not answer_complete("so 3 + 4 = 7.\n\n-->\n\n7")  # the line may still grow
    assert not answer_complete("-->\n\n-->\n\n")  # markers only, no answer
    assert not answer_complete("no marker at all\n")
    assert answer_complete("-->\n\n-->\n\nyes\nmore")  # the last marker counts


def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = decoder_module._penalise_repeats(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_guards_end_requests_as_their_rules_say(base_model, tokenizer):
    plain = GenerationConfig(max_new_tokens=40, stop_strings=())
    guarded = GenerationConfig(max_new_tokens=40, stop_strings=(), stop_on_loop=True, stop_after_answer=True)
    a = generate_detailed(base_model, tokenizer, PROMPTS, config=plain)
    b = generate_detailed(base_model, tokenizer, PROMPTS, config=guarded)
    for i in range(len(PROMPTS)):
        n = b.num_tokens[i]
        assert b.token_ids[i] == a.token_ids[i][:n]  # the guards only cut, they never change a token
        if b.finish_reasons[i] == "loop":
            assert is_looping(b.token_ids[i]) and not is_looping(b.token_ids[i][:-1])
        elif b.finish_reasons[i] == "length":
            assert not any(is_looping(b.token_ids[i][:k]) for k in range(1, n + 1))


def test_repetition_penalty_changes_only_repeated_tokens(base_model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=24, stop_strings=(), repetition_penalty=1.5)
    res = generate_detailed(base_model, tokenizer, PROMPTS, config=cfg)
    for i, prompt in enumerate(PROMPTS):  # oracle: the rule applied by hand, full re-forward each step
        ids, out = tokenizer(prompt)["input_ids"], []
        with torch.no_grad():
            for _ in range(24):
                logits = base_model(input_ids=torch.tensor([ids + out])).logits[0, -1]
                seen = torch.zeros_like(logits, dtype=torch.bool)
                seen[out] = True
                logits = torch.where(seen, torch.where(logits > 0, logits / 1.5, logits * 1.5), logits)
                out.append(int(logits.argmax()))
        assert res.token_ids[i] == out, f"prompt {i}"


def test_chat_prompt_format(base_model, tokenizer):
    tok = copy.deepcopy(tokenizer)
    with pytest.raises(GenerationError, match="chat template"):
        generate(base_model, tok, PROMPTS[:1], config=GenerationConfig(max_new_tokens=2, prompt_format="chat"))
    tok.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    chat = generate(base_model, tok, PROMPTS[:2], config=GenerationConfig(max_new_tokens=6, prompt_format="chat"))
    plain = generate(base_model, tok, [f"[{p}]>" for p in PROMPTS[:2]], config=GenerationConfig(max_new_tokens=6))
    assert chat == plain


# ------------------------------------------------------------------------------ continuous batching


def test_requests_join_the_running_batch_and_compute_what_they_compute_alone(tmp_path, tokenizer):
    """Seven requests of different lengths through 3 slots: the context caps each request's budget by
    its prompt length, so rows finish at different steps and waiting requests join rows still decoding.
    Every request's tokens are those it gets alone (float32, greedy), gate rows included."""
    d = make_tiny_student(tmp_path / "short", seed=1, initializer_range=0.2, max_position_embeddings=40)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    bank = random_bank(model)
    handle = inject_experts(model, bank)
    prompts = [("x" * n) + "?" for n in (3, 25, 9, 14, 30, 5, 19)]
    gates = torch.randn(len(prompts), 3, generator=torch.Generator().manual_seed(0))
    cfg = GenerationConfig(max_new_tokens=40, stop_strings=(), batch_size=3, ignore_eos=True)
    res = generate_detailed(model, tokenizer, prompts, handle=handle, gates=gates, config=cfg)
    one = GenerationConfig(max_new_tokens=40, stop_strings=(), batch_size=1, ignore_eos=True)
    for i, p in enumerate(prompts):
        alone = generate_detailed(model, tokenizer, [p], handle=handle, gates=gates[i:i + 1], config=one)
        assert res.token_ids[i] == alone.token_ids[0], f"request {i}"
    assert res.num_tokens == [40 - len(tokenizer(p)["input_ids"]) for p in prompts]
    joins = res.extra["admissions"]
    assert sum(a["joined"] for a in joins) == len(prompts)
    assert any(a["running"] > 0 for a in joins)  # some requests joined rows that were still decoding
    assert max(a["joined"] + a["running"] for a in joins) <= 3


def test_repeated_prompts_share_one_prefill(injected, tokenizer):
    """n samples of one question: one prefill row each for the distinct (prompt, gate) pairs; greedy
    copies of a request equal the request alone."""
    model, handle = injected
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 2
    gates = torch.stack([GATES[0]] * 3 + [GATES[1], GATES[2]])  # the 4th and 5th differ by gate
    res = generate_detailed(model, tokenizer, prompts, handle=handle, gates=gates, config=NO_STOP)
    assert [a["prefilled"] for a in res.extra["admissions"]] == [3]  # 3 distinct (prompt, gate) pairs
    alone = [generate(model, tokenizer, [p], handle=handle, gates=gates[i:i + 1], config=NO_STOP)[0]
             for i, p in enumerate(prompts)]
    assert res.texts == alone


# ------------------------------------------------------------------------------ the KV cache layer


def test_growing_layer_holds_what_concatenation_holds():
    """GrowingLayer: appends in place (a few buffer growths for 200 steps), reads as the
    concatenation, and takes assignments (reorder, cuts) as DynamicLayer does."""
    from transformers.cache_utils import DynamicLayer

    from modecotd_engine.engine.kv_cache import GrowingLayer

    gen = torch.Generator().manual_seed(0)
    grow, plain = GrowingLayer(), DynamicLayer()
    buffers = set()
    for step in range(200):
        n = 7 if step == 0 else 1  # a prompt, then one token a step
        k, v = torch.randn(3, 2, n, 4, generator=gen), torch.randn(3, 2, n, 4, generator=gen)
        gk, gv = grow.update(k, v)
        pk, pv = plain.update(k, v)
        assert torch.equal(gk, pk) and torch.equal(gv, pv) and grow.get_seq_length() == plain.get_seq_length()
        buffers.add(grow.__dict__["_keys"][0].data_ptr())
    assert len(buffers) <= 10  # grown by half its length at a time, not once per step
    idx = torch.tensor([2, 0])
    grow.reorder_cache(idx)
    plain.reorder_cache(idx)
    assert torch.equal(grow.keys, plain.keys) and torch.equal(grow.values, plain.values)
    grow.keys, grow.values = grow.keys[..., 5:, :], grow.values[..., 5:, :]  # the decoder's left cut
    plain.keys, plain.values = plain.keys[..., 5:, :], plain.values[..., 5:, :]
    k, v = torch.randn(2, 2, 1, 4, generator=gen), torch.randn(2, 2, 1, 4, generator=gen)
    assert all(torch.equal(a, b) for a, b in zip(grow.update(k, v), plain.update(k, v)))
    assert grow.get_seq_length() == plain.get_seq_length() == 7 + 199 - 5 + 1


def test_growing_layer_full_reads_return_whole_zero_padded_buffers():
    """full_reads: each update returns the whole buffers, the filled part equal to the concatenation
    and zeros after it; the cache's growing_cache default follows the grouped attention."""
    from transformers import AutoConfig
    from transformers.cache_utils import DynamicLayer

    from modecotd_engine.engine.attention import GROUPED
    from modecotd_engine.engine.kv_cache import GrowingLayer, growing_cache

    gen = torch.Generator().manual_seed(0)
    grow, plain = GrowingLayer(full_reads=True), DynamicLayer()
    growths = 0
    for step in range(120):
        n = 40 if step == 0 else 1
        k, v = torch.randn(2, 3, n, 4, generator=gen), torch.randn(2, 3, n, 4, generator=gen)
        before = grow.__dict__.get("_keys", (None, 0))[0]
        gk, gv = grow.update(k, v)
        pk, pv = plain.update(k, v)
        growths += gk is not before
        filled = pk.shape[-2]
        assert gk.shape[-2] >= filled and gk.is_contiguous() and gv.is_contiguous()
        assert torch.equal(gk[..., :filled, :], pk) and torch.equal(gv[..., :filled, :], pv)
        assert not gk[..., filled:, :].any() and not gv[..., filled:, :].any()
        assert torch.equal(grow.keys, pk) and grow.get_seq_length() == filled
        assert gk.shape[-2] - filled <= max(filled // 8, 16)  # an eighth of room at most
    assert growths <= 12
    config = AutoConfig.for_model("llama", num_hidden_layers=2)
    assert not growing_cache(config).layers[0].full_reads
    config._attn_implementation = GROUPED
    assert growing_cache(config).layers[0].full_reads


def test_inference_copies_follow_the_bank():
    """The torch path's cached inference copies of A and B are remade when the bank changes in place
    (a training step between two generations) and equal a plain cast."""
    from modecotd_engine.kernels import lora_mixture

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, generator=gen).to(torch.bfloat16)
    w = torch.randn(12, 16, generator=gen).to(torch.bfloat16)
    a = torch.nn.Parameter(torch.randn(3, 2, 16, generator=gen))
    b = torch.nn.Parameter(torch.randn(3, 12, 2, generator=gen))
    g = torch.rand(4, 1, 3, generator=gen)

    def run():
        with torch.no_grad():
            got = lora_mixture(x, w, None, a, b, g, 0.5, backend="torch")
        want = lora_mixture(x, w, None, a.detach().to(torch.bfloat16), b.detach().to(torch.bfloat16), g, 0.5,
                            backend="torch")
        return got, want

    got, want = run()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        a.mul_(3.0)  # in place: same storage, new version
        b.add_(1.0)
    got2, want2 = run()
    torch.testing.assert_close(got2, want2, rtol=0, atol=0)
    assert not torch.equal(got2, got)
