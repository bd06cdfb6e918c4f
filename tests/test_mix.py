"""Mixing: search / gradient / router / uniform on a tiny student, the mixture artifact, the CLI,
PEFT export, and bad input.

The "clear optimum" setting: a tiny Llama with sharper random weights (initializer_range 0.2, so
its logits are not flat) and three random experts with large B; the shots are the greedy outputs
of the student under the gate w* = (0, 1, 0), i.e. expert "b" alone (letters only, so the text
re-tokenizes to the same bytes). The shots loss is then much lower at w* than at w = 0.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import make_tiny_student
from modecotd_engine.engine.data import DataError, encode_prompt
from modecotd_engine.engine.experts import ExpertBank, ExpertBankError
from modecotd_engine.engine.inject import MixtureLinear, inject_experts
from modecotd_engine.engine.mix import ShotsObjective, mix, prepare_shots
from modecotd_engine.engine.mixture import (Mixture, MixtureError, check_mixture_bank, load_mixture,
                                            load_router_state, router_path_for, save_mixture)
from modecotd_engine.engine.student import load_student

W_STAR = torch.tensor([0.0, 1.0, 0.0])
NAMES = ["a", "b", "c"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    return make_tiny_student(tmp_path_factory.mktemp("sharp") / "student", initializer_range=0.2)


@pytest.fixture()
def student(sharp_dir):
    return load_student(sharp_dir, device="cpu")


def make_bank(model, seed=0, b_std=1.0):
    bank = ExpertBank.create(model, NAMES, rank=4, alpha=8.0, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for m in bank.modules:
        bank.lora_b[m] = torch.randn(bank.lora_b[m].shape, generator=gen) * b_std
    return bank


def expert_written_shots(student, bank, mode, n=5, tokens=20):
    """Greedy outputs of the student under gate W_STAR, restricted to lowercase letters and space."""
    tok = student.tokenizer
    allowed = torch.tensor([tok(c, add_special_tokens=False)["input_ids"][0] for c in "abcdefghijklmnopqrstuvwxyz "])
    handle = inject_experts(student.model, bank, mode=mode)
    shots = []
    try:
        for i in range(n):
            prompt = f"Q: name item {i}.\nA:"
            ids = torch.tensor([encode_prompt(tok, prompt)])
            with torch.no_grad(), handle.gated(W_STAR.expand(1, 3)):
                for _ in range(tokens):
                    nxt = allowed[student.model(ids).logits[0, -1, allowed].argmax()]
                    ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            shots.append({"input": prompt, "output": tok.decode(ids[0, -tokens:])})
    finally:
        handle.remove()
    return shots


def objective_at(student, bank, shots, mode, w, l1=0.05):
    handle = inject_experts(student.model, bank, mode=mode)
    try:
        obj = ShotsObjective(handle, prepare_shots(shots, student.tokenizer, target="t"), l1)
        return obj(w)
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("bank_seed", [0, 2])
@pytest.mark.parametrize("method", ["search", "gradient"])
@pytest.mark.parametrize("mode", ["weight", "output"])
def test_method_finds_the_expert_that_wrote_the_shots(student, mode, method, bank_seed):
    bank = make_bank(student.model, seed=bank_seed)
    shots = expert_written_shots(student, bank, mode)
    f_star = objective_at(student, bank, shots, mode, W_STAR)
    m = mix(bank, student, shots, method=method, mode=mode, budget=40, seed=0, target="letters")
    f0, f = m.info["objective_before"], m.info["objective_after"]
    assert f0 == m.shots_loss_before and f0 - f_star > 1.0, "the setting must have a clear optimum"
    # the search may end a little below f(w*) (w* is optimal for the greedy text, not for its loss),
    # but never far above it: within 5% of the way back to w = 0.
    assert f <= f_star + 0.05 * (f0 - f_star), (f0, f, f_star, m.weights)
    w = torch.tensor([m.weights[n] for n in NAMES])
    assert (w - W_STAR).abs().max() < 0.15, m.weights
    assert m.shots_loss_after < m.shots_loss_before
    assert abs(m.shots_loss_after + 0.05 * float(w.abs().mean()) - f) < 1e-5
    assert len(m.info["trace"]) == 40 and all(-3 <= x <= 3 for x in m.weights.values())


def test_probing_starts_the_search_at_the_best_single_expert(student):
    """Shots written by expert "b": probing finds e_b before the search starts, so the search starts
    there and ends no worse than it."""
    bank = make_bank(student.model)
    shots = expert_written_shots(student, bank, "weight")
    m = mix(bank, student, shots, method="search", mode="weight", budget=6, seed=0)
    probed = m.info["probed"]
    assert min(probed, key=probed.get) == "b" and m.info["start"] == [0.0, 1.0, 0.0]
    assert m.info["objective_after"] <= probed["b"]


def test_search_is_reproducible(student):
    bank = make_bank(student.model)
    shots = expert_written_shots(student, bank, "weight", n=3, tokens=12)
    runs = [mix(bank, student, shots, method="search", budget=15, seed=s) for s in (7, 7)]
    assert runs[0].weights == runs[1].weights and runs[0].info["trace"] == runs[1].info["trace"]
    assert runs[0].shots_loss_after == runs[1].shots_loss_after


@pytest.mark.parametrize("mode", ["weight", "output"])
def test_gradient_through_dg_equals_finite_differences(student, mode):
    """df/dw from the kernel's gate gradient vs central differences of the objective, in float64."""
    bank = make_bank(student.model, b_std=0.3)
    shots = expert_written_shots(student, bank, mode, n=3, tokens=12)
    student.model.double()
    handle = inject_experts(student.model, bank, mode=mode)
    obj = ShotsObjective(handle, prepare_shots(shots, student.tokenizer, target="t"), l1=0.05)
    w = torch.tensor([0.7, -0.4, 1.1], dtype=torch.float64)
    f, _ce, grad = obj.value_and_grad(w)
    assert abs(f - obj(w)) < 1e-6
    h = 1e-3
    fd = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = h
        fd[i] = (obj(w + e) - obj(w - e)) / (2 * h)
    # The model, the mixture and the loss run in float64, so the error is the O(h^2) of the central
    # difference: 1.7e-5 (weight mode) and 5e-6 (output mode) measured at h = 1e-3.
    err = (grad.double() - fd).abs()
    assert err.max() <= 1e-4, f"grad {grad.tolist()} fd {fd.tolist()} max err {err.max():.2e}"
    assert grad.abs().max() > 0.05  # not a vacuous comparison


