"""`steer toyworld translations`: learn each toy concept's swap and choose its anchor.

For every concept c and every other concept a of its kind: fit the swap c → a on
:data:`FIT_SEED_BASE` seeds (``training.translation_fit``), then judge it on
:data:`ANCHOR_SEED_BASE` seeds with the attribute classifier (share of images without c, share
keeping the other kinds as prompted, at γ 1 and 1.5, every image edited). The anchor with the
best mean of the two is kept. Both seed ranges are disjoint from every other range (importance
10k+, SAE 20k+, held-out 30k+, bundle 800k/900k+, evaluation 1.0M–1.1M and 2.0M–2.1M, policy
1.1M–1.4M). Each (c, a) is saved under the work folder as it finishes, so a rerun resumes.
"""

from __future__ import annotations

import itertools
import json
import random
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from steering.bundle import SteeringBundle
from steering.pipeline import SteeredPipeline
from steering.recipe import GATED_TRANSLATE
from steering.recording import generate_with
from steering.translation import ConceptTranslation, TranslationTables
from training.toyworld.captions import N_TEMPLATES, compose
from training.toyworld.classifier import AttributeClassifier
from training.toyworld.world import KINDS, kind_of
from training.translation_fit import SwapPair, apply_translation, fit_translation

FIT_SEED_BASE = 3_000_000
ANCHOR_SEED_BASE = 3_100_000
CHECK_GAMMAS = (1.0, 1.5)
# γ scales the learned swap (1 = as fitted); past ≈ 4 the edit leaves the activations' range.
TRANSLATE_GAMMA_RANGE = (0.25, 4.0)
_BLOCK = 1_000  # seeds per (concept, anchor)


def swap_pairs(concept: str, anchor: str, n: int, seed_base: int
               ) -> list[tuple[SwapPair, dict[str, str]]]:
    """n prompts asking for ``concept`` (other kinds and templates cycled in a fixed shuffled
    order), each with its twin asking for ``anchor`` and the attributes it asks for; seeds
    from the pair's own block."""
    kind = kind_of(concept)
    if kind_of(anchor) != kind or anchor == concept:
        raise ValueError(f"anchor {anchor!r} must be another concept of {concept!r}'s kind")
    if n > _BLOCK:
        raise ValueError(f"at most {_BLOCK} pairs per (concept, anchor), asked for {n}")
    members = [c for ms in KINDS.values() for c in ms]
    block = members.index(concept) * len(members) + members.index(anchor)
    others = [k for k in KINDS if k != kind]
    combos = [(dict(zip(others, combo, strict=True)), t)
              for combo in itertools.product(*(KINDS[k] for k in others))
              for t in range(N_TEMPLATES)]
    random.Random(zlib.crc32(f"{concept}->{anchor}".encode())).shuffle(combos)
    out = []
    for i in range(n):
        labels, template = combos[i % len(combos)]
        words = {**labels, kind: concept}
        twin = {**labels, kind: anchor}
        pair = SwapPair(compose(words["shape"], words["colour"], words["background"], template),
                        compose(twin["shape"], twin["colour"], twin["background"], template),
                        seed_base + block * _BLOCK + i)
        out.append((pair, words))
    return out


def check_swap(steered: SteeredPipeline, judge: AttributeClassifier, concept: str,
               translation: ConceptTranslation,
               pairs: Sequence[tuple[SwapPair, dict[str, str]]], steps: int = 20,
               guidance: float = 4.0, gammas: Sequence[float] = CHECK_GAMMAS
               ) -> dict[str, Any]:
    """Per γ: share of images without ``concept`` and share keeping the other kinds."""
    kind = kind_of(concept)
    prompts, seeds = [p.prompt for p, _ in pairs], [p.seed for p, _ in pairs]
    asked = [a for _, a in pairs]
    out: dict[str, Any] = {}
    for gamma in gammas:
        edit = apply_translation(translation, steered.sae, gamma)
        preds = judge.predict(generate_with(steered, prompts, seeds, steps, guidance, edit))
        removed = sum(p[kind] != concept for p in preds) / len(preds)
        kept = sum(all(p[k] == a[k] for k in a if k != kind)
                   for p, a in zip(preds, asked, strict=True)) / len(preds)
        out[f"{gamma:g}"] = {"removed": removed, "kept": kept}
    out["score"] = sum((v["removed"] + v["kept"]) / 2 for v in out.values()) / len(gammas)
    return out


