"""The mixture artifact: how to combine a bank's experts for one target task.

A mixture is a small JSON file (``format: "modecotd-mixture"``, ``format_version: 1``)::

    {"format": "modecotd-mixture", "format_version": 1,
     "target": "price_math", "method": "search", "mode": "weight", "seed": 0,
     "experts": ["word_math", ...],                 # the bank's expert names, in bank order
     "weights": {"word_math": 1.37, ...},           # one weight (gate) per expert
     "bank": {"path": "...", "names": [...], "tensors_sha256": "..."},
     "shots_loss_before": 1.93, "shots_loss_after": 1.41, "evaluations": 41,
     "router": null, "router_sha256": null, "top_k": 0,
     "info": {...}}                                  # method settings and measurements

A router mixture (``method: "router"``) also has ``<name>.router.safetensors`` beside the JSON: one
(E, K) router per wrapped module, keyed by module name. Its gates depend on each token, so its
``weights`` only report the routers' mean gate on the shots; serve it with
``handle.attach_router(load_router_state(m), top_k=m.top_k)``.

Both files are written to temporary names and renamed into place, the JSON last, and the JSON
records the router file's sha256, so a half-written pair is detected on load.

Which "mix" is which: ``engine/mix.py`` finds the gates (the mixing methods, :func:`mix`),
``engine/mixture.py`` saves and loads the result (``Mixture``, the file format), the kernels' op
``lora_mixture`` (``kernels/ops.py``) applies gate rows to the experts inside a layer,
``cli/mix.py`` is the ``mix`` command and ``bench/mix.py`` its benchmark.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .atomic import atomic_save_tensors, atomic_write_text, sha256_file
from .experts import BANK_JSON, ExpertBank

FORMAT = "modecotd-mixture"
FORMAT_VERSION = 1
METHODS = ("search", "gradient", "router", "uniform")
ROUTER_SUFFIX = ".router.safetensors"


class MixtureError(ValueError):
    """A mixture file that cannot be read, or that does not fit the bank it is used with."""


@dataclass
class Mixture:
    """Expert weights (or a router) for one target task.

    Attributes:
        experts: the bank's expert names, in bank order.
        weights: expert name -> weight (the gate value of that expert; router mixtures: mean gate).
        mode: "weight" or "output" composition.
        method: "search", "gradient", "router" or "uniform".
        seed: the seed the method ran with.
        target: the target task's name.
        bank: ``{"path", "names", "tensors_sha256"}`` of the bank the mixture was made with.
        shots_loss_before: mean supervised cross-entropy on the shots with no expert (w = 0).
        shots_loss_after: the same with this mixture.
        evaluations: forward passes over the shots the method spent (training steps for a router).
        router: the router file (``<name>.router.safetensors`` beside the JSON) of a router mixture.
        top_k: the router's top-k (0 = dense softmax).
        info: method settings and measurements (l1, bounds, budget, objective, seconds, ...).
        router_state: in memory only: module name -> (E, K) router, written by ``save_mixture``.
    """

    experts: list[str]
    weights: dict[str, float]
    mode: str
    method: str
    seed: int
    target: str
    bank: dict
    shots_loss_before: float | None
    shots_loss_after: float | None
    evaluations: int | None
    router: Path | None = None
    top_k: int = 0
    info: dict = field(default_factory=dict)
    router_state: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def weight_vector(self, bank: ExpertBank) -> torch.Tensor:
        """(E,) gate vector in ``bank``'s expert order (checks the names first)."""
        check_mixture_bank(self, bank)
        return bank.weights_vector(self.weights)


def router_path_for(json_path: str | Path) -> Path:
    """``dir/name.json`` -> ``dir/name.router.safetensors``."""
    p = Path(json_path)
    stem = p.name[: -len(".json")] if p.name.endswith(".json") else p.name
    return p.with_name(stem + ROUTER_SUFFIX)