@pytest.mark.parametrize("probe", [False, True])
def test_one_forward_per_candidate_and_no_weight_writes(student, probe):
    bank = make_bank(student.model)
    shots = expert_written_shots(student, bank, "weight", n=3, tokens=12)
    model = student.model
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    versions = {n: t._version for n, t in [*model.named_parameters(), *model.named_buffers()]}
    bank_versions = {m: (bank.lora_a[m]._version, bank.lora_b[m]._version) for m in bank.modules}
    calls = {"decoder": 0, "lm": 0, "load_state_dict": 0}
    h1 = model.get_decoder().register_forward_pre_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))
    h2 = model.register_forward_pre_hook(lambda *a: calls.__setitem__("lm", calls["lm"] + 1))
    original = torch.nn.Module.load_state_dict

    def spy(self, *a, **k):
        calls["load_state_dict"] += 1
        return original(self, *a, **k)

    torch.nn.Module.load_state_dict = spy
    try:
        m = mix(bank, student, shots, method="search", budget=25, seed=0, probe_experts=probe)
    finally:
        torch.nn.Module.load_state_dict = original
        h1.remove()
        h2.remove()
    # every evaluation is one decoder forward over the (single) shots batch, nothing else runs
    assert calls == {"decoder": m.evaluations, "lm": 0, "load_state_dict": 0}
    # w = 0 first, each expert alone when probing, then the asked candidates (repeats are cached)
    assert m.evaluations <= 25 + 1 + (bank.num_experts if probe else 0)
    assert ("probed" in m.info and len(m.info["probed"]) == 3) if probe else not m.info["probed"]
    assert {n: t._version for n, t in [*model.named_parameters(), *model.named_buffers()]} == versions
    assert {m_: (bank.lora_a[m_]._version, bank.lora_b[m_]._version) for m_ in bank.modules} == bank_versions
    assert not any(isinstance(x, MixtureLinear) for x in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_uniform_and_existing_handle(student):
    bank = make_bank(student.model)
    shots = expert_written_shots(student, bank, "output", n=2, tokens=8)
    handle = inject_experts(student.model, bank, mode="weight")
    handle.set_gates(torch.ones(1, 3))
    m = mix(bank, student, shots, method="uniform", mode="output", handle=handle)
    assert m.weights == {n: pytest.approx(1 / 3) for n in NAMES} and m.evaluations == 2
    assert m.shots_loss_after == pytest.approx(
        objective_at_handle(handle, student, shots, torch.full((3,), 1 / 3), "output"), abs=1e-6)
    # the caller's handle keeps its mode and gates
    assert handle.state.mode == "weight" and torch.equal(handle.state.gates, torch.ones(1, 3))


def test_progress_bar_counts_the_evaluations(student, capsys):
    bank = make_bank(student.model)
    shots = expert_written_shots(student, bank, "weight", n=2, tokens=8)
    m = mix(bank, student, shots, method="search", budget=10, seed=0, target="t", progress=True)
    err = capsys.readouterr().err
    # f(0), the three experts probed, then the budget: every evaluation ticks the bar once
    assert "mix t (search)" in err and f"{m.evaluations}/{1 + 3 + 10}" in err
    best = min([m.shots_loss_before, *m.info["probed"].values()])  # probed values hold the L1 part, f(0) has none
    assert "best=" in err and float(err.rsplit("best=", 1)[1][:6]) <= best + 1e-4
    mix(bank, student, shots, method="search", budget=10, seed=0, target="t", finalists=2, verify_max_new_tokens=4)
    assert "mix t" not in capsys.readouterr().err  # off by default
    mix(bank, student, shots, method="search", budget=10, seed=0, target="t", finalists=2, verify_max_new_tokens=4,
        progress=True)
    assert "checking the 2 best by generation" in capsys.readouterr().err


def test_progress_bar_counts_router_steps(student, capsys):
    bank = make_bank(student.model)
    shots = expert_written_shots(student, bank, "output", n=2, tokens=8)
    data = {"letters": expert_written_shots(student, bank, "output", n=3, tokens=8)}
    m = mix(bank, student, shots, method="router", mode="output", budget=5, router_data=data, progress=True, target="r")
    err = capsys.readouterr().err
    last = m.info["router_losses"][-1]
    assert "mix r (router)" in err and "6/6" in err and f"train_loss={last:.4f}" in err


def objective_at_handle(handle, student, shots, w, mode):
    previous = handle.state.mode
    handle.set_mode(mode)
    try:
        return ShotsObjective(handle, prepare_shots(shots, student.tokenizer, target="t"), 0.0).loss(w)
    finally:
        handle.set_mode(previous)


def test_router_method_trains_routers_only_and_roundtrips(student, tmp_path):
    bank = make_bank(student.model)
    shots = expert_written_shots(student, bank, "output", n=2, tokens=8)
    data = {"letters": expert_written_shots(student, bank, "output", n=4, tokens=8),
            "other": [{"input": f"Q: {i} + 1?\nA:", "output": f"{i + 1}"} for i in range(4)]}
    before = {m: (bank.lora_a[m].detach().clone(), bank.lora_b[m].detach().clone()) for m in bank.modules}
    m = mix(bank, student, shots, method="router", mode="output", budget=6, top_k=2, router_data=data, seed=3)
    for mod, (a, b) in before.items():  # experts frozen
        assert torch.equal(bank.lora_a[mod], a) and torch.equal(bank.lora_b[mod], b)
    assert m.top_k == 2 and len(m.info["router_losses"]) == 6 and m.evaluations == 6 + 2
    assert sum(m.weights.values()) == pytest.approx(1.0, abs=1e-5)  # mean routed gate
    assert set(m.router_state) == set(bank.modules)
    path = save_mixture(m, tmp_path / "letters.json")
    assert m.router == tmp_path / "letters.router.safetensors" == router_path_for(path)
    back = load_mixture(path)
    check_mixture_bank(back, bank)
    handle = inject_experts(student.model, bank, mode="output")
    handle.attach_router(load_router_state(back), top_k=back.top_k)
    routed = ShotsObjective(handle, prepare_shots(shots, student.tokenizer, target="t"), 0.0)
    with torch.no_grad():
        total = sum(float(_loss(student.model, b)) * n for b, n in zip(routed.batches, routed.counts))
    assert total / routed.total == pytest.approx(m.shots_loss_after, abs=1e-5)
    handle.remove()


def _loss(model, batch):
    from modecotd_engine.engine.loss import supervised_loss

    return supervised_loss(model, batch.input_ids, batch.attention_mask, batch.labels)


# -------------------------------------------------------------------------------------- artifact
def sample_mixture(**over):
    kw = dict(experts=NAMES, weights={"a": 0.5, "b": -1.25, "c": 0.0}, mode="weight", method="search", seed=3,
              target="t1", bank={"path": "/x", "names": NAMES, "tensors_sha256": "ab" * 32},
              shots_loss_before=2.5, shots_loss_after=1.5, evaluations=41, info={"l1": 0.05})
    kw.update(over)
    return Mixture(**kw)


def test_mixture_save_load_roundtrip(tmp_path):
    m = sample_mixture()
    path = save_mixture(m, tmp_path / "sub" / "t1.json")
    assert load_mixture(path) == m
    meta = json.loads(path.read_text())
    assert meta["format"] == "modecotd-mixture" and meta["format_version"] == 1 and meta["router"] is None
    assert not list(path.parent.glob("*.tmp"))


def write_json(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda d: "{oops", "invalid JSON"),
    (lambda d: {**d, "format": "other"}, "not a mixture file"),
    (lambda d: {**d, "format_version": 2}, "format version 2"),
    (lambda d: {k: v for k, v in d.items() if k != "weights"}, "missing field 'weights'"),
    (lambda d: {**d, "seed": "3"}, "field 'seed' must be int"),
    (lambda d: {**d, "method": "magic"}, "method 'magic'"),
    (lambda d: {**d, "weights": {"a": "x"}}, "weight of expert 'a' must be a finite number"),
    (lambda d: {**d, "weights": {"zz": 1.0}}, "not listed in 'experts'"),
    (lambda d: {**d, "method": "router", "router": "gone.router.safetensors"}, "router file .* is missing"),
])
def test_load_mixture_errors_name_the_file(tmp_path, edit, match):
    good = json.loads(save_mixture(sample_mixture(), tmp_path / "good.json").read_text())
    path = write_json(tmp_path / "bad.json", edit(good))
    with pytest.raises(MixtureError, match=match) as info:
        load_mixture(path)
    assert "bad.json" in str(info.value) or "gone.router" in str(info.value)
    with pytest.raises(MixtureError, match="not found"):
        load_mixture(tmp_path / "missing.json")


