"""Concept edits a request asks for, and their validation against a bundle's concepts."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from steering.concepts import ConceptSpec
from steering.manifest import BundleManifest


class Direction(StrEnum):
    """Suppress removes a concept where its features fire; amplify adds it everywhere."""

    SUPPRESS = "suppress"
    AMPLIFY = "amplify"


class EditError(ValueError):
    """A concept edit the loaded bundle cannot apply; the message says what to change."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ConceptEdit:
    """One requested edit; gamma/percentile None mean the bundle's defaults for the concept."""

    concept: str
    gamma: float | None = None
    percentile: float | None = None
    direction: Direction = Direction.SUPPRESS
    gate_margin: float | None = None  # detection-gated recipes only (evaluation sweeps)
    # applied after every other edit, on the activations they produced, with its own gate: a
    # content policy's always-on suppression holds on the final activations whatever else a
    # request asks for (see steering.hooks.SteeringHook)
    final: bool = False

    @classmethod
    def parse(cls, spec: str) -> ConceptEdit:
        """Parse ``[+|-]name[:gamma[:percentile]]``; a leading ``+`` amplifies, ``-`` suppresses."""
        text = spec.strip()
        direction = Direction.SUPPRESS
        if text[:1] in "+-" and text:
            direction = Direction.AMPLIFY if text[0] == "+" else Direction.SUPPRESS
            text = text[1:]
        parts = text.split(":")
        if not parts[0] or len(parts) > 3:
            raise EditError("concept", f"cannot parse concept edit {spec!r}; use "
                            "[+|-]name[:gamma[:percentile]], e.g. red:20 or +blue:5:99")
        try:
            numbers = [float(p) for p in parts[1:]]
        except ValueError:
            raise EditError(
                "concept", f"gamma and percentile in {spec!r} must be numbers") from None
        return cls(parts[0], *numbers, direction=direction)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ResolvedEdit:
    """An edit with every default filled in and checked against its ConceptSpec."""

    spec: ConceptSpec
    gamma: float
    percentile: float
    direction: Direction
    gate_margin: float = 0.0
    final: bool = False  # applied last, on the other edits' result (ConceptEdit.final)

    @property
    def active(self) -> bool:
        """γ = 0 means "off" in the API (the raw multiplier 0 would zero the features)."""
        return self.gamma != 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON form, as recorded in results and provenance."""
        return {"concept": self.spec.name, "gamma": self.gamma,
                "percentile": self.percentile, "direction": str(self.direction)}


def resolve_edits(edits: list[ConceptEdit], concepts: dict[str, ConceptSpec]) -> list[ResolvedEdit]:
    """Fill defaults and validate every edit; errors name the field and the allowed values."""
    resolved = []
    for edit in edits:
        spec = concepts.get(edit.concept)
        if spec is None:
            known = ", ".join(concepts) or "(none: no steering bundle is loaded)"
            raise EditError("concept", f"unknown concept {edit.concept!r}; known: {known}")
        gamma = spec.default_gamma if edit.gamma is None else float(edit.gamma)
        lo, hi = spec.gamma_range
        if not math.isfinite(gamma) or (gamma != 0.0 and not lo <= gamma <= hi):
            raise EditError("gamma", f"gamma {gamma} for {spec.name!r} is outside its range "
                            f"[{lo}, {hi}] (0 turns the edit off)")
        pct = spec.default_percentile if edit.percentile is None else float(edit.percentile)
        if not 0.0 <= pct < 100.0:
            raise EditError("percentile", f"percentile {pct} for {spec.name!r} must be in [0, 100)")
        margin = spec.default_gate_margin if edit.gate_margin is None else float(edit.gate_margin)
        if not (math.isfinite(margin) and margin >= 0.0):
            raise EditError("gate_margin", f"gate margin {margin} for {spec.name!r} must be ≥ 0")
        resolved.append(ResolvedEdit(spec, gamma, pct, Direction(edit.direction), margin,
                                     bool(edit.final)))
    return resolved


def suppressed_names(edits: Iterable[ResolvedEdit]) -> list[str]:
    """The concepts the active suppressions of ``edits`` remove, in order."""
    return [e.spec.name for e in edits if e.active and e.direction is Direction.SUPPRESS]


def check_closed_kinds(suppressed: Iterable[str], manifest: BundleManifest) -> None:
    """Refuse suppressing every concept of a closed kind: nothing would be left to swap to."""
    gone = set(suppressed)
    for kind in manifest.closed_kinds:
        names = [c.name for c in manifest.concepts if c.kind == kind]
        if names and gone.issuperset(names):
            raise EditError("concepts", f"kind {kind!r} is closed: every image has one of "
                            f"{', '.join(names)}; suppressing all of them leaves no "
                            "counterfactual to swap to — keep at least one")
