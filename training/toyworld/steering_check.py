"""A quick, judged check that a bundle removes a concept on the toy pipeline.

For each held-out (prompt, seed) that asks for the concept, generate with and without the
suppression edit and let the attribute classifier say whether the concept (and the prompt's
other attributes) are in the image. The full evaluation harness (UA / IRA / CRA against
baselines) is `steer eval`; this is the build's and the tests' sanity check.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from steering.edits import ConceptEdit
from steering.pipeline import GenerationRequest, SteeredPipeline
from training.toyworld.captions import compose
from training.toyworld.classifier import AttributeClassifier
from training.toyworld.world import KINDS, kind_of

CHECK_SEED_BASE = 900_000  # disjoint from the bundle's collection seeds (prompt_sets.py)


def asking_prompts(concept: str, count: int) -> list[tuple[str, dict[str, str]]]:
    """``count`` canonical prompts that ask for ``concept``, cycling the other attributes."""
    kind = kind_of(concept)
    others = {k: v for k, v in KINDS.items() if k != kind}
    prompts = []
    for i in range(count):
        labels = {k: members[(i + j) % len(members)] for j, (k, members) in
                  enumerate(others.items())}
        labels[kind] = concept
        prompts.append((compose(labels["shape"], labels["colour"], labels["background"], 0),
                        labels))
    return prompts


def removal_check(
    steered: SteeredPipeline,
    classifier: AttributeClassifier,
    concept: str,
    count: int = 8,
    steps: int = 20,
    guidance: float = 4.0,
    gamma: float | None = None,
    percentile: float | None = None,
    seed_base: int = CHECK_SEED_BASE,
) -> dict[str, float]:
    """Share of images showing ``concept`` without and with its suppression, and the share
    whose other prompted attributes are kept under steering."""
    edit = ConceptEdit(concept, gamma=gamma, percentile=percentile)
    plain_hits, steered_hits, kept = [], [], []
    for i, (prompt, labels) in enumerate(asking_prompts(concept, count)):
        base = GenerationRequest(prompt=prompt, seed=seed_base + i, steps=steps,
                                 guidance=guidance)
        plain = steered.generate(base).images
        edited = steered.generate(GenerationRequest(**{**base.__dict__, "edits": (edit,)}))
        (p_plain,), (p_edit,) = classifier.predict(plain), classifier.predict(edited.images)
        kind = kind_of(concept)
        plain_hits.append(p_plain[kind] == concept)
        steered_hits.append(p_edit[kind] == concept)
        kept.append(all(p_edit[k] == v for k, v in labels.items() if k != kind))
    return {
        "concept": concept,
        "n": count,
        "present_plain": float(np.mean(plain_hits)),
        "present_steered": float(np.mean(steered_hits)),
        "others_kept_steered": float(np.mean(kept)),
    }


def removal_table(steered: SteeredPipeline, classifier: AttributeClassifier,
                  concepts: Sequence[str], count: int = 8, **kwargs) -> list[dict[str, float]]:
    """:func:`removal_check` for several concepts (the bundle's BUILD.md table)."""
    return [removal_check(steered, classifier, c, count, **kwargs) for c in concepts]

