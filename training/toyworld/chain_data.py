"""The toy world's data files for the generic bundle commands (the toy world is one user of
them, as a user of a real model would be with their own prompts):

- counterfactual pairs for `steer bundle fit-swap --pairs` / `steer bundle tune`: prompts
  asking for a concept, each with its twin asking for a candidate counterfactual concept
  (:func:`training.toyworld.translations.swap_pairs`; seeds 3,000,000+);
- detector runs for `steer bundle fit-detector --runs`: captions that name every kind and
  captions that leave one or two kinds unnamed (the model then draws them at random, so a
  concept appears without being named), labelled later by the judge (seeds 3,400,000+);
- tuning prompts for `steer bundle tune --prompts`: prompts naming the concept, naming another
  concept of its kind, and leaving its kind unnamed, in equal parts (seeds 3,500,000+).

Every range is disjoint from the others the project uses (importance 10k+, SAE 20k+, held-out
30k+, bundle tuning/checks 800k/900k+, evaluation 1.0M–1.1M and 2.0M–2.1M, policy 1.1M–1.4M,
swap checks 3.1M+, gate probe 3.2M–3.3M+).
"""

from __future__ import annotations

import itertools
import json
import random
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from training.toyworld.captions import N_TEMPLATES, compose
from training.toyworld.translations import FIT_SEED_BASE, swap_pairs
from training.toyworld.world import KINDS, kind_of

DETECTOR_SEED_BASE = 3_400_000
TUNE_PROMPT_SEED_BASE = 3_500_000
_SPAN = 100_000
_BLOCK = 5_000  # tuning seeds per concept


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object a line (the parent folder is made); returns the line count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def pair_rows(concept: str, counterfactual: str, n: int) -> list[dict[str, Any]]:
    """n `{"prompt", "counterfactual", "seed"}` rows: the concept's prompt and its twin with
    ``counterfactual`` (another concept of its kind) in its place."""
    return [{"prompt": p.prompt, "counterfactual": p.counterfactual, "seed": p.seed}
            for p, _ in swap_pairs(concept, counterfactual, n, FIT_SEED_BASE)]


def _caption(attrs: dict[str, str | None], template: int) -> str:
    return compose(attrs.get("shape"), attrs.get("colour"), attrs.get("background"), template)


def detector_rows(n: int, seed_base: int = DETECTOR_SEED_BASE) -> list[dict[str, Any]]:
    """n `{"prompt", "seed"}` runs: every scene × template, with 0, 1 or 2 kinds left unnamed
    in turn (a third each), in a fixed shuffled order; labels come from the judge."""
    if n > _SPAN:
        raise ValueError(f"at most {_SPAN} detector runs, asked for {n}")
    kinds = list(KINDS)
    scenes = [dict(zip(kinds, combo, strict=True))
              for combo in itertools.product(*(KINDS[k] for k in kinds))]
    drops: list[tuple[str, ...]] = [()] + [(k,) for k in kinds] + \
        [tuple(c) for c in itertools.combinations(kinds, 2)]
    combos = [(s, t) for s in scenes for t in range(N_TEMPLATES)]
    random.Random(zlib.crc32(b"detector-runs")).shuffle(combos)
    rows = []
    for i in range(n):
        scene, template = combos[i % len(combos)]
        # a third name everything, a third leave one kind out, a third two
        level = i % 3
        options = [d for d in drops if len(d) == level]
        dropped = options[(i // 3) % len(options)]
        attrs: dict[str, str | None] = {k: (None if k in dropped else v)
                                        for k, v in scene.items()}
        rows.append({"prompt": _caption(attrs, template), "seed": seed_base + i})
    return rows


def tune_rows(concept: str, n: int) -> list[dict[str, Any]]:
    """n `{"prompt", "seed"}` tuning prompts for ``concept``: naming it, naming another
    concept of its kind, and leaving its kind unnamed, in turn."""
    kind = kind_of(concept)
    if n > _BLOCK:
        raise ValueError(f"at most {_BLOCK} tuning prompts per concept, asked for {n}")
    members = [c for ms in KINDS.values() for c in ms]
    base = TUNE_PROMPT_SEED_BASE + members.index(concept) * _BLOCK
    others = [k for k in KINDS if k != kind]
    combos = [(dict(zip(others, combo, strict=True)), t)
              for combo in itertools.product(*(KINDS[k] for k in others))
              for t in range(N_TEMPLATES)]
    random.Random(zlib.crc32(f"tune/{concept}".encode())).shuffle(combos)
    alternatives = [c for c in KINDS[kind] if c != concept]
    rows = []
    for i in range(n):
        attrs: dict[str, str | None] = dict(combos[(i // 3) % len(combos)][0])
        template = combos[(i // 3) % len(combos)][1]
        role = i % 3
        attrs[kind] = (concept if role == 0 else
                       alternatives[(i // 3) % len(alternatives)] if role == 1 else None)
        rows.append({"prompt": _caption(attrs, template), "seed": base + i})
    return rows


def candidates_of(concept: str, candidates: Sequence[str] | None = None) -> list[str]:
    """The counterfactual concepts tried for ``concept``: the other concepts of its kind (or
    ``candidates``, checked to be of that kind)."""
    kind = kind_of(concept)
    chosen = list(candidates) if candidates else [c for c in KINDS[kind] if c != concept]
    bad = [c for c in chosen if c == concept or kind_of(c) != kind]
    if bad:
        raise ValueError(f"counterfactual(s) {bad} must be other concepts of {concept!r}'s "
                         f"kind {kind!r}: {', '.join(c for c in KINDS[kind] if c != concept)}")
    return chosen
