"""A quick, judged check that a bundle removes a concept on the toy pipeline.

For each held-out (prompt, seed) that asks for the concept, generate with and without the
suppression edit and let the attribute classifier say whether the concept (and the prompt's
other attributes) are in the image. The full evaluation harness (UA / IRA / CRA against
baselines) is `steer eval`; this is the build's and the tests' sanity check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from steering.edits import ConceptEdit
from steering.pipeline import GenerationRequest, SteeredPipeline
from training.toyworld.captions import compose
from training.toyworld.classifier import AttributeClassifier
from training.toyworld.world import KINDS, kind_of

CHECK_SEED_BASE = 900_000  # disjoint from the bundle's collection seeds (prompt_sets.py)
TUNE_SEED_BASE = 800_000  # defaults are tuned here, never on the check seeds


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


def _predict(steered: SteeredPipeline, classifier: AttributeClassifier,
             prompts: Sequence[tuple[str, dict[str, str]]], seed_base: int,
             edits: tuple[ConceptEdit, ...], steps: int, guidance: float) -> list[dict[str, str]]:
    """Classifier predictions for one image per prompt (seed = seed_base + i)."""
    images = [steered.generate(GenerationRequest(prompt=p, seed=seed_base + i, steps=steps,
                                                 guidance=guidance, edits=edits)).images[0]
              for i, (p, _) in enumerate(prompts)]
    return classifier.predict(images)


def _rates(concept: str, prompts: Sequence[tuple[str, dict[str, str]]],
           preds: Sequence[dict[str, str]]) -> tuple[float, float]:
    """(share showing ``concept``, share keeping every other prompted attribute)."""
    kind = kind_of(concept)
    present = [p[kind] == concept for p in preds]
    kept = [all(p[k] == v for k, v in labels.items() if k != kind)
            for p, (_, labels) in zip(preds, prompts, strict=True)]
    return float(np.mean(present)), float(np.mean(kept))


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
    prompts = asking_prompts(concept, count)
    plain = _predict(steered, classifier, prompts, seed_base, (), steps, guidance)
    edit = (ConceptEdit(concept, gamma=gamma, percentile=percentile),)
    edited = _predict(steered, classifier, prompts, seed_base, edit, steps, guidance)
    present_steered, kept = _rates(concept, prompts, edited)
    return {
        "concept": concept,
        "n": count,
        "present_plain": _rates(concept, prompts, plain)[0],
        "present_steered": present_steered,
        "others_kept_steered": kept,
    }


def removal_table(steered: SteeredPipeline, classifier: AttributeClassifier,
                  concepts: Sequence[str], count: int = 8, **kwargs) -> list[dict[str, float]]:
    """:func:`removal_check` for several concepts (the bundle's BUILD.md table)."""
    return [removal_check(steered, classifier, c, count, **kwargs) for c in concepts]


def tune_kind_defaults(
    steered: SteeredPipeline,
    classifier: AttributeClassifier,
    concepts: Sequence[str],
    gammas: Sequence[float],
    percentiles: Sequence[float],
    done: dict[str, dict] | None = None,
    save: Callable[[dict[str, dict]], None] | None = None,
    count: int = 4,
    steps: int = 20,
    guidance: float = 4.0,
    seed_base: int = TUNE_SEED_BASE,
) -> dict:
    """Pick one (γ, percentile) for a kind's concepts on tuning seeds.

    The product's use is safety ("never return it"), so the winner removes the concepts
    most often; among settings within 0.05 of that, the one keeping the prompts' other
    attributes most often. ``done`` holds grid points already measured (resume) and
    ``save`` is called after each new one. Returns the winner and every point's figures.
    """
    results = dict(done or {})
    for gamma in gammas:
        for pct in percentiles:
            key = f"{gamma:g}/{pct:g}"
            if key in results:
                continue
            removed, kept = [], []
            for concept in concepts:
                prompts = asking_prompts(concept, count)
                edit = (ConceptEdit(concept, gamma=gamma, percentile=pct),)
                preds = _predict(steered, classifier, prompts, seed_base, edit, steps, guidance)
                present, k = _rates(concept, prompts, preds)
                removed.append(1.0 - present)
                kept.append(k)
            results[key] = {"gamma": gamma, "percentile": pct,
                            "removed": float(np.mean(removed)), "kept": float(np.mean(kept))}
            if save is not None:
                save(results)
    grid = [results[f"{g:g}/{p:g}"] for g in gammas for p in percentiles]
    top = max(g["removed"] for g in grid)
    best = max((g for g in grid if g["removed"] >= top - 0.05), key=lambda g: g["kept"])
    return {"gamma": best["gamma"], "percentile": best["percentile"], "grid": grid}
