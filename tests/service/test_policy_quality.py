"""The shipped toy policy (policies/toy.toml) judged on the toy pipeline by the attribute
classifier, on held-out seeds (the thresholds were chosen on seeds 1_100_000+):

(a) suppressing a colour: prompts asking for red show it at most half as often as without
    the policy;
(b) detection flags the prompts that ask for a policy's concept with precision and recall
    ≥ 0.9 at the policy's threshold, for each rule whose concept the toy bundle detects that
    well (colours, circle, square and triangle it does not: see docs/serving.md).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from service import enforce, runner
from service.policy import Policy, load_checked
from service.settings import REPO_ASSETS
from steering.edits import ConceptEdit, resolve_edits
from steering.pipeline import GenerationRequest, SteeredPipeline
from training.toyworld.classifier import AttributeClassifier
from training.toyworld.detection_check import detection_prompts, precision_recall
from training.toyworld.steering_check import asking_prompts
from training.toyworld.world import kind_of

TOY_POLICY = Path(__file__).resolve().parents[2] / "policies" / "toy.toml"
STEPS, GUIDANCE = 20, 4.0
REMOVAL_SEED_BASE = 1_300_000   # (a): 8 prompts × 4 images
DETECTION_SEED_BASE = 1_200_000  # (b): 48 + 12 prompts × 2 images


@cache
def pipeline() -> SteeredPipeline:
    return runner.load_pipeline(REPO_ASSETS / "toy-pipeline", REPO_ASSETS / "toy-bundle")


@cache
def classifier() -> AttributeClassifier:
    return AttributeClassifier.from_pretrained(REPO_ASSETS / "toy-classifier")


@cache
def policies():
    policies = load_checked(TOY_POLICY, pipeline().concepts)
    assert policies is not None
    return policies


def generate(prompt: str, seed: int, n_images: int, policy: Policy | None,
             edits: tuple[ConceptEdit, ...] = ()) -> enforce.Enforced:
    """One request under ``policy``, the way a worker runs it."""
    concepts = pipeline().concepts
    plan = enforce.plan_edits(resolve_edits(list(edits), concepts),
                              policy.suppressions(concepts) if policy is not None else [])
    request = GenerationRequest(prompt=prompt, seed=seed, steps=STEPS, guidance=GUIDANCE,
                                n_images=n_images)
    return enforce.generate(pipeline(), request, plan, policy)


def test_a_policy_suppressing_red_at_least_halves_how_often_red_is_drawn():
    public = policies().get("public")
    assert [s.concept for s in public.suppress] == ["red"]
    red_only = Policy(name="red-only", suppress=public.suppress)  # its detection rules apart
    present = {}
    for name, policy in (("without", None), ("with", red_only)):
        images = [im for i, (prompt, _) in enumerate(asking_prompts("red", 8))
                  for im in generate(prompt, REMOVAL_SEED_BASE + 10 * i, 4, policy).images]
        assert len(images) == 32
        present[name] = sum(p["colour"] == "red"
                            for p in classifier().predict(images)) / len(images)
    print(f"\nred drawn without / with the policy (32 images each): {present}")
    # Format 2 (gated replacement at γ 40) measured 1.00 without, 0.06 with; the learned swap
    # removes red in 200 of 200 held-out images already at γ 1.5 (docs/results.md).
    assert present["without"] >= 0.9, present
    assert present["with"] <= present["without"] / 2, present


# (policy, concept) pairs the toy bundle detects well (calibration min(P, R) ≥ 0.9); the
# public policy's cross rule reaches 0.97 / 0.96 on calibration seeds but 0.92 / 0.90 on the
# full held-out set (its red suppression disturbs every image), so it is reported, not held.
HELD = {"public": ("striped", "dotted"), "trusted": ("cross",)}


@pytest.mark.parametrize("name", ["public", "trusted"])
def test_detection_flags_the_prompts_asking_for_the_concept(name):
    policy = policies().get(name)
    asked: dict[str, list[bool]] = {r.concept: [] for r in policy.detect}
    flagged: dict[str, list[bool]] = {r.concept: [] for r in policy.detect}
    steered = []  # the returned images a steer rule made again: the concept should be gone
    for prompt, labels, seed in detection_prompts(DETECTION_SEED_BASE):
        out = generate(prompt, seed, 2, policy)
        report = out.report
        assert report is not None
        steered += [(im, c["concept"]) for im, row in zip(out.images, report["images"],
                                                          strict=False)
                    for c in row["checks"] if c["action"] == "steer"]
        for image in report["images"]:
            for check in image["checks"]:
                concept = check["concept"]
                asked[concept].append(labels.get(kind_of(concept)) == concept)
                flagged[concept].append(check["action"] != "none")
    figures = {c: precision_recall(asked[c], flagged[c]) for c in asked}
    print(f"\n{name}: precision / recall per concept on {len(asked[policy.detect[0].concept])} "
          f"images: {figures}")
    if steered:
        preds = classifier().predict([im for im, _ in steered])
        still = sum(p[kind_of(c)] == c for p, (_, c) in zip(preds, steered, strict=True))
        print(f"{name}: steered {len(steered)} images; concept still drawn in {still}")
    for concept in HELD[name]:
        precision, recall = figures[concept]
        assert precision >= 0.9 and recall >= 0.9, (concept, figures)
