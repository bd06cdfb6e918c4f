"""What a request runs with: a :class:`Selection` (gate row, composition mode, router) made from
how the request names it: nothing (the frozen student), an expert spec (``"gsm8k"``,
``"gsm8k,svamp"``, ``"gsm8k=0.7,svamp=0.3"``) or a mixture file.

``infer``, ``eval`` and ``serve`` all turn their requests into selections here; generation
(``generate.py``, ``decoder.py``) then serves each selection's gate row.
:class:`GenerationError`, the error of a request that cannot be served, is defined here, the lowest
module of generation, and re-exported by ``generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .experts import ExpertBank


class GenerationError(ValueError):
    """A request that cannot be served (empty prompt, too long, bad gates or expert spec)."""


def parse_expert_spec(spec: str, bank: ExpertBank) -> torch.Tensor:
    """Gate vector (E,) from an expert spec.

    ``"gsm8k"`` is one expert with weight 1; ``"gsm8k,svamp"`` gives the listed experts equal
    weights summing to 1 (as ``ExpertBank.weights_vector`` does for a list); ``"gsm8k=0.7,svamp=0.3"``
    gives explicit weights (any real number, negative included, as the mixing search produces).

    Args:
        spec: the spec text.
        bank: the bank whose expert names the spec refers to.

    Returns:
        (E,) float32 gate vector in the bank's expert order.

    Raises:
        GenerationError: an empty piece, a weight that does not parse, a name given twice, or weights
            on some experts but not on others.
        ExpertBankError: an unknown expert name (the message lists the known ones).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise GenerationError("empty expert spec: name one or more experts, e.g. 'gsm8k' or 'gsm8k=0.7,svamp=0.3'")
    pieces = [p.strip() for p in spec.split(",")]
    names: list[str] = []
    weights: list[float | None] = []
    for piece in pieces:
        if not piece:
            raise GenerationError(f"expert spec {spec!r} has an empty piece (a stray comma?)")
        name, eq, w = piece.partition("=")
        name = name.strip()
        if not name:
            raise GenerationError(f"expert spec piece {piece!r} has no expert name")
        if eq:
            try:
                value = float(w.strip())
            except ValueError:
                raise GenerationError(
                    f"expert spec piece {piece!r}: weight {w.strip()!r} is not a number"
                ) from None
            if value != value or value in (float("inf"), float("-inf")):
                raise GenerationError(f"expert spec piece {piece!r}: weight must be finite")
            weights.append(value)
        else:
            weights.append(None)
        if name in names:
            raise GenerationError(f"expert spec {spec!r} names {name!r} twice")
        bank.index(name)  # raises with the known names
        names.append(name)
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise GenerationError(
            f"expert spec {spec!r}: give a weight to every expert ('a=0.7,b=0.3') or to none ('a,b')"
        )
    if all(given):
        return bank.weights_vector(dict(zip(names, weights)))
    return bank.weights_vector(names)


@dataclass
class Selection:
    """What one request runs with.

    Attributes:
        gate: (E,) gate row (zeros: the frozen student); None when no bank is loaded.
        mode: composition, "output" or "weight".
        label: how the request named it (for output records and messages).
        router: a router mixture (served in its own group), else None.
    """

    gate: torch.Tensor | None
    mode: str
    label: str
    router: object | None = None

    @property
    def group(self) -> tuple:
        """Requests of one group can decode in one batch: ``(None, None)`` for every gate row, in
        either composition (each row carries its own mode); a router is model-wide, and so is the
        composition its gates use, so a router mixture is ``(mode, router file)``."""
        return (None, None) if self.router is None else (self.mode, str(self.router.router))


def frozen_selection(bank: ExpertBank | None) -> Selection:
    """The frozen student: a zero gate row (no gate at all without a bank)."""
    return Selection(None if bank is None else torch.zeros(bank.num_experts), "output", "frozen student")


def spec_selection(spec: str, bank: ExpertBank, mode: str | None) -> Selection:
    """An expert spec (``parse_expert_spec``), output composition unless ``mode`` says otherwise."""
    return Selection(parse_expert_spec(spec, bank), mode or "output", spec)


def mixture_selection(path: str, bank: ExpertBank, bank_dir: str | None, mode: str | None) -> Selection:
    """A mixture file, checked against ``bank``; its own mode unless ``mode`` overrides it."""
    from .mixture import check_mixture_bank, load_mixture

    m = load_mixture(path)
    check_mixture_bank(m, bank, bank_dir=bank_dir)
    if m.method == "router":
        return Selection(None, mode or m.mode, str(path), router=m)
    return Selection(m.weight_vector(bank), mode or m.mode, str(path))


__all__ = [
    "GenerationError",
    "Selection",
    "frozen_selection",
    "mixture_selection",
    "parse_expert_spec",
    "spec_selection",
]
