"""Shared fixtures: a tiny Llama-family student built in the test session (no hub, no real data)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

# Kernel tests run Triton's interpreter on CPU; it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def make_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is one token, any text encodes (the one the
    benchmarks' random-weight students use)."""
    from modecotd_engine.bench.common import byte_tokenizer

    return byte_tokenizer()


def make_tiny_student(path: Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random LlamaForCausalLM (safetensors) plus tokenizer to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_byte_tokenizer()
    cfg = dict(TINY_CONFIG, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory) -> Path:
    """Path to a tiny random Llama student directory (config.json, model.safetensors, tokenizer)."""
    return make_tiny_student(tmp_path_factory.mktemp("tiny_student") / "student")


@pytest.fixture(scope="module")
def student_dir(tiny_student_dir) -> Path:
    """The student a test module's ``base_model`` and ``tokenizer`` load; a module overrides this
    fixture to use a student of its own."""
    return tiny_student_dir


@pytest.fixture(scope="module")
def base_model(student_dir):
    """``student_dir`` loaded with transformers (float32, eval, frozen): the reference model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def tokenizer(student_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(student_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: their matmuls gain nothing from a second
    thread, and on a busy 2-core machine every op waits at the OpenMP barrier for the slower one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_random_bank(model, names, *, seed: int = 0, b_std: float = 0.3, rank: int = 4, alpha: float = 8.0):
    """A bank over ``model``'s q/v projections whose experts all change the model (B ~ N(0, b_std^2);
    a fresh bank's B is zero)."""
    from modecotd_engine.engine.experts import ExpertBank

    bank = ExpertBank.create(model, list(names), rank=rank, alpha=alpha, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for m in bank.modules:
        bank.lora_b[m] = torch.randn(bank.lora_b[m].shape, generator=gen) * b_std
    return bank


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def load_script(path: Path):
    """Import a script that is not part of the package (``benchmarks/*.py``) as a module."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
