"""Concept metadata carried by a steering bundle: name, kind and steering defaults."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, ValidationError, model_validator

from steering.schema import SpecModel, explain


def _non_blank(text: str) -> str:
    """Refuse an empty or all-space name (a concept or kind must be addressable)."""
    if not text.strip():
        raise ValueError("must be a non-empty string")
    return text


NonBlank = Annotated[str, AfterValidator(_non_blank)]
Percentile = Annotated[float, Field(ge=0.0, lt=100.0)]


class ConceptSpec(SpecModel):
    """One steerable concept with its kind and the γ / percentile defaults the API validates."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    name: NonBlank
    kind: NonBlank
    default_gamma: float
    gamma_range: tuple[float, float]
    default_percentile: Percentile
    # Detection (content safety) selects S_c at this percentile; None = default_percentile.
    # Kept apart so retuning steering defaults does not move calibrated policy thresholds.
    detection_percentile: Percentile | None = Field(None, exclude_if=lambda v: v is None)
    # Detection-gated recipes edit an image while this concept's running centroid score is
    # within this margin (mean cosine) of its kind's best; tuned per kind by `steer eval`.
    default_gate_margin: float = Field(0.0, ge=0.0, exclude_if=lambda v: v == 0.0)

    @model_validator(mode="after")
    def _gamma_in_range(self) -> ConceptSpec:
        """The default γ must be one a request may ask for."""
        lo, hi = self.gamma_range
        if not lo <= self.default_gamma <= hi:
            raise ValueError(f"concept {self.name!r}: default_gamma {self.default_gamma} is "
                             f"outside gamma_range [{lo}, {hi}]; move it inside or widen "
                             "the range")
        return self

    @property
    def detection_pct(self) -> float:
        """The percentile detection uses for this concept."""
        if self.detection_percentile is None:
            return self.default_percentile
        return self.detection_percentile

    def replace(self, **changes: Any) -> ConceptSpec:
        """A validated copy with ``changes`` applied (``model_copy`` would skip validation)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (gamma_range as a 2-list; unset optional fields left out)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConceptSpec:
        """Build from a dict as written by ``to_dict``; ValueError names the bad field."""
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise ValueError(explain(e, f"concept entry {d!r}")) from None
