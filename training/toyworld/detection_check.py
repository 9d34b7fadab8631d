"""Calibrating and judging detection thresholds on the toy world (pure: no generation here).

A detection rule flags an image when its concept's detection score reaches the rule's
threshold; the truth is whether the image's prompt asks for the concept. The prompts are
every shape × colour × background in the caption templates plus each shape × background
naming no colour, two images (seed, seed + 1) per prompt:

- ``detection_prompts(seed_base, all_templates=True)``: each of the 48 combinations in all
  three templates (288 images) + 12 prompts naming no colour (24 images) = 312 images, the
  scheme the shipped policy's thresholds were chosen with (seeds 1_100_000+) and measured on
  (held-out seeds 1_200_000+);
- ``detection_prompts(seed_base)``: the subset with one template per combination (template
  ``i % 3``, the same seeds as in the full set): 96 + 24 = 120 images, what
  tests/service/test_policy_quality.py checks.

``choose_threshold`` is the calibration rule (policies/toy.toml, docs/serving.md); the
generation around it is bench/policy_calibration.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from training.toyworld.captions import N_TEMPLATES, compose
from training.toyworld.world import BACKGROUNDS, COLOURS, SHAPES, kind_of

IMAGES_PER_PROMPT = 2  # seed and seed + 1
CALIBRATION_SEED_BASE = 1_100_000
HELDOUT_SEED_BASE = 1_200_000
NO_COLOUR_OFFSET = 500  # the no-colour prompts' seeds start at seed_base + 500


def detection_prompts(seed_base: int, all_templates: bool = False
                      ) -> list[tuple[str, dict[str, str], int]]:
    """(prompt, the concepts it asks for, seed of its first image): every shape × colour ×
    background (combination ``i``) in template ``i % 3`` — or in every template when
    ``all_templates`` — with seed ``seed_base + (3 i + template) · 2``, then each shape ×
    background naming no colour (template 0, seed ``seed_base + 500 + 2 j``). Each prompt
    is generated with two images (seeds seed and seed + 1)."""
    prompts = []
    for i, (shape, colour, background) in enumerate(
            itertools.product(SHAPES, COLOURS, BACKGROUNDS)):
        templates = range(N_TEMPLATES) if all_templates else (i % N_TEMPLATES,)
        for template in templates:
            prompts.append((compose(shape, colour, background, template),
                            {"shape": shape, "colour": colour, "background": background},
                            seed_base + (N_TEMPLATES * i + template) * IMAGES_PER_PROMPT))
    for i, (shape, background) in enumerate(itertools.product(SHAPES, BACKGROUNDS)):
        prompts.append((compose(shape, None, background, 0),
                        {"shape": shape, "background": background},
                        seed_base + NO_COLOUR_OFFSET + IMAGES_PER_PROMPT * i))
    return prompts


def asks_for(labels: dict[str, str], concept: str) -> bool:
    """Whether a prompt with ``labels`` (as ``detection_prompts`` gives) asks for ``concept``."""
    return labels.get(kind_of(concept)) == concept


def precision_recall(asked: Sequence[bool], flagged: Sequence[bool]) -> tuple[float, float]:
    """(precision, recall) of ``flagged`` against the truth ``asked``, image by image; 0 when
    nothing is flagged (precision) or nothing asked (recall)."""
    tp = sum(a and f for a, f in zip(asked, flagged, strict=True))
    return tp / max(1, sum(flagged)), tp / max(1, sum(asked))


def precision_recall_at(asked_scores: Sequence[float], other_scores: Sequence[float],
                        threshold: float) -> tuple[float, float]:
    """(precision, recall) when an image is flagged at score ≥ ``threshold``."""
    asked = [True] * len(asked_scores) + [False] * len(other_scores)
    flagged = [s >= threshold for s in (*asked_scores, *other_scores)]
    return precision_recall(asked, flagged)


def choose_threshold(asked_scores: Sequence[float], other_scores: Sequence[float]) -> float:
    """The detection threshold for a concept from calibration scores: the scores of images
    whose prompt asks for it (``asked_scores``) and of the others (``other_scores``).

    Separable (every other score < every asked score): the midpoint of the gap,
    ``(max(other) + min(asked)) / 2``. Where they overlap: the lowest observed score that,
    as a threshold (flagged = score ≥ threshold), maximises min(precision, recall), moved
    down to the midpoint of the gap below it (to the next lower score; it flags the same
    images). Both are one rule: of the midpoints between consecutive distinct scores, the
    lowest maximising min(precision, recall) (all flagged: the lowest score itself).
    Policy files write it to two decimals (policies/toy.toml)."""
    if not asked_scores or not other_scores:
        raise ValueError("choose_threshold needs scores of images asking for the concept and "
                         f"of others (got {len(asked_scores)} and {len(other_scores)})")
    values = sorted({*asked_scores, *other_scores})
    best, best_k = -1.0, 0
    for k, value in enumerate(values):
        precision, recall = precision_recall_at(asked_scores, other_scores, value)
        if min(precision, recall) > best:  # strictly: ties keep the lower threshold
            best, best_k = min(precision, recall), k
    if best_k == 0:
        return values[0]
    return (values[best_k - 1] + values[best_k]) / 2