def test_router_file_checksum_and_bank_checks(tmp_path, student):
    bank = make_bank(student.model)
    state = {mod: torch.randn(3, k) for mod, (k, _n) in bank.modules.items()}
    m = sample_mixture(method="router", router_state=state, top_k=1)
    path = save_mixture(m, tmp_path / "r.json")
    check_mixture_bank(load_mixture(path), bank)
    rfile = tmp_path / "r.router.safetensors"
    data = bytearray(rfile.read_bytes())
    data[-1] ^= 0xFF
    rfile.write_bytes(bytes(data))
    with pytest.raises(MixtureError, match="sha256 differs"):
        load_mixture(path)
    with pytest.raises(MixtureError, match="uses experts the bank does not have: zz"):
        check_mixture_bank(sample_mixture(weights={"zz": 1.0}, experts=["zz"]), bank)
    with pytest.raises(MixtureError, match="same experts in the same order"):
        check_mixture_bank(sample_mixture(method="router", experts=["b", "a", "c"], router_state=state), bank)
    wrong = {**state, next(iter(state)): torch.zeros(3, 5)}
    with pytest.raises(MixtureError, match="does not fit the bank"):
        check_mixture_bank(sample_mixture(method="router", router_state=wrong), bank)
    bank_dir = bank.save(tmp_path / "bank")
    with pytest.raises(MixtureError, match="other expert tensors"):
        check_mixture_bank(sample_mixture(), bank, bank_dir=bank_dir)