def _finite_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def save_mixture(m: Mixture, path: str | Path) -> Path:
    """Write ``m`` as JSON at ``path`` (atomic); a router mixture also writes its router file.

    The router tensors come from ``m.router_state`` (in memory) or, when that is None, are copied
    from the existing file ``m.router``. On return ``m.router`` names the file beside the JSON.

    Returns:
        The JSON path.
    """
    path = Path(path)
    if m.method not in METHODS:
        raise MixtureError(f"method must be one of {METHODS}, got {m.method!r}")
    if m.mode not in ("weight", "output"):
        raise MixtureError(f"mode must be 'weight' or 'output', got {m.mode!r}")
    unknown = sorted(set(m.weights) - set(m.experts))
    if unknown:
        raise MixtureError(f"weights name experts that are not in the mixture's expert list: {unknown}")
    path.parent.mkdir(parents=True, exist_ok=True)
    router_rel, router_sha = None, None
    if m.method == "router":
        state = m.router_state
        if state is None:
            if m.router is None:
                raise MixtureError("a router mixture needs its router tensors (router_state or a router file)")
            state = load_router_state(m)
        if not state:
            raise MixtureError("a router mixture needs at least one router tensor")
        rpath = router_path_for(path)
        atomic_save_tensors(rpath, {k: v.float() for k, v in state.items()},
                            metadata={"format": FORMAT + "-router", "top_k": str(m.top_k)})
        router_rel, router_sha = rpath.name, sha256_file(rpath)
        m.router = rpath
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "target": m.target,
        "method": m.method,
        "mode": m.mode,
        "seed": int(m.seed),
        "experts": list(m.experts),
        "weights": {k: float(v) for k, v in m.weights.items()},
        "bank": dict(m.bank),
        "shots_loss_before": _finite_or_none(m.shots_loss_before),
        "shots_loss_after": _finite_or_none(m.shots_loss_after),
        "evaluations": None if m.evaluations is None else int(m.evaluations),
        "router": router_rel,
        "router_sha256": router_sha,
        "top_k": int(m.top_k),
        "info": m.info,
    }
    return atomic_write_text(path, json.dumps(meta, indent=2) + "\n")


_REQUIRED = {
    "target": str, "method": str, "mode": str, "seed": int, "experts": list, "weights": dict, "bank": dict,
}


