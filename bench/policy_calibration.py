"""Reproduce a content-safety policy file's detection thresholds on the toy pipeline.

What: for each policy of ``--policy`` (default policies/toy.toml) and each of its detection
rules, the threshold the calibration rule picks, compared with the file's, and the precision
/ recall of both on held-out seeds.

How (the procedure in policies/toy.toml's header and docs/serving.md, "Content-safety
policy"):

1. Calibration images: ``training.toyworld.detection_check.detection_prompts`` with every
   caption template from ``--calibration-seed-base`` (1_100_000): 48 shape × colour ×
   background prompts × 3 templates × 2 seeds + 12 prompts naming no colour × 2 seeds = 312
   images, DDIM 20 steps, guidance 4, generated the way a worker does
   (``service.enforce.plan_edits`` / ``enforce.generate``) with the policy's always-on
   suppressions applied, since they change the scores. The detection scores are read on
   the first pass, before any rule acts, so the rules are not run (no steer regeneration
   or refusal: they would not change a score).
2. ``choose_threshold`` per rule: the midpoint of the gap between the highest score of an
   image whose prompt does not ask for the concept and the lowest of one whose prompt does;
   where they overlap, the lowest score maximising min(precision, recall), moved down to the
   midpoint of the gap below it. ``chosen_rounded`` is it to two decimals, as the file
   writes thresholds; ``matches_file`` says whether that is the file's threshold,
   ``same_calibration_flags`` whether the file's and the unrounded one flag the same
   calibration images (rounding can move a threshold across a score).
3. The same scheme from ``--heldout-seed-base`` (1_200_000, another 312 images): precision
   / recall at the chosen threshold (``chosen_pr``; ``chosen_rounded_pr`` at two decimals)
   and at the file's (``file_pr``), an image flagged as the service does
   (``service.enforce.check``: score ≥ threshold). tests/service/test_policy_quality.py
   holds the ≥ 0.9 bar on a 120-image subset of these.

Policies with the same suppressions share their images. ``--all-concepts`` reports every
concept of the bundle, not only the rules' (docs/serving.md's table). Prints one JSON line
and writes it (pretty) to ``--out``. About 7 minutes for policies/toy.toml on 2 CPU cores.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/policy_calibration.py``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from service import enforce, runner
from service.policy import DetectRule, Policy, load_checked
from service.settings import REPO_ASSETS
from steering.pipeline import GenerationRequest, SteeredPipeline
from training.toyworld.detection_check import (
    CALIBRATION_SEED_BASE,
    HELDOUT_SEED_BASE,
    IMAGES_PER_PROMPT,
    asks_for,
    choose_threshold,
    detection_prompts,
    precision_recall,
    precision_recall_at,
)

REPO = Path(__file__).resolve().parents[1]
STEPS, GUIDANCE = 20, 4.0  # as tests/service/test_policy_quality.py

Scores = list[tuple[dict[str, str], dict[str, float]]]  # (prompt labels, detection) per image


def scores_under(pipeline: SteeredPipeline, policy: Policy, seed_base: int,
                 all_templates: bool) -> Scores:
    """Every image's prompt labels and first-pass detection scores, generated with
    ``policy``'s always-on suppressions (its rules are not run: they change no score)."""
    plan = enforce.plan_edits([], policy.suppressions(pipeline.concepts))
    out: Scores = []
    for prompt, labels, seed in detection_prompts(seed_base, all_templates):
        request = GenerationRequest(prompt=prompt, seed=seed, steps=STEPS, guidance=GUIDANCE,
                                    n_images=IMAGES_PER_PROMPT)
        result = enforce.generate(pipeline, request, plan, None)
        out += [(labels, {c: float(s) for c, s in row.items()}) for row in result.detection]
    return out


def split(scores: Scores, concept: str) -> tuple[list[float], list[float]]:
    """(scores of images whose prompt asks for ``concept``, scores of the others)."""
    asked = [row[concept] for labels, row in scores if asks_for(labels, concept)]
    other = [row[concept] for labels, row in scores if not asks_for(labels, concept)]
    return asked, other


def service_flags(rule: DetectRule, scores: Scores) -> tuple[list[bool], list[bool]]:
    """(asked, flagged) per image, flagged by the service's own rule check."""
    return ([asks_for(labels, rule.concept) for labels, _ in scores],
            [enforce.check(rule, row[rule.concept]).action != "none" for _, row in scores])