# ------------------------------------------------------------------------------------------- CLI
def run_cli(*argv):
    """Parse with the command's own parser and run it (errors propagate; the entry point prints them)."""
    import argparse

    from modecotd_engine.cli import mix as mix_cli

    parser = argparse.ArgumentParser(prog="modecotd-engine")
    mix_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["mix", *argv])
    return args.func(args)


@pytest.fixture()
def cli_setup(student, sharp_dir, tmp_path):
    bank = make_bank(student.model)
    bank_dir = bank.save(tmp_path / "bank")
    shots = expert_written_shots(student, bank, "weight", n=3, tokens=10)
    shots_file = tmp_path / "letters.jsonl"
    shots_file.write_text("".join(json.dumps({"input": s["input"], "output": s["output"] + "\n-->\nok END"}) + "\n"
                                  for s in shots))
    return bank_dir, shots_file


@pytest.mark.parametrize("mode", ["weight", "output"])
def test_cli_mix_and_peft_export_match_our_logits(cli_setup, sharp_dir, tmp_path, capsys, mode):
    from peft import PeftModel

    bank_dir, shots_file = cli_setup
    out, adapter = tmp_path / "mix.json", tmp_path / "adapter"
    rc = run_cli("--bank", str(bank_dir), "--target", "letters", "--shots", str(shots_file), "--mode", mode,
                 "--budget", "12", "--student", str(sharp_dir), "--out", str(out), "--export-peft", str(adapter),
                 "--finalists", "0", "--no-progress")  # the search's own result: the export is of a non-zero mixture
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, printed
    assert "mix letters" not in captured.err  # --no-progress
    assert "before" in printed and "after" in printed and "wrote" in printed
    m = load_mixture(out)
    assert m.mode == mode and m.target == "letters" and m.evaluations <= 12 + 1 + 3  # budget, w = 0, 3 probes
    assert m.bank["tensors_sha256"] == json.loads((bank_dir / "experts.json").read_text())["tensors_sha256"]
    for name, w in m.weights.items():
        assert f"{w:+.4f}" in printed and name in printed
    assert any(abs(w) > 0 for w in m.weights.values())
    fresh = load_student(sharp_dir)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(fresh.model), str(adapter)).eval()
    bank = ExpertBank.load(bank_dir, student=fresh)
    check_mixture_bank(m, bank, bank_dir=bank_dir)
    handle = inject_experts(fresh.model, bank, mode=mode)
    ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(1))
    handle.set_gates(m.weight_vector(bank).expand(2, 3))
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_cli_mix_in_bfloat16(cli_setup, sharp_dir, tmp_path, capsys):
    bank_dir, shots_file = cli_setup
    out = tmp_path / "bf16.json"
    rc = run_cli("--bank", str(bank_dir), "--target", "letters", "--shots", str(shots_file), "--budget", "6",
                 "--student", str(sharp_dir), "--out", str(out), "--finalists", "0", "--no-progress",
                 "--dtype", "bfloat16")
    printed = capsys.readouterr().out
    assert rc == 0 and "student torch.bfloat16" in printed
    m = load_mixture(out)
    assert m.evaluations <= 6 + 1 + 3 and all(math.isfinite(w) for w in m.weights.values())
    assert math.isfinite(m.shots_loss_after) and m.shots_loss_after <= m.shots_loss_before


