"""Injection: wrap a student's target linear modules so one call sets the gates for every layer.

Each target ``nn.Linear`` is replaced by a :class:`MixtureLinear` that keeps the frozen Linear as
``base`` and the bank's stacked LoRA tensors of that module, and calls
:func:`modecotd_engine.kernels.lora_mixture`. All wrapped layers of a model share one
:class:`GateState`, so ``handle.set_gates(g)`` once per batch routes every layer:

* ``g`` (B, E): one gate row per sequence, broadcast over its tokens;
* ``g`` (B, L, E): one gate row per token;
* ``None`` (or an all-zero gate that needs no gradient): the frozen Linear runs alone, so the
  model's logits are exactly the student's.

A layer may also carry a learned router ``R`` (E, K) (``handle.attach_router``): while it is
attached, the layer computes its own per-token gates ``softmax(R x)`` (optionally top-k) through
:func:`modecotd_engine.kernels.router.routed_lora_mixture` and ignores the shared gates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..kernels import lora_mixture, lora_single_expert
from ..kernels import MODES
from ..kernels.router import routed_lora_mixture
from .experts import ExpertBank, ExpertBankError


# A fresh router's logits have this standard deviation for unit-variance inputs: small enough that
# the gates start near uniform (every expert gets gradient), large enough to break the symmetry.
ROUTER_INIT_STD = 0.1


_UNSET = object()


class GateState:
    """Gates shared by every wrapped layer of one model.

    Attributes:
        gates: (B, E) per sequence, (B, L, E) per token, or None (the frozen student).
        mode: "output" or "weight" composition.
        backend: kernel backend for :func:`lora_mixture`.
        row_modes: None (every row composes by ``mode``) or the composition of each of the B rows
            (set with the gates, ``MixtureHandle.set_gates(gates, modes=...)``); rows of the two
            modes go through the kernel as two sub-batches (:meth:`split`).
    """

    def __init__(self, gates: torch.Tensor | None = None, mode: str = "output", backend: str = "auto"):
        self.gates = gates
        self.mode = mode
        self.backend = backend

    @property
    def gates(self) -> torch.Tensor | None:
        return self._gates

    @gates.setter
    def gates(self, gates: torch.Tensor | None) -> None:
        self._gates = gates
        self._single = _UNSET  # analysed on first use, once for all layers
        self.row_modes = None

    @property
    def row_modes(self) -> tuple[str, ...] | None:
        return self._row_modes

    @row_modes.setter
    def row_modes(self, modes: Sequence[str] | None) -> None:
        self._row_modes = None if modes is None else tuple(modes)
        self._rows = _UNSET  # analysed on first use, once for all layers

    def split(self) -> tuple[str, None] | tuple[None, tuple[torch.Tensor, torch.Tensor]]:
        """``(mode, None)`` when every row composes alike (the model-wide mode, or the one mode all
        ``row_modes`` name), else ``(None, (weight rows, output rows))`` as index tensors."""
        modes = self._row_modes
        if modes is None:
            return self.mode, None
        if self._rows is _UNSET:
            self._rows = None
            if len(set(modes)) > 1:
                device = self._gates.device if self._gates is not None else None
                rows = {m: torch.tensor([i for i, x in enumerate(modes) if x == m], device=device) for m in MODES}
                self._rows = (rows["weight"], rows["output"])
        return (modes[0], None) if self._rows is None else (None, self._rows)

    def single_expert(self) -> tuple[int, float] | None:
        """(e, g) when every gate row is the same one-hot row g * e_e and needs no gradient, else None.

        That is a distillation batch (one task per batch): each layer is then one plain LoRA. The
        gates are read once (one host sync) per assignment, not once per layer.
        """
        if self._single is _UNSET:
            self._single = _single_expert(self._gates)
        return self._single


def _single_expert(gates: torch.Tensor | None) -> tuple[int, float] | None:
    if gates is None or gates.requires_grad or gates.numel() == 0:
        return None
    rows = gates.reshape(-1, gates.shape[-1])
    first = rows[0]
    nz = first.nonzero()
    if nz.numel() != 1 or not bool((rows == first).all()):
        return None
    e = int(nz[0, 0])
    return e, float(first[e])


class MixtureLinear(nn.Module):
    """A frozen Linear plus E gated LoRA experts.

    Args:
        base: the frozen nn.Linear (N, K).
        lora_a: (E, r, K) parameter shared with the bank.
        lora_b: (E, N, r) parameter shared with the bank.
        scale: alpha / r.
        state: the model-wide gate state.
    """

    def __init__(self, base: nn.Linear, lora_a: nn.Parameter, lora_b: nn.Parameter, scale: float,
                 state: GateState):
        super().__init__()
        self.base = base
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scale = scale
        self.state = state
        self.register_parameter("router", None)  # (E, K) while a router is attached
        self.top_k = 0

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is not None:
            return routed_lora_mixture(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, self.router,
                                       self.scale, top_k=self.top_k, mode=self.state.mode,
                                       backend=self.state.backend)
        g = self.state.gates
        if g is None:
            return self.base(x)
        if g.dim() == x.dim() - 1:
            g = g.unsqueeze(-2).expand(*x.shape[:-1], g.shape[-1])  # (B, E) -> (B, L, E)
        elif tuple(g.shape[:-1]) != tuple(x.shape[:-1]):
            raise ValueError(
                f"gates of shape {tuple(g.shape)} do not fit activations {tuple(x.shape)}: "
                "give (B, E) per sequence or (B, L, E) per token"
            )
        mode, rows = self.state.split()
        if rows is not None:  # rows of both compositions: one sub-batch each, the rows put back in place
            if x.dim() < 3 or x.shape[0] != len(self.state.row_modes):
                raise ValueError(f"{len(self.state.row_modes)} row modes do not fit activations {tuple(x.shape)}")
            out = x.new_empty(*x.shape[:-1], self.out_features)
            for m, idx in zip(("weight", "output"), rows):
                out[idx] = lora_mixture(x[idx], self.base.weight, self.base.bias, self.lora_a, self.lora_b, g[idx],
                                        self.scale, mode=m, backend=self.state.backend)
            return out
        # One task for the whole batch (distillation): one plain LoRA, the gates read once per batch.
        # Not on CUDA: that read is a device sync, and the Triton kernels skip idle experts per tile.
        if x.device.type != "cuda" and (single := self.state.single_expert()) is not None:
            return lora_single_expert(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, single[0],
                                      single[1], self.scale, mode=mode, backend=self.state.backend)
        return lora_mixture(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, g,
                            self.scale, mode=mode, backend=self.state.backend)

    def extra_repr(self) -> str:
        e, r, _ = self.lora_a.shape
        routed = "" if self.router is None else f", router top_k={self.top_k}"
        return f"in={self.in_features}, out={self.out_features}, experts={e}, rank={r}, scale={self.scale:g}{routed}"


class MixtureHandle:
    """The injected model's controls: gates, mode, LoRA parameters, and removal."""

    def __init__(self, model: nn.Module, bank: ExpertBank, layers: dict[str, MixtureLinear], state: GateState):
        self.model = model
        self.bank = bank
        self.layers = layers
        self.state = state

    def set_gates(self, gates: torch.Tensor | None, modes: Sequence[str] | None = None) -> None:
        """Set the gates every wrapped layer uses: (B, E), (B, L, E) or None; ``modes``: the
        composition of each of the B rows ("output" / "weight"), or None for the handle's mode."""
        if gates is None:
            self.state.gates = None
            return
        e = self.bank.num_experts
        if gates.dim() not in (2, 3) or gates.shape[-1] != e:
            raise ValueError(f"gates must be (B, {e}) or (B, L, {e}), got {tuple(gates.shape)}")
        if modes is not None:
            modes = tuple(modes)
            if len(modes) != gates.shape[0]:
                raise ValueError(f"{len(modes)} row modes for {gates.shape[0]} gate rows")
            bad = sorted(set(modes) - set(MODES))
            if bad:
                raise ValueError(f"unknown composition mode(s) {bad}; expected {' or '.join(MODES)}")
        if not gates.requires_grad and not bool(gates.any()):
            self.state.gates = None  # all zero: the frozen path, bit-exact
            return
        device = self.bank.lora_a[next(iter(self.bank.modules))].device
        self.state.gates = gates.to(device)
        self.state.row_modes = modes

    @contextmanager
    def gated(self, gates: torch.Tensor | None, modes: Sequence[str] | None = None) -> Iterator[None]:
        previous, previous_modes = self.state.gates, self.state.row_modes
        self.set_gates(gates, modes)
        try:
            yield
        finally:
            self.state.gates = previous
            self.state.row_modes = previous_modes

    @contextmanager
    def restoring(self) -> Iterator[None]:
        """Give the handle back on exit as it was on entry: its mode, its gates and its routers (a
        copy of each, at the same top-k; none if it had none), whatever the body changed."""
        mode, gates, row_modes = self.state.mode, self.state.gates, self.state.row_modes
        routers = self.router_state() if self.has_router else None
        top_k = next(iter(self.layers.values())).top_k
        try:
            yield
        finally:
            self.detach_router()
            if routers is not None:
                self.attach_router(routers, top_k=top_k)
            self.state.mode, self.state.gates = mode, gates
            self.state.row_modes = row_modes

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.state.mode = mode

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_a, layer.lora_b)]

    # ----------------------------------------------------------------- router
    def attach_router(
        self,
        weights: Mapping[str, torch.Tensor] | None = None,
        *,
        top_k: int = 0,
        trainable: bool = False,
        seed: int = 0,
        init_std: float = ROUTER_INIT_STD,
    ) -> list[nn.Parameter]:
        """Give every wrapped layer a router (E, K); the layers then compute their own gates.

        Args:
            weights: module name -> (E, K) router for EVERY wrapped module (e.g. a saved
                ``router_state()``), or None for a fresh router: N(0, init_std^2 / K) entries, so the
                logits start near zero and the gates near uniform whatever the hidden size.
            top_k: 0 for dense softmax gates, k in 1..E to keep the k largest per token.
            trainable: routers require grad (the experts keep their own requires_grad).
            seed: seed of the fresh routers.
            init_std: standard deviation of a fresh router's logits for unit-variance inputs.
        Returns:
            The router parameters, in the order of ``self.layers``.
        """
        e = self.bank.num_experts
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= e:
            raise ValueError(f"top_k must be an int in 0..{e} (0 = dense softmax), got {top_k!r}")
        if weights is not None:
            unknown = sorted(set(weights) - set(self.layers))
            missing = sorted(set(self.layers) - set(weights))
            if unknown or missing:
                raise ValueError(
                    "router weights must cover exactly the wrapped modules: "
                    + "; ".join(x for x in (f"unknown modules {unknown[:4]}" if unknown else "",
                                            f"missing modules {missing[:4]}" if missing else "") if x)
                )
        gen = torch.Generator().manual_seed(seed)
        params = {}
        for name, layer in self.layers.items():  # validate every router before attaching any
            k = layer.in_features
            if weights is None:
                t = torch.randn(e, k, generator=gen) * (init_std / math.sqrt(k))
            else:
                t = weights[name]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != (e, k) or not t.is_floating_point():
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"router for module {name} must be a float tensor (E={e}, K={k}), got {got}")
            params[name] = nn.Parameter(t.detach().to(device=layer.lora_a.device, dtype=layer.lora_a.dtype).clone(),
                                        requires_grad=trainable)
        for name, p in params.items():
            self.layers[name].router, self.layers[name].top_k = p, top_k
        return list(params.values())

    def detach_router(self) -> None:
        """Remove the routers: the layers go back to the shared gates."""
        for layer in self.layers.values():
            layer.router, layer.top_k = None, 0

    @property
    def has_router(self) -> bool:
        return any(layer.router is not None for layer in self.layers.values())

    def router_parameters(self) -> list[nn.Parameter]:
        return [layer.router for layer in self.layers.values() if layer.router is not None]

    def router_state(self) -> dict[str, torch.Tensor]:
        """Module name -> a detached CPU copy of its router (E, K); empty when none is attached."""
        return {name: layer.router.detach().cpu().clone()
                for name, layer in self.layers.items() if layer.router is not None}

    def remove(self) -> nn.Module:
        """Put the frozen Linears back; returns the model."""
        for name, layer in self.layers.items():
            parent, child = _parent(self.model, name)
            setattr(parent, child, layer.base)
        self.layers = {}
        return self.model


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def inject_experts(
    model: nn.Module,
    bank: ExpertBank,
    *,
    mode: str = "output",
    backend: str = "auto",
    trainable: bool = False,
) -> MixtureHandle:
    """Wrap ``bank.modules`` of ``model`` with MixtureLinear layers sharing one gate state.

    The bank's tensors are moved to the model's device and become the layers' parameters (the bank
    dicts hold the same objects, so ``bank.save`` writes what was trained). Base weights stay frozen.

    Args:
        model: the student (its target modules must match the bank; checked).
        bank: the expert bank.
        mode: "output" or "weight" composition.
        backend: kernel backend for :func:`lora_mixture`.
        trainable: LoRA tensors require grad.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    bank.check_student(model)
    state = GateState(mode=mode, backend=backend)
    layers: dict[str, MixtureLinear] = {}
    for name in bank.modules:
        parent, child = _parent(model, name)
        base = getattr(parent, child)
        if isinstance(base, MixtureLinear):
            raise ExpertBankError(f"module {name} already carries experts; remove the earlier injection first")
        device = base.weight.device
        a = nn.Parameter(bank.lora_a[name].detach().to(device), requires_grad=trainable)
        b = nn.Parameter(bank.lora_b[name].detach().to(device), requires_grad=trainable)
        bank.lora_a[name], bank.lora_b[name] = a, b
        layer = MixtureLinear(base, a, b, bank.scale, state)
        setattr(parent, child, layer)
        layers[name] = layer
    return MixtureHandle(model, bank, layers, state)
