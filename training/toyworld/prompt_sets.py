"""Prompt files (JSONL, `steer collect`'s input) for building the toy world's steering bundle.

Three disjoint sets, each with its own seed range so no image is shared between them:

- ``importance``: every shape × colour × background combination with the canonical caption,
  labelled with all three concepts (importance tables are made from canonical words only);
- ``sae``: varied captions (attributes left out, templates, synonyms) of random scenes, so the
  SAE also sees the activations of the prompts users actually write; labelled with the
  attributes the caption names canonically;
- ``heldout``: both kinds, new seeds, for the SAE's held-out FVU.

Evaluation (`steer eval`) uses seeds ≥ ``EVAL_SEED_BASE``, never one of these.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from training.toyworld.captions import compose
from training.toyworld.world import BACKGROUNDS, COLOURS, KINDS, SHAPES, SYNONYMS

IMPORTANCE_SEED_BASE = 10_000
SAE_SEED_BASE = 20_000
HELDOUT_SEED_BASE = 30_000
EVAL_SEED_BASE = 1_000_000
GATE_PROBE_SEED_BASE = 3_200_000  # the gate's probe (after the swaps' 3.0M / 3.1M)


def _record(prompt: str, concepts: dict[str, str], seed: int) -> dict:
    return {"prompt": prompt, "concepts": concepts, "seed": seed}


def canonical_prompts(seeds_per_combo: int, seed_base: int,
                      templates: tuple[int, ...] = (0,)) -> list[dict]:
    """Each combination's caption with canonical words, in each of ``templates`` (the
    importance tables use template 0 only), with ``seeds_per_combo`` seeds."""
    records = []
    items = list(itertools.product(itertools.product(SHAPES, COLOURS, BACKGROUNDS), templates))
    for rep in range(seeds_per_combo):
        for i, ((shape, colour, background), template) in enumerate(items):
            labels = {"shape": shape, "colour": colour, "background": background}
            records.append(_record(compose(shape, colour, background, template), labels,
                                   seed_base + rep * len(items) + i))
    return records


def varied_prompts(count: int, seed_base: int, rng_seed: int = 0) -> list[dict]:
    """Random scenes with varied captions, labelled by the canonical words they mention."""
    rng = np.random.default_rng(rng_seed)
    records = []
    for i in range(count):
        words: dict[str, str | None] = {}
        labels: dict[str, str] = {}
        for kind, members in KINDS.items():
            concept = str(rng.choice(members))
            if rng.random() >= 0.7:
                words[kind] = None
                continue
            synonyms = SYNONYMS.get(concept, ())
            if synonyms and rng.random() < 0.3:
                words[kind] = str(rng.choice(synonyms))  # a synonym: not a canonical label
            else:
                words[kind] = concept
                labels[kind] = concept
        prompt = compose(words["shape"], words["colour"], words["background"],
                         int(rng.integers(3)))
        records.append(_record(prompt, labels, seed_base + i))
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write one JSON object per line (the prompt file format of `steer collect`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return path


def write_prompt_sets(directory: Path, seeds_per_combo: int = 8, varied: int = 1536,
                      heldout_per_combo: int = 1, heldout_varied: int = 48) -> dict[str, Path]:
    """Write importance.jsonl, sae.jsonl and heldout.jsonl under ``directory``."""
    combos = len(SHAPES) * len(COLOURS) * len(BACKGROUNDS)
    heldout = (canonical_prompts(heldout_per_combo, HELDOUT_SEED_BASE)
               + varied_prompts(heldout_varied, HELDOUT_SEED_BASE + combos * heldout_per_combo,
                                rng_seed=1))
    return {
        "importance": write_jsonl(directory / "importance.jsonl",
                                  canonical_prompts(seeds_per_combo, IMPORTANCE_SEED_BASE)),
        "sae": write_jsonl(directory / "sae.jsonl", varied_prompts(varied, SAE_SEED_BASE)),
        "heldout": write_jsonl(directory / "heldout.jsonl", heldout),
    }
