"""The toy world's vocabulary: concepts, their kinds, and the synonyms used in captions."""

from __future__ import annotations

from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted")

# Kind name -> the concepts of that kind; a scene carries exactly one concept of each kind.
KINDS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "background": BACKGROUNDS,
}

# Paraphrases seen in training captions (30 % of mentions) and used by robustness tests.
# Importance tables are made from the canonical words only.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "square": ("box",),
    "circle": ("disk",),
    "yellow": ("golden",),
    "dotted": ("spotted",),
}


def kind_of(concept: str) -> str:
    """Return the kind ("shape", "colour", "background") a concept belongs to."""
    for kind, members in KINDS.items():
        if concept in members:
            return kind
    known = ", ".join(c for members in KINDS.values() for c in members)
    raise KeyError(f"unknown toy-world concept {concept!r}; known: {known}")


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image: one concept of each kind plus placement."""

    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    size: float

    def label(self, kind: str) -> str:
        """The concept of ``kind`` in this scene."""
        return {"shape": self.shape, "colour": self.colour, "background": self.background}[kind]

    def label_indices(self) -> tuple[int, int, int]:
        """Class indices (shape, colour, background) for the classifier."""
        return (
            SHAPES.index(self.shape),
            COLOURS.index(self.colour),
            BACKGROUNDS.index(self.background),
        )
