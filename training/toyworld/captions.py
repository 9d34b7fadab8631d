"""Varied captions for toy-world scenes: attributes mentioned or left out, templates, synonyms.

Variation matters: a text encoder that only ever saw full captions gives partial prompts
and negative prompts no meaning, which would make every baseline meaningless.
"""

from __future__ import annotations

import numpy as np

from training.toyworld.world import SYNONYMS, Scene

MENTION_P = 0.7
SYNONYM_P = 0.3


def _word(concept: str, rng: np.random.Generator, synonym_p: float) -> str:
    """The concept's canonical word, or one of its synonyms with probability ``synonym_p``."""
    options = SYNONYMS.get(concept)
    if options and rng.random() < synonym_p:
        return str(rng.choice(options))
    return concept


def compose(shape: str | None, colour: str | None, background: str | None, template: int) -> str:
    """Caption from the words of the mentioned attributes (None = not mentioned)."""
    noun = shape or "shape"
    if template == 0:
        text = f"a {colour + ' ' if colour else ''}{noun}"
        return text + (f" on a {background} background" if background else "")
    if template == 1:
        text = f"{background} background, " if background else ""
        return text + f"a {colour + ' ' if colour else ''}{noun}"
    text = f"a {noun}"
    text += f" in {colour}" if colour else ""
    return text + (f" with a {background} background" if background else "")


N_TEMPLATES = 3


def caption(
    scene: Scene,
    rng: np.random.Generator,
    mention_p: float = MENTION_P,
    synonym_p: float = SYNONYM_P,
) -> str:
    """A random training caption of ``scene``: each attribute mentioned with p = mention_p."""

    def maybe(concept: str) -> str | None:
        return _word(concept, rng, synonym_p) if rng.random() < mention_p else None

    return compose(
        maybe(scene.shape), maybe(scene.colour), maybe(scene.background),
        int(rng.integers(N_TEMPLATES)),
    )


def canonical_caption(scene: Scene) -> str:
    """The full caption with canonical words and the first template (evaluation prompts)."""
    return compose(scene.shape, scene.colour, scene.background, 0)