def load_mixture(path: str | Path) -> Mixture:
    """Read a mixture JSON file (and check its router file, if any, is present and complete).

    Raises:
        MixtureError: missing file, invalid JSON, wrong format or version, missing or mistyped
            fields, unknown method/mode, weights that are not numbers, or a router file that is
            missing or does not match its recorded sha256. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MixtureError(f"mixture file not found: {path}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MixtureError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise MixtureError(f"{path}: not a mixture file (format {got!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MixtureError(f"{path}: format version {meta.get('format_version')} is not supported "
                           f"(this engine reads version {FORMAT_VERSION})")
    for key, typ in _REQUIRED.items():
        if key not in meta:
            raise MixtureError(f"{path}: missing field {key!r}")
        if not isinstance(meta[key], typ) or (typ is int and isinstance(meta[key], bool)):
            raise MixtureError(f"{path}: field {key!r} must be {typ.__name__}, got {type(meta[key]).__name__}")
    if meta["method"] not in METHODS:
        raise MixtureError(f"{path}: method {meta['method']!r} is not one of {METHODS}")
    if meta["mode"] not in ("weight", "output"):
        raise MixtureError(f"{path}: mode {meta['mode']!r} is not 'weight' or 'output'")
    weights = {}
    for name, w in meta["weights"].items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise MixtureError(f"{path}: weight of expert {name!r} must be a finite number, got {w!r}")
        weights[name] = float(w)
    unknown = sorted(set(weights) - set(meta["experts"]))
    if unknown:
        raise MixtureError(f"{path}: weights name experts not listed in 'experts': {unknown}")
    router = None
    if meta["method"] == "router":
        if not meta.get("router"):
            raise MixtureError(f"{path}: a router mixture must name its router file")
        router = path.with_name(Path(meta["router"]).name)  # always beside the JSON
        if not router.is_file():
            raise MixtureError(f"{path}: router file {router} is missing")
        want = meta.get("router_sha256")
        if want and sha256_file(router) != want:
            raise MixtureError(f"{router} does not match {path.name} (sha256 differs): it was not written completely")
    top_k = meta.get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise MixtureError(f"{path}: top_k must be an int >= 0, got {top_k!r}")
    evaluations = meta.get("evaluations")
    return Mixture(
        experts=list(meta["experts"]),
        weights=weights,
        mode=meta["mode"],
        method=meta["method"],
        seed=int(meta["seed"]),
        target=meta["target"],
        bank=dict(meta["bank"]),
        shots_loss_before=_finite_or_none(meta.get("shots_loss_before")),
        shots_loss_after=_finite_or_none(meta.get("shots_loss_after")),
        evaluations=None if evaluations is None else int(evaluations),
        router=router,
        top_k=top_k,
        info=dict(meta.get("info") or {}),
    )


def load_router_state(m: Mixture) -> dict[str, torch.Tensor]:
    """The router tensors of a router mixture: module name -> (E, K) float32 on CPU."""
    if m.router_state is not None:
        return m.router_state
    if m.router is None:
        raise MixtureError(f"mixture for {m.target!r} (method {m.method!r}) has no router")
    try:
        return load_file(str(m.router))
    except (SafetensorError, OSError) as exc:
        raise MixtureError(f"{m.router}: cannot read router tensors ({exc})") from None


def check_mixture_bank(m: Mixture, bank: ExpertBank, *, bank_dir: str | Path | None = None) -> None:
    """Raise MixtureError unless ``m`` can be used with ``bank``.

    Every expert with a weight must exist in the bank. A router mixture needs the bank's exact
    expert list (its router rows are indexed by expert) and one (E, K) router per bank module.
    With ``bank_dir``, a bank whose tensors changed since the mixture was made (sha256 recorded in
    both JSON files) is refused too: the weights were fitted to other experts.
    """
    missing = [n for n in m.weights if n not in bank.names]
    if missing:
        raise MixtureError(
            f"mixture for {m.target!r} uses experts the bank does not have: {', '.join(missing)} "
            f"(bank experts: {', '.join(bank.names)})"
        )
    if m.method == "router":
        if list(m.experts) != list(bank.names):
            raise MixtureError(
                f"router mixture for {m.target!r} was trained on experts {m.experts}, but the bank has "
                f"{bank.names} (a router needs the same experts in the same order)"
            )
        state = load_router_state(m)
        e = bank.num_experts
        wrong = [f"{mod}: missing" for mod in bank.modules if mod not in state]
        wrong += [f"{mod}: {tuple(state[mod].shape)} != {(e, k)}"
                  for mod, (k, _n) in bank.modules.items() if mod in state and tuple(state[mod].shape) != (e, k)]
        wrong += [f"{mod}: not a bank module" for mod in state if mod not in bank.modules]
        if wrong:
            raise MixtureError(f"router of mixture {m.target!r} does not fit the bank: {'; '.join(wrong[:5])}")
    if bank_dir is not None:
        want = m.bank.get("tensors_sha256")
        jpath = Path(bank_dir) / BANK_JSON
        try:
            have = json.loads(jpath.read_text()).get("tensors_sha256")
        except (OSError, json.JSONDecodeError):
            have = None
        if want and have and want != have:
            raise MixtureError(
                f"mixture for {m.target!r} was made with other expert tensors than {bank_dir} holds now "
                f"(sha256 {want[:12]}... vs {have[:12]}...); mix again for this bank"
            )


def bank_record(bank: ExpertBank, bank_dir: str | Path | None = None) -> dict:
    """The ``bank`` field of a mixture: path, names and the tensors' sha256 (from experts.json)."""
    sha = ""
    if bank_dir is not None:
        try:
            sha = json.loads((Path(bank_dir) / BANK_JSON).read_text()).get("tensors_sha256", "")
        except (OSError, json.JSONDecodeError):
            sha = ""
    return {"path": str(bank_dir) if bank_dir is not None else "", "names": list(bank.names), "tensors_sha256": sha}
