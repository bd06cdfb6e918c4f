"""The expert bank: E named LoRA experts over a set of target linear modules of one student.

On disk a bank is a directory with two files:

* ``experts.safetensors``: per target module ``<module>.lora_a`` (E, r, K) and ``<module>.lora_b`` (E, N, r);
* ``experts.json``: names, rank, alpha, targets, the modules and their (K, N), the student's identity,
  the format version and the sha256 of the tensor file (so a half-written pair is detected).

Both files are written to temporary names and renamed into place, the JSON last.

PEFT interop: a PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
imports as one expert, and an expert, a weight-mode merge (``sum_e w_e A_e``, ``sum_e w_e B_e``), or an
output-mode mixture (rank ``E*r`` concatenation, exact) exports as a PEFT adapter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .atomic import atomic_save_tensors, atomic_write_text, sha256_file
from .data import EXPERT_NAME_RE, PROMPT_FORMATS

FORMAT = "modecotd-expert-bank"
FORMAT_VERSION = 1
DEFAULT_TARGETS = ("q_proj", "v_proj")
BANK_JSON = "experts.json"
BANK_TENSORS = "experts.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class ExpertBankError(ValueError):
    """A bank (or adapter) that cannot be read, or that disagrees with the student."""


def check_expert_name(name: str) -> str:
    if not isinstance(name, str) or not EXPERT_NAME_RE.fullmatch(name):
        raise ExpertBankError(
            f"invalid expert name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def target_matches(module_name: str, pattern: str) -> bool:
    """A target pattern matches a module by its last name component, its full name, or a full regex."""
    if module_name == pattern or module_name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, module_name) is not None
    except re.error:
        return False


def find_target_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear]:
    """Every nn.Linear of ``model`` whose name matches one of ``targets`` (sorted by name).

    Modules already wrapped by the injection layer are found through their ``base`` Linear.
    """
    found: dict[str, nn.Linear] = {}
    for name, mod in model.named_modules():
        base = getattr(mod, "base", None) if not isinstance(mod, nn.Linear) else mod
        if isinstance(base, nn.Linear) and any(target_matches(name, t) for t in targets):
            found[name] = base
    if not found:
        raise ExpertBankError(f"no nn.Linear module matches the targets {list(targets)}")
    return dict(sorted(found.items()))


@dataclass
class ExpertBank:
    """E named LoRA experts over target linear modules.

    Args:
        names: expert names, one per expert (index e of the stacked tensors).
        rank: r.
        alpha: LoRA alpha; the scale applied to every expert is alpha / r.
        targets: the target patterns the modules were chosen by.
        modules: module name -> (K in_features, N out_features).
        lora_a: module name -> (E, r, K).
        lora_b: module name -> (E, N, r).
        student: the student's identity (see ``Student.identity``).
        prompt_format: how the experts saw their prompts in training, "plain" or "chat"
            (``data.format_prompt``); generation and mixing default to it. Banks saved before the
            field existed read as "plain".
    """

    names: list[str]
    rank: int
    alpha: float
    targets: tuple[str, ...]
    modules: dict[str, tuple[int, int]]
    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    student: dict = field(default_factory=dict)
    prompt_format: str = "plain"

    def __post_init__(self):
        for n in self.names:
            check_expert_name(n)
        if len(set(self.names)) != len(self.names):
            raise ExpertBankError(f"duplicate expert names in {self.names}")
        if self.rank < 1:
            raise ExpertBankError(f"rank must be >= 1, got {self.rank}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ExpertBankError(f"unknown prompt format {self.prompt_format!r}; expected one of {', '.join(PROMPT_FORMATS)}")
        self.targets = tuple(self.targets)

    # ------------------------------------------------------------------ basics
    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def num_experts(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ExpertBankError(f"unknown expert {name!r}; known experts: {', '.join(self.names)}") from None

    def parameters(self) -> list[torch.Tensor]:
        return [t for m in self.modules for t in (self.lora_a[m], self.lora_b[m])]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())

    @classmethod
    def create(
        cls,
        model: nn.Module,
        names: Sequence[str],
        *,
        rank: int = 8,
        alpha: float = 16.0,
        targets: Sequence[str] = DEFAULT_TARGETS,
        student: Mapping | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        shared_init: bool = True,
        prompt_format: str = "plain",
    ) -> "ExpertBank":
        """A fresh bank over ``model``'s target modules: A Kaiming-uniform (as PEFT), B zero.

        With B zero every expert starts as the identity update, so the student is unchanged.
        ``shared_init`` (default) starts every expert from the same A, as separate PEFT runs from one
        seed do (the paper's experts): weight-mode mixing, ``(sum w B)(sum w A)``, then combines
        experts whose A's share a starting point, so the cross terms ``B_i A_j`` are not products of
        unrelated random projections. False draws an independent A per expert.
        """
        mods = find_target_modules(model, targets)
        device = next(iter(mods.values())).weight.device
        gen = torch.Generator().manual_seed(seed)
        e = len(names)
        lora_a, lora_b, shapes = {}, {}, {}
        for name, lin in mods.items():
            k, n = lin.in_features, lin.out_features
            shapes[name] = (k, n)
            a = _init_a((1, rank, k), gen).expand(e, rank, k) if shared_init else _init_a((e, rank, k), gen)
            lora_a[name] = a.to(device=device, dtype=dtype).contiguous()
            lora_b[name] = torch.zeros(e, n, rank, device=device, dtype=dtype)
        return cls(list(names), rank, float(alpha), tuple(targets), shapes, lora_a, lora_b, dict(student or {}),
                   prompt_format)

    # ---------------------------------------------------------- edit experts
    def add_expert(self, name: str, *, seed: int = 0) -> int:
        """Append a fresh expert (A random, B zero); returns its index."""
        check_expert_name(name)
        if name in self.names:
            raise ExpertBankError(f"expert {name!r} already exists")
        gen = torch.Generator().manual_seed(seed)
        for m, (k, n) in self.modules.items():
            a, b = self.lora_a[m], self.lora_b[m]
            new_a = _init_a((1, self.rank, k), gen).to(a)
            self.lora_a[m] = torch.cat([a.detach(), new_a])
            self.lora_b[m] = torch.cat([b.detach(), torch.zeros(1, n, self.rank).to(b)])
        self.names.append(name)
        return len(self.names) - 1

    def remove_expert(self, name: str) -> None:
        e = self.index(name)
        if self.num_experts == 1:
            raise ExpertBankError("cannot remove the only expert of a bank")
        keep = [i for i in range(self.num_experts) if i != e]
        for m in self.modules:
            self.lora_a[m] = self.lora_a[m].detach()[keep].clone()
            self.lora_b[m] = self.lora_b[m].detach()[keep].clone()
        del self.names[e]

    def rename_expert(self, old: str, new: str) -> None:
        e = self.index(old)
        check_expert_name(new)
        if new in self.names:
            raise ExpertBankError(f"expert {new!r} already exists")
        self.names[e] = new

    def weights_vector(self, weights: Mapping[str, float] | Sequence[str] | str) -> torch.Tensor:
        """(E,) gate vector from {name: weight}, a list of names (equal weights), or one name."""
        if isinstance(weights, str):
            weights = [weights]
        if not isinstance(weights, Mapping):
            names = list(weights)
            if not names:
                raise ExpertBankError("no experts named")
            weights = {n: 1.0 / len(names) for n in names}
        vec = torch.zeros(self.num_experts)
        for n, w in weights.items():
            vec[self.index(n)] = float(w)
        return vec

    # ---------------------------------------------------------------- I/O
    def save(self, directory: str | Path) -> Path:
        """Write ``experts.safetensors`` then ``experts.json`` atomically into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for m in self.modules:
            tensors[f"{m}.lora_a"] = self.lora_a[m]
            tensors[f"{m}.lora_b"] = self.lora_b[m]
        atomic_save_tensors(d / BANK_TENSORS, tensors, metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "names": self.names,
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "modules": {m: list(s) for m, s in self.modules.items()},
            "student": self.student,
            "prompt_format": self.prompt_format,
            "dtype": str(next(iter(self.lora_a.values())).dtype).replace("torch.", ""),
            "tensors_sha256": sha256_file(d / BANK_TENSORS),
        }
        atomic_write_text(d / BANK_JSON, json.dumps(meta, indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path, *, student=None, device=None) -> "ExpertBank":
        """Read a bank directory; with ``student`` given, check it matches (raises on disagreement)."""
        d = Path(directory)
        if not d.is_dir():
            raise ExpertBankError(f"expert bank directory not found: {d}")
        jpath, tpath = d / BANK_JSON, d / BANK_TENSORS
        for p in (jpath, tpath):
            if not p.is_file():
                raise ExpertBankError(f"expert bank {d} has no {p.name}")
        try:
            meta = json.loads(jpath.read_text())
        except json.JSONDecodeError as exc:
            raise ExpertBankError(f"{jpath}: invalid JSON ({exc})") from None
        if meta.get("format") != FORMAT:
            raise ExpertBankError(f"{jpath}: not an expert bank (format {meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ExpertBankError(
                f"{jpath}: format version {meta.get('format_version')} is not supported "
                f"(this engine reads version {FORMAT_VERSION})"
            )
        want = meta.get("tensors_sha256")
        if want and sha256_file(tpath) != want:
            raise ExpertBankError(
                f"{tpath} does not match {jpath.name} (sha256 differs): the bank was not written completely"
            )
        try:
            tensors = load_file(str(tpath), device=str(device) if device is not None else "cpu")
        except (SafetensorError, OSError) as exc:
            raise ExpertBankError(f"{tpath}: cannot read tensors ({exc})") from None
        names, r = list(meta["names"]), int(meta["rank"])
        e = len(names)
        modules = {m: (int(s[0]), int(s[1])) for m, s in meta["modules"].items()}
        lora_a, lora_b = {}, {}
        for m, (k, n) in modules.items():
            for key, shape in ((f"{m}.lora_a", (e, r, k)), (f"{m}.lora_b", (e, n, r))):
                if key not in tensors:
                    raise ExpertBankError(f"{tpath}: tensor {key} is missing")
                if tuple(tensors[key].shape) != shape:
                    raise ExpertBankError(
                        f"{tpath}: tensor {key} has shape {tuple(tensors[key].shape)}, expected {shape}"
                    )
            lora_a[m], lora_b[m] = tensors[f"{m}.lora_a"], tensors[f"{m}.lora_b"]
        bank = cls(names, r, float(meta["alpha"]), tuple(meta["targets"]), modules, lora_a, lora_b,
                   dict(meta.get("student", {})), str(meta.get("prompt_format", "plain")))
        if student is not None:
            bank.check_student(student)
        return bank

    def check_student(self, student) -> None:
        """Raise ExpertBankError listing every way this bank disagrees with ``student``.

        ``student`` is a Student (``.model`` and ``.identity``) or a bare nn.Module.
        """
        if isinstance(student, nn.Module):
            model, identity = student, {}
        else:
            model, identity = student.model, getattr(student, "identity", None) or {}
        problems = []
        for key in ("model_type", "hidden_size", "num_layers", "vocab_size"):
            mine, theirs = self.student.get(key), identity.get(key)
            if mine is not None and theirs is not None and mine != theirs:
                problems.append(f"student {key}: bank has {mine}, student has {theirs}")
        linears = {n: getattr(m, "base", m) for n, m in model.named_modules()}
        for m, (k, n) in self.modules.items():
            lin = linears.get(m)
            if not isinstance(lin, nn.Linear):
                problems.append(f"module {m}: not an nn.Linear in the student")
            elif (lin.in_features, lin.out_features) != (k, n):
                problems.append(
                    f"module {m}: bank has (in={k}, out={n}), student has "
                    f"(in={lin.in_features}, out={lin.out_features})"
                )
        if problems:
            shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise ExpertBankError(f"expert bank does not match the student: {shown}")

    # ---------------------------------------------------------------- PEFT
    def import_peft(self, adapter_dir: str | Path, name: str) -> int:
        """Add a PEFT LoRA adapter as expert ``name``; returns its index.

        The adapter's rank may be lower than the bank's (zero-padded, exact); its scale
        (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) is folded into B so the expert reproduces it.
        """
        check_expert_name(name)
        if name in self.names:
            raise ExpertBankError(f"expert {name!r} already exists")
        cfg, weights = read_peft_adapter(adapter_dir)
        r = int(cfg["r"])
        if r > self.rank:
            raise ExpertBankError(f"{adapter_dir}: adapter rank {r} exceeds the bank's rank {self.rank}")
        peft_scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        fold = peft_scale / self.scale
        unknown = sorted(set(weights) - set(self.modules))
        if unknown:
            raise ExpertBankError(
                f"{adapter_dir}: adapter targets modules the bank does not have: {', '.join(unknown[:5])}"
            )
        for m, (k, n) in self.modules.items():
            a = torch.zeros(1, self.rank, k)
            b = torch.zeros(1, n, self.rank)
            if m in weights:
                pa, pb = weights[m]
                if tuple(pa.shape) != (r, k) or tuple(pb.shape) != (n, r):
                    raise ExpertBankError(
                        f"{adapter_dir}: {m} has lora_A {tuple(pa.shape)} / lora_B {tuple(pb.shape)}, "
                        f"expected ({r}, {k}) / ({n}, {r})"
                    )
                a[0, :r] = pa.float()
                b[0, :, :r] = pb.float() * fold
            ref_a, ref_b = self.lora_a[m], self.lora_b[m]
            self.lora_a[m] = torch.cat([ref_a.detach(), a.to(ref_a)])
            self.lora_b[m] = torch.cat([ref_b.detach(), b.to(ref_b)])
        self.names.append(name)
        return len(self.names) - 1

    def export_peft(
        self,
        out_dir: str | Path,
        weights: Mapping[str, float] | Sequence[str] | str,
        *,
        mode: str = "weight",
        base_model: str = "",
    ) -> Path:
        """Write an expert or a mixture as a PEFT LoRA adapter directory.

        Args:
            weights: one expert name, a list (equal weights) or {name: weight}.
            mode: "weight": A = sum_e w_e A_e, B = sum_e w_e B_e at rank r (LoraHub-style merge);
                  "output": rank E*r with A the stacked A_e and B the side-by-side w_e B_e, which
                  reproduces sum_e w_e B_e A_e exactly.
        """
        w = self.weights_vector(weights)
        active = [i for i in range(self.num_experts) if w[i] != 0] or [0]
        tensors, r_out = {}, self.rank
        alpha_out = self.alpha
        for m in self.modules:
            a, b = self.lora_a[m].detach().float().cpu(), self.lora_b[m].detach().float().cpu()
            if mode == "weight":
                pa = torch.einsum("e,erk->rk", w, a)
                pb = torch.einsum("e,enr->nr", w, b)
            elif mode == "output":
                pa = torch.cat([a[i] for i in active])  # (E'*r, K)
                pb = torch.cat([w[i] * b[i] for i in active], dim=1)  # (N, E'*r)
                r_out = self.rank * len(active)
                alpha_out = self.alpha * len(active)  # keeps lora_alpha / r_out == alpha / r
            else:
                raise ExpertBankError(f"mode must be 'weight' or 'output', got {mode!r}")
            tensors[f"{_PEFT_PREFIX}{m}.lora_A.weight"] = pa.contiguous()
            tensors[f"{_PEFT_PREFIX}{m}.lora_B.weight"] = pb.contiguous()
        cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": r_out,
            "lora_alpha": alpha_out,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "inference_mode": True,
            "target_modules": sorted(self.modules),
            "base_model_name_or_path": base_model or self.student.get("name", ""),
        }
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(d / PEFT_WEIGHTS, tensors, metadata={"format": "pt"})
        atomic_write_text(d / PEFT_CONFIG, json.dumps(cfg, indent=2) + "\n")
        return d


def _init_a(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    # Kaiming-uniform with a=sqrt(5) on a (r, K) matrix, as nn.Linear and PEFT do: bound = 1/sqrt(K).
    bound = 1.0 / math.sqrt(shape[-1])
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def read_peft_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read a PEFT LoRA adapter: (config, {module name: (lora_A (r, K), lora_B (N, r))})."""
    d = Path(adapter_dir)
    cpath, wpath = d / PEFT_CONFIG, d / PEFT_WEIGHTS
    if not cpath.is_file():
        raise ExpertBankError(f"{d}: no {PEFT_CONFIG} (not a PEFT adapter directory)")
    if not wpath.is_file():
        if (d / "adapter_model.bin").is_file():
            raise ExpertBankError(f"{d}: only adapter_model.bin found; pickle files are refused, save with safetensors")
        raise ExpertBankError(f"{d}: no {PEFT_WEIGHTS}")
    try:
        cfg = json.loads(cpath.read_text())
    except json.JSONDecodeError as exc:
        raise ExpertBankError(f"{cpath}: invalid JSON ({exc})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ExpertBankError(f"{cpath}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("fan_in_fan_out"):
        raise ExpertBankError(f"{cpath}: fan_in_fan_out adapters are not supported")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ExpertBankError(f"{cpath}: missing {key!r}")
    try:
        raw = load_file(str(wpath))
    except (SafetensorError, OSError) as exc:
        raise ExpertBankError(f"{wpath}: cannot read tensors ({exc})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    pat = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    for key, t in raw.items():
        mt = pat.match(key)
        if not mt:
            raise ExpertBankError(f"{wpath}: unexpected tensor {key} (only LoRA A/B weights are supported)")
        pairs.setdefault(mt.group(1), {})[mt.group(2)] = t
    out = {}
    for m, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ExpertBankError(f"{wpath}: module {m} lacks lora_{'B' if 'A' in ab else 'A'}")
        out[m] = (ab["A"], ab["B"])
    return cfg, out