def rounded(pr: tuple[float, float]) -> list[float]:
    return [round(pr[0], 3), round(pr[1], 3)]


def judge(concept: str, rule: DetectRule | None, calibration: Scores,
          heldout: Scores) -> dict[str, Any]:
    """The chosen threshold for ``concept`` and its figures (and the file's, for a rule)."""
    asked, other = split(calibration, concept)
    chosen = choose_threshold(asked, other)
    h_asked, h_other = split(heldout, concept)
    row: dict[str, Any] = {
        "chosen": round(chosen, 4),
        "chosen_rounded": round(chosen, 2),
        "separable": max(other) < min(asked),
        "calibration": {"n_asked": len(asked), "n_other": len(other),
                        "max_other": round(max(other), 4), "min_asked": round(min(asked), 4),
                        "chosen_pr": rounded(precision_recall_at(asked, other, chosen))},
        "heldout": {"n_asked": len(h_asked), "n_other": len(h_other),
                    "chosen_pr": rounded(precision_recall_at(h_asked, h_other, chosen)),
                    "chosen_rounded_pr": rounded(precision_recall_at(h_asked, h_other,
                                                                     round(chosen, 2)))},
    }
    if rule is not None:
        file_flags = [s >= rule.threshold for s in (*asked, *other)]
        row |= {"action": rule.action, "file": rule.threshold,
                "matches_file": round(chosen, 2) == rule.threshold,
                "same_calibration_flags": file_flags == [s >= chosen for s in (*asked, *other)]}
        row["calibration"]["file_pr"] = rounded(
            precision_recall_at(asked, other, rule.threshold))
        row["heldout"]["file_pr"] = rounded(precision_recall(*service_flags(rule, heldout)))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", type=Path, default=REPO / "policies" / "toy.toml",
                    help="policy file (TOML or YAML)")
    ap.add_argument("--calibration-seed-base", type=int, default=CALIBRATION_SEED_BASE)
    ap.add_argument("--heldout-seed-base", type=int, default=HELDOUT_SEED_BASE)
    ap.add_argument("--pipeline", type=Path, default=REPO_ASSETS / "toy-pipeline")
    ap.add_argument("--bundle", type=Path, default=REPO_ASSETS / "toy-bundle")
    ap.add_argument("--subset", action="store_true",
                    help="one caption template per prompt (120 images per seed set, as the "
                    "test) instead of all three (312): a quicker, noisier run")
    ap.add_argument("--all-concepts", action="store_true",
                    help="also report every bundle concept without a rule")
    ap.add_argument("--out", type=Path,
                    default=REPO / "bench" / "results" / "policy_calibration.json")
    args = ap.parse_args()

    start = time.perf_counter()
    pipeline = runner.load_pipeline(args.pipeline, args.bundle)
    policies = load_checked(args.policy, pipeline.concepts)
    assert policies is not None
    all_templates = not args.subset
    cache: dict[str, tuple[Scores, Scores]] = {}  # suppressions → (calibration, held-out)
    result: dict[str, Any] = {
        "bench": "policy_calibration", "policy_file": str(args.policy),
        "sha256": policies.sha256, "steps": STEPS, "guidance": GUIDANCE,
        "calibration_seed_base": args.calibration_seed_base,
        "heldout_seed_base": args.heldout_seed_base, "policies": {}}
    for name, policy in policies.policies.items():
        suppressions = [e.to_dict() for e in policy.suppressions(pipeline.concepts)]
        key = json.dumps(suppressions, sort_keys=True)
        if key not in cache:
            cache[key] = (scores_under(pipeline, policy, args.calibration_seed_base,
                                       all_templates),
                          scores_under(pipeline, policy, args.heldout_seed_base,
                                       all_templates))
        calibration, heldout = cache[key]
        rules = {r.concept: r for r in policy.detect}
        concepts = list(rules) + ([c for c in pipeline.concepts if c not in rules]
                                  if args.all_concepts else [])
        result["policies"][name] = {
            "suppress": [s["concept"] for s in suppressions],
            "images": {"calibration": len(calibration), "heldout": len(heldout)},
            "rules": {c: judge(c, rules.get(c), calibration, heldout) for c in concepts}}
    result["all_match_file"] = all(row["matches_file"] for p in result["policies"].values()
                                   for row in p["rules"].values() if "matches_file" in row)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
