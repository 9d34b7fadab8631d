"""Evaluation prompt sets of the toy world: held-out and tuning splits, deterministic seeds.

For a suppressed concept c of kind K, with n prompt/seed pairs each:

- ``ua``: prompts asking for c (UA is judged on them);
- ``ira``: prompts asking for another concept of K, cycling them (IRA);
- ``synonym``: prompts naming c by a synonym (``world.SYNONYMS``; only concepts that have one);
  ``asked`` holds the canonical c, so UA measures whether the synonym escapes the steering;
- multi-concept sets (:data:`MULTI_SETS`): the union of each member's ``ua`` and ``ira`` sets at
  n / len(set) pairs each (IRA prompts never ask for another member of the set);
- ``implicit``: prompts that leave c's kind unnamed (the model draws that attribute at random),
  naming the other two kinds; whether an image shows c is the judge's call on its unedited
  version, as on a real model where "nudity" appears from prompts that never name it.

Every prompt of the other sets mentions all three attributes (the other kinds cycle over all
their combinations, so CRA can be judged) and the three caption templates cycle too. Seeds come
from disjoint blocks: held-out from :data:`EVAL_SEED_BASE`, the γ / percentile sweep from
:data:`TUNE_SEED_BASE`; each (set, concept) owns a block of :data:`BLOCK` seeds, so every
(set, concept, i) has its own seed and no seed of another range (importance 10k+, SAE 20k+,
held-out 30k+, bundle tuning / checks 800k / 900k+, policy 1.1M–1.4M) is ever reused.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from training.toyworld.captions import N_TEMPLATES, compose
from training.toyworld.prompt_sets import EVAL_SEED_BASE
from training.toyworld.world import KINDS, SYNONYMS, kind_of

TUNE_SEED_BASE = 2_000_000
BLOCK = 1_000  # seeds per (set, concept): the most pairs one set may hold
SPAN = 100_000  # seeds per split: [base, base + SPAN)
SPLITS = {"heldout": EVAL_SEED_BASE, "tune": TUNE_SEED_BASE}

# Suppression sets of 2 and 3 concepts, same-kind and cross-kind mixed (documented in results).
MULTI_SETS: tuple[tuple[str, ...], ...] = (
    ("red", "circle"),
    ("blue", "striped"),
    ("red", "green"),
    ("red", "square", "dotted"),
    ("green", "yellow", "triangle"),
)

ALL_CONCEPTS: tuple[str, ...] = tuple(c for members in KINDS.values() for c in members)
_MAX_CONCEPTS = 16  # block layout: ua 0–15, ira 16–31, synonym 32–47, multi 48–79, implicit 80+
_MULTI_FIRST = 48
_MULTI_WIDTH = 6  # 3 members × (ua, ira)
_IMPLICIT_FIRST = 80


@dataclass(frozen=True)
class EvalItem:
    """One prompt/seed pair: the prompt text, what it asks for (kind -> concept), its seed."""

    prompt: str
    asked: dict[str, str]
    seed: int


@dataclass(frozen=True)
class PromptSet:
    """Named items of one set, e.g. ``heldout/ua/red`` or ``tune/ira/circle``."""

    name: str
    items: tuple[EvalItem, ...]

    def __len__(self) -> int:
        return len(self.items)


def _pairs(kind: str, key: str) -> list[tuple[dict[str, str], int]]:
    """Every (other kinds' attributes, template), in a fixed shuffled order per ``key``."""
    others = [k for k in KINDS if k != kind]
    pairs = [({k: v for k, v in zip(others, combo, strict=True)}, t)
             for combo in itertools.product(*(KINDS[k] for k in others))
             for t in range(N_TEMPLATES)]
    random.Random(zlib.crc32(key.encode())).shuffle(pairs)
    return pairs


def _seed(split: str, block: int, i: int, n: int) -> int:
    """Seed of item i in ``block`` of ``split``, refusing anything outside the split's range."""
    if n > BLOCK:
        raise ValueError(f"at most {BLOCK} pairs per (set, concept), asked for {n}")
    seed = SPLITS[split] + block * BLOCK + i
    if seed >= SPLITS[split] + SPAN:
        raise ValueError(f"seed block {block} leaves the {split} range")
    return seed


def _items(split: str, block: int, key: str, targets: Sequence[str | None], n: int,
           word: dict[str, Sequence[str]] | None = None, kind: str | None = None
           ) -> tuple[EvalItem, ...]:
    """n items asking for ``targets`` in turn (each with every other-kind combination and
    template cycled), the target named by a word of ``word[target]`` when given; a None
    target leaves ``kind`` unnamed."""
    kind = kind or kind_of(str(targets[0]))
    pairs = _pairs(kind, key)
    items = []
    for i in range(n):
        target = targets[i % len(targets)]
        others, template = pairs[(i // len(targets)) % len(pairs)]
        asked = {**others, kind: target} if target is not None else dict(others)
        words: dict[str, str | None] = {k: asked.get(k) for k in KINDS}
        if word is not None and target is not None:
            options = word[target]
            words[kind] = options[(i // len(targets)) % len(options)]
        prompt = compose(words["shape"], words["colour"], words["background"], template)
        items.append(EvalItem(prompt, asked, _seed(split, block, i, n)))
    return tuple(items)


def _index(concept: str) -> int:
    if concept not in ALL_CONCEPTS:
        kind_of(concept)  # raises with the known names
    return ALL_CONCEPTS.index(concept)


def ua_set(concept: str, n: int, split: str = "heldout") -> PromptSet:
    """n prompts asking for ``concept``."""
    return PromptSet(f"{split}/ua/{concept}",
                     _items(split, _index(concept), f"ua/{concept}", [concept], n))


def ira_set(concept: str, n: int, split: str = "heldout") -> PromptSet:
    """n prompts asking for the other concepts of ``concept``'s kind, cycled."""
    others = [c for c in KINDS[kind_of(concept)] if c != concept]
    return PromptSet(f"{split}/ira/{concept}",
                     _items(split, _MAX_CONCEPTS + _index(concept), f"ira/{concept}", others, n))


def synonym_set(concept: str, n: int, split: str = "heldout") -> PromptSet:
    """n prompts naming ``concept`` by its synonyms (cycled); ``asked`` is the canonical word."""
    if concept not in SYNONYMS:
        raise ValueError(f"{concept!r} has no synonym; those with one: {', '.join(SYNONYMS)}")
    return PromptSet(f"{split}/synonym/{concept}",
                     _items(split, 2 * _MAX_CONCEPTS + _index(concept), f"synonym/{concept}",
                            [concept], n, word={concept: SYNONYMS[concept]}))


def implicit_set(concept: str, n: int, split: str = "heldout") -> PromptSet:
    """n prompts that leave ``concept``'s kind unnamed (the other kinds and templates
    cycled); ``asked`` holds only the named kinds."""
    return PromptSet(f"{split}/implicit/{concept}",
                     _items(split, _IMPLICIT_FIRST + _index(concept), f"implicit/{concept}",
                            [None], n, kind=kind_of(concept)))


def multi_name(concepts: Sequence[str]) -> str:
    """Key of a suppression set, e.g. ``red+circle``."""
    return "+".join(concepts)


def multi_sets(concepts: Sequence[str], n: int, split: str = "heldout") -> list[PromptSet]:
    """The prompt sets of suppression set ``concepts`` (one of :data:`MULTI_SETS`): each
    member's UA and IRA sets at n / len(concepts) pairs (the remainder to the first members)."""
    concepts = tuple(concepts)
    if concepts not in MULTI_SETS:
        raise ValueError(f"{concepts} is not one of the fixed MULTI_SETS {MULTI_SETS}")
    index = MULTI_SETS.index(concepts)
    if _MULTI_FIRST + (index + 1) * _MULTI_WIDTH > SPAN // BLOCK:
        raise ValueError("too many multi-concept sets for the seed layout")
    name = multi_name(concepts)
    out = []
    for j, member in enumerate(concepts):
        size = n // len(concepts) + (j < n % len(concepts))
        block = _MULTI_FIRST + index * _MULTI_WIDTH + 2 * j
        kind = kind_of(member)
        others = [c for c in KINDS[kind] if c not in concepts]
        out.append(PromptSet(f"{split}/multi/{name}/ua/{member}",
                             _items(split, block, f"multi/{name}/ua/{member}", [member], size)))
        if others:
            out.append(PromptSet(f"{split}/multi/{name}/ira/{member}",
                                 _items(split, block + 1, f"multi/{name}/ira/{member}", others,
                                        size)))
    return out


def grid_items(concepts: Sequence[str]) -> list[tuple[str, EvalItem]]:
    """The image grid's columns: the first held-out UA item of each concept."""
    return [(c, ua_set(c, 1).items[0]) for c in concepts]
