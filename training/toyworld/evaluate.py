"""Generation quality of the toy pipeline, judged by the attribute classifier.

Figures: full captions, single-attribute prompts, synonyms, and the effect of a negative
prompt of a concept word (the baseline that steering must beat).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm import tqdm

from training.toyworld.captions import canonical_caption, compose
from training.toyworld.classifier import AttributeClassifier
from training.toyworld.data import step_rng
from training.toyworld.render import random_scene
from training.toyworld.world import BACKGROUNDS, COLOURS, SHAPES, SYNONYMS, kind_of

EVAL_STEPS = 20
EVAL_GUIDANCE = 4.0


def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    negative_prompts: Sequence[str] | None = None,
    steps: int = EVAL_STEPS,
    guidance: float = EVAL_GUIDANCE,
    chunk: int = 64,
) -> list[Image.Image]:
    """One image per (prompt, seed), each with its own generator so it is reproducible alone."""
    images: list[Image.Image] = []
    for i in range(0, len(prompts), chunk):
        sl = slice(i, i + chunk)
        out = pipe(
            prompt=list(prompts[sl]),
            negative_prompt=list(negative_prompts[sl]) if negative_prompts else None,
            generator=[torch.Generator().manual_seed(s) for s in seeds[sl]],
            num_inference_steps=steps,
            guidance_scale=guidance,
        )
        images.extend(out.images)
    return images


def _rate(preds: list[dict[str, str]], wanted: Sequence[str]) -> float:
    """Share of images whose prediction of each wanted concept's kind equals it."""
    hits = [p[kind_of(w)] == w for p, w in zip(preds, wanted, strict=True)]
    return float(np.mean(hits))


def evaluate_pipeline(
    pipe: StableDiffusionPipeline,
    classifier: AttributeClassifier,
    seed: int = 1234,
    n_full: int = 200,
    per_prompt: int = 16,
) -> dict[str, dict[str, float]]:
    """All generation-quality figures of the build (see BUILD.md for what each means)."""
    pipe.set_progress_bar_config(disable=True)
    rng = step_rng(seed, "eval", 0)
    seed_base = 100_000 + seed
    results: dict[str, dict[str, float]] = {}
    suites = tqdm(total=4, desc="evaluate")

    scenes = [random_scene(rng) for _ in range(n_full)]
    preds = classifier.predict(generate(
        pipe, [canonical_caption(s) for s in scenes], [seed_base + i for i in range(n_full)]))
    results["full_caption"] = {
        k: float(np.mean([p[k] == s.label(k) for p, s in zip(preds, scenes, strict=True)]))
        for k in ("shape", "colour", "background")
    }
    suites.update()

    def single(concept: str, word: str) -> str:
        kind = kind_of(concept)
        return compose(word if kind == "shape" else None, word if kind == "colour" else None,
                       word if kind == "background" else None, 0)

    def rates(pairs: list[tuple[str, str]]) -> dict[str, float]:
        prompts = [single(c, w) for c, w in pairs for _ in range(per_prompt)]
        wanted = [c for c, _ in pairs for _ in range(per_prompt)]
        seeds = [seed_base + 10_000 + i for i in range(len(prompts))]
        preds = classifier.predict(generate(pipe, prompts, seeds))
        return {w: _rate(preds[j * per_prompt:(j + 1) * per_prompt],
                         wanted[j * per_prompt:(j + 1) * per_prompt])
                for j, (_, w) in enumerate(pairs)}

    results["single_attribute"] = rates([(c, c) for c in (*SHAPES, *COLOURS, *BACKGROUNDS)])
    suites.update()
    results["synonym"] = rates([(c, w) for c, ws in SYNONYMS.items() for w in ws])
    suites.update()

    neg: dict[str, float] = {}
    for colour in COLOURS:
        sc = [random_scene(rng, colour=colour) for _ in range(per_prompt)]
        free = [random_scene(rng) for _ in range(per_prompt)]
        asked = [canonical_caption(s) for s in sc]
        unasked = [compose(s.shape, None, s.background, 0) for s in free]
        seeds = [seed_base + 20_000 + i for i in range(per_prompt)]
        for name, prompts in (("asked", asked), ("unasked", unasked)):
            for tag, negp in (("plain", None), ("negative", [colour] * per_prompt)):
                p = classifier.predict(generate(pipe, prompts, seeds, negp))
                neg[f"{colour}/{name}/{tag}"] = _rate(p, [colour] * per_prompt)
    results["negative_prompt"] = neg
    suites.update()
    suites.close()
    return results