def test_cli_router(cli_setup, sharp_dir, tmp_path, capsys):
    bank_dir, shots_file = cli_setup
    data = tmp_path / "seen"
    data.mkdir()
    (data / "letters.json").write_text(json.dumps([json.loads(x) for x in shots_file.read_text().splitlines()]))
    out = tmp_path / "r.json"
    rc = run_cli("--bank", str(bank_dir), "--target", "letters", "--shots", str(shots_file), "--method", "router",
                 "--budget", "3", "--top-k", "2", "--router-data", str(data), "--student", str(sharp_dir),
                 "--out", str(out))
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, printed
    assert "mean routed gate" in printed and (tmp_path / "r.router.safetensors").is_file()
    assert "mix letters (router)" in captured.err and "4/4" in captured.err
    assert load_mixture(out).top_k == 2


@pytest.mark.parametrize("content, match", [
    ("", "bad.jsonl.*empty file"),
    ('{"input": "q"}\n', "bad.jsonl.*line 1.*'output' must be a string, got nothing"),
    ('{"input": "q", "output": "no marker here"}\n', "bad.jsonl.*line 1.*output has no '-->'"),
    ('{"input": "q", "output": "a\\n-->\\nb END"}\n{"input": \n', "bad.jsonl.*line 2.*malformed JSON"),
])
def test_cli_rejects_bad_shots_files(cli_setup, sharp_dir, tmp_path, content, match):
    bank_dir, _ = cli_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    with pytest.raises(DataError, match=match):
        run_cli("--bank", str(bank_dir), "--target", "x", "--shots", str(bad), "--student", str(sharp_dir),
                "--out", str(tmp_path / "m.json"))
    assert not (tmp_path / "m.json").exists()


