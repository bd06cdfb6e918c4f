"""Expert bank: creation, save/load round trip, validation against the student, editing, PEFT interop,
and the injection layer (exactness with zero and one-hot gates)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from modecotd_engine.engine.experts import ExpertBank, ExpertBankError, find_target_modules
from modecotd_engine.engine.inject import MixtureLinear, inject_experts


@pytest.fixture()
def model(base_model):
    return copy.deepcopy(base_model)


def random_bank(model, names=("add", "letters", "coins"), rank=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=0):
    bank = ExpertBank.create(model, list(names), rank=rank, alpha=alpha, targets=targets, seed=seed,
                             student={"model_type": "llama", "hidden_size": model.config.hidden_size})
    gen = torch.Generator().manual_seed(seed + 1)
    for m in bank.modules:  # B is zero at creation; give every expert a real update
        bank.lora_b[m] = torch.randn(bank.lora_b[m].shape, generator=gen) * 0.2
    return bank


def input_ids(batch=2, length=9, vocab=200, seed=0):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_create_targets_and_shapes(model):
    bank = ExpertBank.create(model, ["a", "b"], rank=4, alpha=8)
    n_layers = model.config.num_hidden_layers
    assert len(bank.modules) == 2 * n_layers
    assert all(m.endswith(("q_proj", "v_proj")) for m in bank.modules)
    m = "model.layers.0.self_attn.q_proj"
    assert bank.lora_a[m].shape == (2, 4, 64) and bank.lora_b[m].shape == (2, 64, 4)
    assert bank.scale == 2.0
    assert torch.count_nonzero(bank.lora_b[m]) == 0
    # any Linear by name pattern: a regex over the full name
    mlp = find_target_modules(model, [r"model\.layers\.\d+\.mlp\.(up|down)_proj"])
    assert len(mlp) == 2 * n_layers


def test_experts_share_their_starting_a_unless_asked_not_to(model):
    shared = ExpertBank.create(model, ["a", "b", "c"], rank=4, alpha=8, seed=5)
    independent = ExpertBank.create(model, ["a", "b", "c"], rank=4, alpha=8, seed=5, shared_init=False)
    for m in shared.modules:
        a = shared.lora_a[m]
        assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2]) and a.is_contiguous()
        b = independent.lora_a[m]
        assert not torch.equal(b[0], b[1]) and not torch.equal(b[1], b[2])
    # an expert added later with the same seed starts where the others started
    added = copy.deepcopy(shared)
    added.add_expert("d", seed=5)
    for m in shared.modules:
        assert torch.equal(added.lora_a[m][3], shared.lora_a[m][0])


def test_prompt_format_is_saved_and_old_banks_read_as_plain(model, tmp_path):
    bank = ExpertBank.create(model, ["a"], rank=4, alpha=8, prompt_format="chat")
    bank.save(tmp_path / "chat")
    assert ExpertBank.load(tmp_path / "chat").prompt_format == "chat"
    meta = json.loads((tmp_path / "chat" / "experts.json").read_text())
    del meta["prompt_format"]  # a bank written before the field existed
    (tmp_path / "chat" / "experts.json").write_text(json.dumps(meta))
    assert ExpertBank.load(tmp_path / "chat").prompt_format == "plain"
    with pytest.raises(ExpertBankError, match="unknown prompt format 'jinja'"):
        ExpertBank.create(model, ["a"], prompt_format="jinja")


def test_no_matching_targets(model):
    with pytest.raises(ExpertBankError, match="no nn.Linear"):
        ExpertBank.create(model, ["a"], targets=["nonexistent_proj"])


def test_save_load_roundtrip(model, tmp_path):
    bank = random_bank(model)
    bank.save(tmp_path / "bank")
    meta = json.loads((tmp_path / "bank" / "experts.json").read_text())
    assert meta["names"] == ["add", "letters", "coins"] and meta["format_version"] == 1
    back = ExpertBank.load(tmp_path / "bank", student=model)
    assert back.names == bank.names and back.rank == 4 and back.alpha == 8.0
    for m in bank.modules:
        assert torch.equal(back.lora_a[m], bank.lora_a[m]) and torch.equal(back.lora_b[m], bank.lora_b[m])
    assert not list((tmp_path / "bank").glob("*.tmp"))


def test_load_errors(model, tmp_path):
    with pytest.raises(ExpertBankError, match="not found"):
        ExpertBank.load(tmp_path / "missing")
    bank = random_bank(model)
    d = bank.save(tmp_path / "bank")
    # tensors rewritten without the JSON: detected by the checksum
    t = d / "experts.safetensors"
    data = bytearray(t.read_bytes())
    data[-1] ^= 0xFF
    t.write_bytes(bytes(data))
    with pytest.raises(ExpertBankError, match="sha256"):
        ExpertBank.load(d)
    (d / "experts.json").write_text("{not json")
    with pytest.raises(ExpertBankError, match="invalid JSON"):
        ExpertBank.load(d)


def test_check_student_names_disagreements(model, tmp_path):
    bank = random_bank(model)
    bank.modules["model.layers.0.self_attn.q_proj"] = (64, 32)
    bank.student["hidden_size"] = 128
    with pytest.raises(ExpertBankError) as info:
        bank.check_student(type("S", (), {"model": model, "identity": {"hidden_size": 64}})())
    msg = str(info.value)
    assert "q_proj" in msg and "(in=64, out=32)" in msg and "hidden_size" in msg


def test_add_remove_rename(model):
    bank = random_bank(model)
    m = next(iter(bank.modules))
    before = bank.lora_b[m].clone()
    assert bank.add_expert("dates") == 3
    assert bank.lora_a[m].shape[0] == 4 and torch.count_nonzero(bank.lora_b[m][3]) == 0
    bank.remove_expert("letters")
    assert bank.names == ["add", "coins", "dates"]
    assert torch.equal(bank.lora_b[m][1], before[2])
    bank.rename_expert("coins", "coin_flip")
    assert bank.index("coin_flip") == 1
    with pytest.raises(ExpertBankError, match="already exists"):
        bank.add_expert("add")
    with pytest.raises(ExpertBankError, match="unknown expert 'nope'; known experts: add"):
        bank.index("nope")
    with pytest.raises(ExpertBankError, match="invalid expert name"):
        bank.rename_expert("add", "bad name!")


def test_weights_vector(model):
    bank = random_bank(model)
    assert bank.weights_vector(["add", "coins"]).tolist() == [0.5, 0.0, 0.5]
    assert bank.weights_vector({"letters": -1.5}).tolist() == [0.0, -1.5, 0.0]
    assert bank.weights_vector("coins").tolist() == [0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------- injection
def test_zero_gates_equal_frozen_student_exactly(base_model, model):
    ids = input_ids()
    want = base_model(ids).logits
    handle = inject_experts(model, random_bank(model))
    handle.set_gates(torch.zeros(2, 3))
    assert torch.equal(model(ids).logits, want)
    handle.set_gates(None)
    assert torch.equal(model(ids).logits, want)
    assert isinstance(model.model.layers[0].self_attn.q_proj, MixtureLinear)
    handle.remove()
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)


def merged_copy(base_model, bank, weights, mode):
    """The student with sum_e w_e B_e A_e (output) or (sum w B)(sum w A) (weight) merged into W."""
    merged = copy.deepcopy(base_model)
    w = bank.weights_vector(weights).double()
    for m in bank.modules:
        lin = merged.get_submodule(m)
        a, b = bank.lora_a[m].detach().double(), bank.lora_b[m].detach().double()
        if mode == "output":
            delta = torch.einsum("e,enr,erk->nk", w, b, a)
        else:
            delta = torch.einsum("e,enr->nr", w, b) @ torch.einsum("e,erk->rk", w, a)
        lin.weight.data = (lin.weight.double() + bank.scale * delta).float()
    return merged


@pytest.mark.parametrize("expert", [0, 2])
def test_one_hot_gate_equals_merged_single_lora(base_model, model, expert):
    bank = random_bank(model)
    want = merged_copy(base_model, bank, bank.names[expert], "output")(input_ids()).logits
    handle = inject_experts(model, bank)
    handle.set_gates(torch.nn.functional.one_hot(torch.tensor([expert, expert]), 3).float())
    got = model(input_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["output", "weight"])
def test_mixed_per_sequence_gates_match_merged_models(base_model, model, mode):
    """Two sequences with different mixtures in one batch equal two separately merged students."""
    bank = random_bank(model)
    mixes = [{"add": 0.7, "coins": 0.3}, {"letters": -1.2, "add": 2.0}]
    wants = [merged_copy(base_model, bank, mix, mode)(input_ids(1, 9, seed=i)).logits for i, mix in enumerate(mixes)]
    handle = inject_experts(model, bank, mode=mode)
    handle.set_gates(torch.stack([bank.weights_vector(mx) for mx in mixes]))
    ids = torch.cat([input_ids(1, 9, seed=0), input_ids(1, 9, seed=1)])
    got = model(ids).logits
    torch.testing.assert_close(got, torch.cat(wants), rtol=1e-4, atol=1e-4)


def test_rows_of_both_modes_in_one_batch_match_merged_models(base_model, model):
    """Per-row composition: four sequences, weight and output rows interleaved, in one forward equal
    four separately merged students (each mixture merged in its own mode)."""
    bank = random_bank(model)
    mixes = [{"add": 0.7, "coins": 0.3}, {"letters": -1.2, "add": 2.0}, {"coins": 1.0}, {"add": 0.5, "letters": 0.5}]
    modes = ["weight", "output", "output", "weight"]
    wants = [merged_copy(base_model, bank, mx, m)(input_ids(1, 9, seed=i)).logits
             for i, (mx, m) in enumerate(zip(mixes, modes))]
    handle = inject_experts(model, bank, mode="output")
    handle.set_gates(torch.stack([bank.weights_vector(mx) for mx in mixes]), modes)
    assert handle.state.split()[0] is None  # two sub-batches
    ids = torch.cat([input_ids(1, 9, seed=i) for i in range(4)])
    torch.testing.assert_close(model(ids).logits, torch.cat(wants), rtol=1e-4, atol=1e-4)
    # one mode named for every row: that mode, whatever the handle's
    handle.set_gates(torch.stack([bank.weights_vector(mx) for mx in mixes[:1] * 2]), ["weight", "weight"])
    assert handle.state.split() == ("weight", None)
    torch.testing.assert_close(model(ids[:2]).logits[:1], wants[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="row modes for"):
        handle.set_gates(torch.ones(2, 3), ["weight"])
    with pytest.raises(ValueError, match="unknown composition"):
        handle.set_gates(torch.ones(2, 3), ["weight", "sum"])
    handle.set_gates(torch.ones(2, 3))
    assert handle.state.row_modes is None  # gates without modes: the handle's mode again


def test_rows_of_both_modes_gradients_match_the_per_row_reference():
    """MixtureLinear with per-row modes in float64 against a plain per-row formula: the output and the
    gradients of x, the gates, A and B."""
    from modecotd_engine.engine.inject import GateState

    torch.manual_seed(0)
    e, r, k, n, b, l = 3, 4, 16, 12, 4, 5
    base = torch.nn.Linear(k, n, dtype=torch.float64)
    a = torch.nn.Parameter(torch.randn(e, r, k, dtype=torch.float64))
    bb = torch.nn.Parameter(torch.randn(e, n, r, dtype=torch.float64))
    state = GateState(mode="output", backend="torch")
    layer = MixtureLinear(base, a, bb, 0.5, state)
    x = torch.randn(b, l, k, dtype=torch.float64, requires_grad=True)
    g = torch.randn(b, e, dtype=torch.float64, requires_grad=True)
    modes = ["weight", "output", "weight", "output"]
    state.gates, state.row_modes = g, modes
    got = layer(x)
    wants = []
    for i, m in enumerate(modes):
        if m == "weight":
            delta = torch.einsum("e,enr->nr", g[i], bb) @ torch.einsum("e,erk->rk", g[i], a)
        else:
            delta = torch.einsum("e,enr,erk->nk", g[i], bb, a)
        wants.append(base(x[i]) + 0.5 * x[i] @ delta.T)
    want = torch.stack(wants)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    up = torch.randn_like(want)
    grads = torch.autograd.grad((got * up).sum(), [x, g, a, bb])
    refs = torch.autograd.grad((want * up).sum(), [x, g, a, bb])
    for name, gg, rr in zip(["x", "gates", "A", "B"], grads, refs):
        torch.testing.assert_close(gg, rr, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_per_token_gates_and_shape_errors(model):
    bank = random_bank(model)
    handle = inject_experts(model, bank)
    ids = input_ids()
    g = torch.softmax(torch.randn(2, ids.shape[1], 3), -1)
    handle.set_gates(g)
    assert model(ids).logits.shape == (2, 9, model.config.vocab_size)
    handle.set_gates(torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="do not fit"):
        model(ids)
    with pytest.raises(ValueError, match="gates must be"):
        handle.set_gates(torch.rand(2, 5))


def test_trainable_injection_updates_bank_and_keeps_base_frozen(model, tmp_path):
    bank = random_bank(model)
    handle = inject_experts(model, bank, trainable=True)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    params = handle.lora_parameters()
    assert params and all(p.requires_grad for p in params)
    handle.set_gates(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    model(input_ids()).logits.sum().backward()
    m = next(iter(bank.modules))
    grad_b = bank.lora_b[m].grad
    assert grad_b is not None and grad_b[0].abs().sum() > 0 and grad_b[1].abs().sum() == 0
    with torch.no_grad():
        bank.lora_b[m].add_(1.0)
    back = ExpertBank.load(bank.save(tmp_path / "b"))
    assert torch.equal(back.lora_b[m], bank.lora_b[m].detach())


def test_double_injection_refused(model):
    bank = random_bank(model)
    inject_experts(model, bank)
    with pytest.raises(ExpertBankError, match="already carries experts"):
        inject_experts(model, random_bank(model))


# ------------------------------------------------------------------------------------- PEFT
# Only these tests need peft; a module-level importorskip would hide every test above as well.
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")


@needs_peft
@pytest.mark.parametrize("what", ["single", "weight", "output"])
def test_export_peft_matches_our_logits(base_model, model, tmp_path, what):
    from peft import PeftModel

    bank = random_bank(model)
    weights = {"single": "letters", "weight": {"add": 0.6, "coins": -0.4},
               "output": {"add": 0.6, "letters": 1.5, "coins": -0.4}}[what]
    mode = "output" if what == "output" else "weight"
    bank.export_peft(tmp_path / "adapter", weights, mode=mode)
    ids = input_ids()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "adapter").eval()
    want = peft_model(ids).logits
    handle = inject_experts(model, bank, mode=mode)
    handle.set_gates(bank.weights_vector(weights).expand(2, 3))
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


@needs_peft
def test_import_peft_adapter_as_expert(base_model, model, tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    pm = get_peft_model(copy.deepcopy(base_model), cfg)
    gen = torch.Generator().manual_seed(3)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    pm.save_pretrained(tmp_path / "peft")
    ids = input_ids()
    want = pm.eval()(ids).logits
    bank = random_bank(model)  # rank 4, alpha 8: the rank-2 adapter is padded and its scale folded
    e = bank.import_peft(tmp_path / "peft", "imported")
    handle = inject_experts(model, bank)
    handle.set_gates(torch.nn.functional.one_hot(torch.tensor([e, e]), 4).float())
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_import_peft_errors(model, tmp_path):  # reading adapter files needs no peft
    bank = random_bank(model)
    with pytest.raises(ExpertBankError, match="adapter_config.json"):
        bank.import_peft(tmp_path, "x")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ExpertBankError, match="pickle files are refused"):
        bank.import_peft(tmp_path, "x")
