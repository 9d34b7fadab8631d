"""Concept metadata carried by a steering bundle: name, kind and steering defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConceptSpec:
    """One steerable concept with its kind and the γ / percentile defaults the API validates."""

    name: str
    kind: str
    default_gamma: float
    gamma_range: tuple[float, float]
    default_percentile: float
    # Detection (content safety) selects S_c at this percentile; None = default_percentile.
    # Kept apart so retuning steering defaults does not move calibrated policy thresholds.
    detection_percentile: float | None = None
    # Detection-gated recipes edit an image while this concept's running centroid score is
    # within this margin (mean cosine) of its kind's best; tuned per kind by `steer eval`.
    default_gate_margin: float = 0.0

    @property
    def detection_pct(self) -> float:
        """The percentile detection uses for this concept."""
        if self.detection_percentile is None:
            return self.default_percentile
        return self.detection_percentile

    def __post_init__(self) -> None:
        """Validate fields so a bad manifest fails at load time, not mid-generation."""
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("concept name must be a non-empty string")
        if not isinstance(self.kind, str) or not self.kind.strip():
            raise ValueError(f"concept {self.name!r}: kind must be a non-empty string")
        if len(self.gamma_range) != 2:
            raise ValueError(
                f"concept {self.name!r}: gamma_range must be (lo, hi), got {self.gamma_range!r}"
            )
        lo, hi = (float(v) for v in self.gamma_range)
        gamma = float(self.default_gamma)
        pct = float(self.default_percentile)
        object.__setattr__(self, "gamma_range", (lo, hi))
        object.__setattr__(self, "default_gamma", gamma)
        object.__setattr__(self, "default_percentile", pct)
        if not all(math.isfinite(v) for v in (lo, hi, gamma, pct)):
            raise ValueError(f"concept {self.name!r}: gamma and percentile values must be finite")
        if not lo <= gamma <= hi:
            raise ValueError(
                f"concept {self.name!r}: default_gamma {gamma} is outside gamma_range [{lo}, {hi}]"
            )
        if not 0.0 <= pct < 100.0:
            raise ValueError(
                f"concept {self.name!r}: default_percentile must be in [0, 100), got {pct}"
            )
        margin = float(self.default_gate_margin)
        object.__setattr__(self, "default_gate_margin", margin)
        if not (math.isfinite(margin) and margin >= 0.0):
            raise ValueError(f"concept {self.name!r}: default_gate_margin must be a finite "
                             f"number ≥ 0, got {margin}")
        if self.detection_percentile is not None:
            det = float(self.detection_percentile)
            object.__setattr__(self, "detection_percentile", det)
            if not 0.0 <= det < 100.0:
                raise ValueError(f"concept {self.name!r}: detection_percentile must be in "
                                 f"[0, 100), got {det}")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (gamma_range as a 2-list)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "default_gamma": self.default_gamma,
            "gamma_range": [self.gamma_range[0], self.gamma_range[1]],
            "default_percentile": self.default_percentile,
            **({} if self.detection_percentile is None
               else {"detection_percentile": self.detection_percentile}),
            **({} if self.default_gate_margin == 0.0
               else {"default_gate_margin": self.default_gate_margin}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConceptSpec:
        """Build from a dict as written by ``to_dict``, naming any missing field."""
        fields = ("name", "kind", "default_gamma", "gamma_range", "default_percentile")
        missing = [f for f in fields if f not in d]
        if missing:
            raise ValueError(f"concept entry {d!r} is missing field(s) {missing}")
        return cls(
            name=d["name"],
            kind=d["kind"],
            default_gamma=d["default_gamma"],
            gamma_range=tuple(d["gamma_range"]),  # type: ignore[arg-type]
            default_percentile=d["default_percentile"],
            detection_percentile=d.get("detection_percentile"),
            default_gate_margin=d.get("default_gate_margin", 0.0),
        )