def build_translations(steered: SteeredPipeline, judge: AttributeClassifier, work_dir: Path,
                       concepts: Sequence[str] | None = None, n_fit: int = 64,
                       n_check: int = 32, steps: int = 20, guidance: float = 4.0,
                       log: Callable[[str], None] = print, rounds: int = 1
                       ) -> tuple[TranslationTables, dict[str, Any]]:
    """Fit every (concept, anchor) swap on ``n_fit`` pairs with ``rounds`` on-policy rounds
    (resuming from ``work_dir``), keep the best anchor per concept; returns the tables and the
    report of every candidate (with how it was fitted)."""
    assert steered.bundle is not None
    manifest = steered.bundle.manifest
    names = list(concepts or [c.name for c in manifest.concepts])
    work_dir.mkdir(parents=True, exist_ok=True)
    chosen: dict[str, ConceptTranslation] = {}
    report: dict[str, Any] = {}
    for concept in names:
        candidates: dict[str, Any] = {}
        best: tuple[float, ConceptTranslation] | None = None
        for anchor in [a for a in KINDS[kind_of(concept)] if a != concept]:
            stem = work_dir / (f"{concept}-{anchor}" if (n_fit, rounds) == (64, 1)
                               else f"{concept}-{anchor}-n{n_fit}-r{rounds}")
            if stem.with_suffix(".json").is_file():
                figures = json.loads(stem.with_suffix(".json").read_text())
                translation = TranslationTables.load(
                    stem.with_suffix(".safetensors")).concepts[concept]
            else:
                pairs = [p for p, _ in swap_pairs(concept, anchor, n_fit, FIT_SEED_BASE)]
                with torch.no_grad():
                    translation = fit_translation(steered, anchor, pairs, steps, guidance,
                                                  rounds=rounds)
                    figures = check_swap(steered, judge, concept, translation,
                                         swap_pairs(concept, anchor, n_check, ANCHOR_SEED_BASE),
                                         steps, guidance)
                TranslationTables(manifest.n_latents, manifest.d_in, manifest.steps,
                                  {concept: translation}).save(stem.with_suffix(".safetensors"))
                stem.with_suffix(".json").write_text(json.dumps(figures, indent=2))
            candidates[anchor] = figures
            log(f"{concept} -> {anchor}: " + ", ".join(
                f"γ {g}: removed {figures[g]['removed']:.2f} kept {figures[g]['kept']:.2f}"
                for g in (f"{x:g}" for x in CHECK_GAMMAS)))
            if best is None or figures["score"] > best[0]:
                best = (figures["score"], translation)
        assert best is not None
        chosen[concept] = best[1]
        report[concept] = {"anchor": best[1].anchor, "candidates": candidates,
                           "fit": {"pairs": n_fit, "rounds": rounds, "judged_pairs": n_check}}
    tables = TranslationTables(manifest.n_latents, manifest.d_in, manifest.steps, chosen)
    return tables, report


def adopt_translations(bundle: SteeringBundle, tables: TranslationTables) -> None:
    """Give ``bundle`` these swaps (keeping others it has), the gated translate recipe and the
    γ range of a learned swap (defaults clamped into it)."""
    if bundle.translations is not None:
        tables = TranslationTables(tables.n_latents, tables.d_in, tables.num_steps,
                                   {**bundle.translations.concepts, **tables.concepts})
    bundle.translations = tables.to("cpu")
    bundle.manifest.recipe = GATED_TRANSLATE
    lo, hi = TRANSLATE_GAMMA_RANGE
    bundle.manifest.concepts = [
        c.replace(gamma_range=(lo, hi), default_gamma=min(max(c.default_gamma, lo), hi))
        for c in bundle.manifest.concepts]


REPORT_JSON = "TRANSLATIONS.json"


def write_report(bundle_dir: Path, report: dict[str, Any]) -> Path:
    """TRANSLATIONS.md beside the bundle: every candidate anchor's check and the choice, for
    the concepts of ``report`` and those of earlier builds (kept in TRANSLATIONS.json)."""
    merged_path = bundle_dir / REPORT_JSON
    merged = json.loads(merged_path.read_text()) if merged_path.is_file() else {}
    merged.update(report)
    merged_path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    lines = ["# Learned swaps of the toy bundle (translate recipe)", "",
             "Built by `steer toyworld translations` (seeds "
             f"{FIT_SEED_BASE:,}+ for the fits; each anchor judged on its own pairs, seeds "
             f"{ANCHOR_SEED_BASE:,}+, every image edited, no gate). *removed*: share of images "
             "without the concept; *kept*: share keeping the other kinds as prompted. The "
             "anchor with the best mean of the two over γ "
             f"{', '.join(f'{g:g}' for g in CHECK_GAMMAS)} is kept (**bold**). *fit*: prompt "
             "pairs / on-policy rounds / judged pairs.", "",
             "| concept | anchor | " + " | ".join(f"γ {g:g} removed / kept" for g in CHECK_GAMMAS)
             + " | fit |", "|---|---|" + "---|" * (len(CHECK_GAMMAS) + 1)]
    members = [c for ms in KINDS.values() for c in ms]
    for concept in sorted(merged, key=members.index):
        entry = merged[concept]
        fit = entry.get("fit", {"pairs": 64, "rounds": 1, "judged_pairs": 32})
        for anchor, figures in entry["candidates"].items():
            name = f"**{anchor}**" if anchor == entry["anchor"] else anchor
            cells = [f"{figures[f'{g:g}']['removed']:.2f} / {figures[f'{g:g}']['kept']:.2f}"
                     for g in CHECK_GAMMAS]
            lines.append(f"| {concept} | {name} | " + " | ".join(cells)
                         + f" | {fit['pairs']} / {fit['rounds']} / {fit['judged_pairs']} |")
    path = bundle_dir / "TRANSLATIONS.md"
    path.write_text("\n".join(lines) + "\n")
    return path