def test_cli_argument_errors(cli_setup, sharp_dir, tmp_path):
    bank_dir, shots_file = cli_setup
    common = ["--bank", str(bank_dir), "--target", "x", "--shots", str(shots_file), "--student", str(sharp_dir),
              "--out", str(tmp_path / "m.json")]
    with pytest.raises(ValueError, match="needs --router-data"):
        run_cli(*common, "--method", "router")
    with pytest.raises(ValueError, match="cannot be a PEFT adapter"):
        run_cli(*common, "--method", "router", "--router-data", str(tmp_path), "--export-peft", "x")
    with pytest.raises(ValueError, match="--top-k applies to --method router only"):
        run_cli(*common, "--top-k", "2")


def test_bank_that_does_not_match_the_student_is_refused(student, tmp_path):
    other = load_student(make_tiny_student(tmp_path / "other", hidden_size=32, intermediate_size=64))
    bank_dir = make_bank(other.model).save(tmp_path / "bank")
    shots = tmp_path / "s.jsonl"
    shots.write_text(json.dumps({"input": "q", "output": "a\n-->\nb END"}) + "\n")
    with pytest.raises(ExpertBankError, match="does not match the student"):
        run_cli("--bank", str(bank_dir), "--target", "x", "--shots", str(shots),
                "--student", str(student.path), "--out", str(tmp_path / "m.json"))
    with pytest.raises(ExpertBankError, match="does not match the student"):
        mix(ExpertBank.load(bank_dir), student, [{"input": "q", "output": "a"}])


def test_mix_rejects_bad_shots_and_arguments(student):
    bank = make_bank(student.model)
    with pytest.raises(DataError, match="no shots"):
        mix(bank, student, [])
    with pytest.raises(DataError, match="record 1.*'output' must be a non-empty string"):
        mix(bank, student, [{"input": "q", "output": "a"}, {"input": "q", "output": "  "}])
    with pytest.raises(ValueError, match="method must be one of"):
        mix(bank, student, [{"input": "q", "output": "a"}], method="magic")
    with pytest.raises(ValueError, match="needs router_data"):
        mix(bank, student, [{"input": "q", "output": "a"}], method="router")
    with pytest.raises(ValueError, match="bounds must satisfy"):
        mix(bank, student, [{"input": "q", "output": "a"}], bounds=(0.5, 3))


# ------------------------------------------------------------------------ checked by generation


def test_pick_by_generation_keeps_the_candidate_that_answers(student):
    """Shots whose gold answers are what expert "b" writes: the check must choose w* over w = 0 and
    a third candidate, whatever their objective values say."""
    from modecotd_engine.engine.answers import extract_answer
    from modecotd_engine.engine.generate import GenerationConfig, generate
    from modecotd_engine.engine.mix import pick_by_generation

    bank = make_bank(student.model)
    handle = inject_experts(student.model, bank, mode="weight")
    config = GenerationConfig(max_new_tokens=8, stop_strings=())
    try:
        prompts = [f"Q: name item {i}.\nA:" for i in range(4)]
        texts = generate(student.model, student.tokenizer, prompts, handle=handle,
                         gates=W_STAR.expand(len(prompts), 3), config=config)
        golds = [extract_answer(t, "text") for t in texts]
        assert all(golds)
        shots = [{"input": p, "output": f"-->\n{g} END"} for p, g in zip(prompts, golds)]
        candidates = [(torch.zeros(3), 0.1), (torch.tensor([1.0, 0.0, -1.0]), 0.2), (W_STAR, 9.0)]
        chosen, records = pick_by_generation(handle, student.tokenizer, shots, "items", candidates, config)
    finally:
        handle.remove()
    assert chosen == 2 and records[2]["correct"] == len(shots) == records[2]["answered"]
    assert records[0]["correct"] < len(shots) and records[1]["correct"] < len(shots)


