"""How suppression edits are applied: the plain SAeUron recipe or gated replacement.

``plain`` is the SAeUron rule as published: where a chosen feature is on, z' = −γ·μ·z, on every
image. ``replace`` (this project's default since bundle format 2, chosen by ``steer eval``) moves
each token from the suppressed concept to the rest of its kind instead of pushing it off the
activation distribution: the concept's chosen features are removed and the mean code of the
kind's other concepts is added, scaled by how strongly the token carried the concept (γ = 1 is
an exact swap, more overshoots). ``gate`` edits an image only while the SAE code says the
concept is there (nearest concept centroid of its kind), so prompts without it are untouched.
``translate`` (bundle format 3) swaps the concept for an anchor concept by a map learned from
paired runs, per feature and step (:mod:`steering.translation`); concepts without a learned swap
fall back to ``replace``; with ``latch`` its gate keeps an image it found with the concept
while the swap turns it into the anchor (steering/gate.py). A bundle names its default in
the manifest; a request may override it (evaluation compares them on the same prompts and
seeds).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from steering.schema import SpecModel, explain

RECIPE_NAMES = ("plain", "replace", "translate")


def _recipe_name(name: Any) -> Any:
    """Refuse a recipe this version does not know, listing the ones it does."""
    if name not in RECIPE_NAMES:
        raise ValueError(f"unknown steering recipe {name!r}; known: {', '.join(RECIPE_NAMES)}")
    return name


def _flag(value: Any) -> bool:
    """Only JSON true/false: a string such as "false" would read as true."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


Flag = Annotated[bool, BeforeValidator(_flag)]


class SteeringRecipe(SpecModel):
    """The suppression rule (``name``) and whether it is detection-gated per image."""

    model_config = ConfigDict(frozen=True)

    name: Annotated[str, BeforeValidator(_recipe_name)] = "plain"
    gate: Flag = False
    # translate + gate: keep editing an image the swap has already turned into the anchor
    # (the gate reads the edited trajectory, which stops looking like the concept)
    latch: Flag = Field(False, exclude_if=lambda v: not v)

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, data: Any) -> Any:
        """The recipe is a JSON object; say what one looks like when it is not."""
        if not isinstance(data, dict | SteeringRecipe):
            raise ValueError('must be an object like {"name": "replace", "gate": true}, got '
                             f"{data!r}")
        return data

    def to_dict(self) -> dict[str, Any]:
        """JSON form (manifest.json, provenance); ``latch`` only when set."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: Any) -> SteeringRecipe:
        """Parse the manifest's ``recipe`` object; ValueError names the bad field."""
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise ValueError(explain(e, "recipe")) from None


PLAIN = SteeringRecipe()
GATED_REPLACE = SteeringRecipe("replace", gate=True)
GATED_TRANSLATE = SteeringRecipe("translate", gate=True, latch=True)
