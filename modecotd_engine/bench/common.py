"""What the benchmarks share: the device in words, library versions, a device sync, the load
average, and the random experts the inference and mixing benchmarks run."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def versions(*extra: str) -> dict:
    """python, torch, transformers and each of ``extra`` (None where not installed)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", *extra):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = None
    return out


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# Random experts of the inference and mixing benchmarks. B ~ N(0, B_STD^2): large enough that every
# expert changes the student's greedy text, small enough that the text stays language-like (lengths
# and tokens like a trained expert's).
RANK = 8
ALPHA = 16.0
TARGETS = ("q_proj", "v_proj")
B_STD = 0.01


def random_bank(model, names: list[str], seed: int = 0):
    """An expert bank for ``model`` with random A (the bank's init) and B ~ N(0, B_STD^2)."""
    from ..engine.experts import ExpertBank

    bank = ExpertBank.create(model, names, rank=RANK, alpha=ALPHA, targets=TARGETS, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for m in bank.modules:
        bank.lora_b[m] = torch.randn(bank.lora_b[m].shape, generator=gen) * B_STD
    return bank


# SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M-Instruct config.json): the real shapes of the
# engine's default student, for runs with random weights where no checkpoint may be fetched.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (every byte one token, any text encodes), built in
    memory: ids 0, 1, 2 are <pad>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token=None)


def write_random_student(path: Path, config: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> Path:
    """Write a LlamaForCausalLM with random weights (transformers' own init) and a byte-level tokenizer
    to ``path``: a student ``load_student`` reads, at any architecture's shapes, without a download.

    Args:
        path: directory to create.
        config: LlamaConfig fields (e.g. :data:`SMOLLM2_135M`); ``vocab_size`` defaults to the
            tokenizer's 259 ids, and may be larger (the extra rows are never looked up).
        seed: torch seed of the initialisation.
        dtype: dtype of the saved weights.
        device: where the weights are initialised (a GPU initialises 135M parameters in a blink).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    fields = {"vocab_size": len(tokenizer), **config, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**fields))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