def expected_choice(found: list[dict], prior: int, shots: int) -> int:
    """The documented rule, written out: best by (correct, answered, is prior, -objective); it
    replaces the prior only when a one-sided sign test over the shots the two answer differently
    (correctly; on equal correct counts, at all) gives p <= 0.05."""
    key = [(c["correct"], c["answered"], i == prior, -c["objective"]) for i, c in enumerate(found)]
    best = key.index(max(key))
    b, d = found[best], found[prior]
    assert len(b["right"]) == len(d["right"]) == shots
    field = "right" if b["correct"] != d["correct"] else "has_answer"
    wins = sum(x == 1 and y == 0 for x, y in zip(b[field], d[field]))
    losses = sum(x == 0 and y == 1 for x, y in zip(b[field], d[field]))
    n = wins + losses
    p = sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n
    return best if wins > losses and p <= 0.05 else prior


def fake_generations(monkeypatch, texts: list[str]):
    """``generate_detailed`` replaced by one that returns ``texts`` (the first ``len(prompts)``)."""
    from modecotd_engine.engine import generate as gen_module
    from modecotd_engine.engine.generate import GenerationResult

    def fake(model, tokenizer, prompts, **kw):
        out = texts[: len(prompts)]
        return GenerationResult(out, [1] * len(out), ["stop"] * len(out), [0.0] * len(out), 0.0)

    monkeypatch.setattr(gen_module, "generate_detailed", fake)


def test_pick_by_generation_needs_evidence_to_replace_the_prior(monkeypatch):
    """Five shots: 3 right against the prior's 1 is noise (p = 1/4, the prior stays, the measured
    tracking case); 5 against 0 is not (p = 1/32)."""
    from modecotd_engine.engine.generate import GenerationConfig
    from modecotd_engine.engine.mix import pick_by_generation

    shots = [{"input": f"Q{i}", "output": f"-->\n{i} END"} for i in range(5)]

    def answers(right: int) -> list[str]:  # the first `right` shots answered correctly, the rest wrong
        return [f"-->\n{i if i < right else 99} END" for i in range(5)]

    handle = type("H", (), {"model": None})()
    cfg = GenerationConfig()
    cands = [(torch.zeros(3), 1.0), (torch.ones(3), 0.5), (torch.full((3,), 2.0), 0.9)]
    fake_generations(monkeypatch, answers(1) + answers(2) + answers(3))
    chosen, records = pick_by_generation(handle, None, shots, "addsub", cands, cfg, default=0)
    assert [r["correct"] for r in records] == [1, 2, 3] and chosen == 0
    assert records[2]["right"] == [1, 1, 1, 0, 0] and records[2]["has_answer"] == [1] * 5
    # a lower level is not needed to keep it; a looser one lets the 3-vs-1 candidate through (p = 1/4)
    assert pick_by_generation(handle, None, shots, "addsub", cands, cfg, default=0, alpha=0.25)[0] == 2

    fake_generations(monkeypatch, answers(0) + answers(5))
    chosen, records = pick_by_generation(handle, None, shots, "addsub", cands[:2], cfg, default=0)
    assert [r["correct"] for r in records] == [0, 5] and chosen == 1

    # the prior right on one shot the candidate misses: 4 wins, 1 loss, p = 6/32: the prior stays
    fake_generations(monkeypatch, ["-->\n0 END"] + ["-->\n99 END"] * 4 + ["-->\n99 END"] + answers(5)[1:])
    chosen, records = pick_by_generation(handle, None, shots, "addsub", cands[:2], cfg, default=0)
    assert [r["correct"] for r in records] == [1, 4] and chosen == 0


def test_pick_by_generation_counts_answers_when_correct_answers_tie(monkeypatch):
    """As many correct answers (none): a candidate that answers all five shots where the prior
    answers none replaces it; one that answers four does not."""
    from modecotd_engine.engine.generate import GenerationConfig
    from modecotd_engine.engine.mix import pick_by_generation

    shots = [{"input": f"Q{i}", "output": f"-->\nyes END"} for i in range(5)]
    handle = type("H", (), {"model": None})()
    cands = [(torch.zeros(2), 1.0), (torch.ones(2), 0.5)]
    fake_generations(monkeypatch, ["1. 1. 1."] * 5 + ["-->\nno END"] * 5)
    chosen, records = pick_by_generation(handle, None, shots, "strategy_qa", cands, GenerationConfig(), default=0)
    assert [(r["correct"], r["answered"]) for r in records] == [(0, 0), (0, 5)] and chosen == 1
    fake_generations(monkeypatch, ["1. 1. 1."] * 5 + ["-->\nno END"] * 4 + ["1. 1. 1."])
    chosen, records = pick_by_generation(handle, None, shots, "strategy_qa", cands, GenerationConfig(), default=0)
    assert [(r["correct"], r["answered"]) for r in records] == [(0, 0), (0, 4)] and chosen == 0


