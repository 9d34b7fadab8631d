"""How suppression edits are applied: the plain SAeUron recipe or gated replacement.

``plain`` is DESIGN §3 as written: where a chosen feature is on, z' = −γ·μ·z, on every image.
``replace`` (this project's default since bundle format 2, chosen by ``steer eval``) moves each
token from the suppressed concept to the rest of its kind instead of pushing it off the
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

from dataclasses import asdict, dataclass
from typing import Any

RECIPE_NAMES = ("plain", "replace", "translate")


@dataclass(frozen=True)
class SteeringRecipe:
    """The suppression rule (``name``) and whether it is detection-gated per image."""

    name: str = "plain"
    gate: bool = False
    # translate + gate: keep editing an image the swap has already turned into the anchor
    # (the gate reads the edited trajectory, which stops looking like the concept)
    latch: bool = False

    def __post_init__(self) -> None:
        if self.name not in RECIPE_NAMES:
            raise ValueError(f"unknown steering recipe {self.name!r}; known: "
                             f"{', '.join(RECIPE_NAMES)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (manifest.json, provenance); ``latch`` only when set."""
        d = asdict(self)
        if not self.latch:
            del d["latch"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SteeringRecipe:
        """Parse the manifest's ``recipe`` object."""
        if not isinstance(d, dict):
            raise ValueError(f"recipe must be an object like {{\"name\": \"replace\", "
                             f"\"gate\": true}}, got {d!r}")
        gate, latch = d.get("gate", False), d.get("latch", False)
        if not isinstance(gate, bool) or not isinstance(latch, bool):
            raise ValueError(f"recipe gate and latch must be true or false, got {gate!r}, "
                             f"{latch!r}")
        return cls(name=str(d.get("name", "plain")), gate=gate, latch=latch)


PLAIN = SteeringRecipe()
GATED_REPLACE = SteeringRecipe("replace", gate=True)
GATED_TRANSLATE = SteeringRecipe("translate", gate=True, latch=True)