def test_pick_by_generation_keeps_the_student_on_a_tie(student):
    """When no candidate answers more shots (or more correctly) than w = 0, the student stays."""
    from modecotd_engine.engine.generate import GenerationConfig
    from modecotd_engine.engine.mix import pick_by_generation

    bank = make_bank(student.model)
    handle = inject_experts(student.model, bank, mode="weight")
    shots = [{"input": f"Q: item {i}?\nA:", "output": "-->\nzzzz-not-generated END"} for i in range(3)]
    candidates = [(W_STAR, 0.1), (torch.tensor([1.0, 0.0, 0.0]), 0.2), (torch.zeros(3), 5.0)]
    try:
        chosen, records = pick_by_generation(handle, student.tokenizer, shots, "items", candidates,
                                             GenerationConfig(max_new_tokens=4, stop_strings=()), default=2)
    finally:
        handle.remove()
    assert [r["correct"] for r in records] == [0, 0, 0]
    assert len({r["answered"] for r in records}) == 1  # "text" answers: every non-empty last line
    assert chosen == 2  # a tie on correct and answered: the default (here the student), despite its objective


def test_pick_by_generation_with_guided_answers(student):
    """With guided answers every candidate answers every shot in the target's form (the tiny student
    never writes the marker itself, so each answer is forced at the budget); without, none does."""
    from modecotd_engine.engine.generate import GenerationConfig
    from modecotd_engine.engine.mix import pick_by_generation

    bank = make_bank(student.model)
    handle = inject_experts(student.model, bank, mode="weight")
    shots = [{"input": f"Is item {i} heads up?", "output": "-->\nyes END"} for i in range(3)]
    candidates = [(W_STAR, 0.1), (torch.zeros(3), 5.0)]
    try:
        guided = pick_by_generation(handle, student.tokenizer, shots, "coin_flip", candidates,
                                    GenerationConfig(max_new_tokens=24, guide_answers=True), default=1)[1]
        free = pick_by_generation(handle, student.tokenizer, shots, "coin_flip", candidates,
                                  GenerationConfig(max_new_tokens=24), default=1)[1]
    finally:
        handle.remove()
    assert [r["answered"] for r in guided] == [3, 3]
    assert [r["answered"] for r in free] == [0, 0]


def test_seen_target_keeps_its_own_expert_on_a_tie(student):
    bank = make_bank(student.model)
    shots = expert_written_shots(student, bank, "weight", n=3, tokens=12)
    m = mix(bank, student, shots, method="uniform", mode="weight", finalists=1, target="c")
    found = m.info["finalists"]
    assert found[m.info["prior"]]["weights"] == [0.0, 0.0, 1.0]  # "c" is an expert: its own is the prior
    assert any(all(x == 0 for x in c["weights"]) for c in found)  # and the student is a candidate too
    assert m.info["chosen"] == expected_choice(found, m.info["prior"], len(shots))


def test_mix_with_finalists_records_the_check_and_includes_the_student(student):
    bank = make_bank(student.model)
    shots = expert_written_shots(student, bank, "weight", n=3, tokens=12)
    m = mix(bank, student, shots, method="search", mode="weight", budget=8, finalists=3, target="items")
    found = m.info["finalists"]
    assert any(all(x == 0 for x in c["weights"]) for c in found)  # w = 0 was a candidate
    prior = m.info["prior"]
    assert all(x == 0 for x in found[prior]["weights"])  # "items" is not an expert: the prior is the student
    assert m.info["chosen"] == expected_choice(found, prior, len(shots))
    assert [m.weights[n] for n in NAMES] == pytest.approx(found[m.info["chosen"]]["weights"], abs=1e-4)
