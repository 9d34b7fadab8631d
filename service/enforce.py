"""Applying a content-safety policy (service.policy) to one generation.

1. The policy's always-on suppressions are *final* edits: they run after the request's other
   edits, gated on the activations those edits produced, so no other edit (e.g. a swap whose
   counterfactual is the suppressed concept) carries the concept past them; the request's own
   edits of those concepts are dropped.
2. Generate; every image gets a detection score per concept read before the edits and, with
   the bundle's detectors, on the final (edited) activations (0.5 = the detector's calibrated
   threshold; bundles without detectors: the sparse score, ≈ 1 for a typical prompt of the
   concept, ≈ 0 when it is absent).
3. Each detection rule, applied to the final activations' scores (the scores before the edits
   for bundles without detectors): score below its threshold → no action; ``mark`` → the image is
   returned, flagged; ``steer`` → that image is generated again (same seed) with the concept
   suppressed at the bundle's defaults, both scores reported; ``refuse`` → no image at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from service.policy import DetectRule, Policy
from steering.edits import ConceptEdit, ResolvedEdit, resolve_edits
from steering.pipeline import CancelFn, GenerationRequest, ProgressFn, SteeredPipeline

CONTENT_POLICY_VIOLATION = "content_policy_violation"


@dataclass(frozen=True)
class EditPlan:
    """The edits a generation runs with: ``forced`` first, then the request's other edits."""

    applied: list[ResolvedEdit]
    forced: list[ResolvedEdit]
    replaced: list[ResolvedEdit]  # request edits of a forced concept (not applied)


def plan_edits(requested: list[ResolvedEdit], forced: list[ResolvedEdit]) -> EditPlan:
    """Put ``forced`` first and drop the requested edits of the same concepts."""
    names = {e.spec.name for e in forced}
    kept = [e for e in requested if e.spec.name not in names]
    replaced = [e for e in requested if e.spec.name in names]
    final = [replace(e, final=True) for e in forced]
    return EditPlan(final + kept, final, replaced)


def as_edits(resolved: list[ResolvedEdit]) -> list[ConceptEdit]:
    """Pipeline edits from resolved ones (every default already filled)."""
    return [ConceptEdit(e.spec.name, e.gamma, e.percentile, e.direction, final=e.final)
            for e in resolved]


@dataclass(frozen=True)
class Check:
    """One detection rule applied to one image."""

    concept: str
    score: float
    threshold: float
    rule: str
    action: str  # none | mark | steer | refuse
    reason: str
    steered_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"concept": self.concept, "score": self.score, "threshold": self.threshold,
                "rule": self.rule, "action": self.action, "reason": self.reason,
                "steered_score": self.steered_score}


_DOES = {"mark": "image returned, flagged", "steer": "image generated again with the concept "
         "suppressed", "refuse": "request refused"}


def check(rule: DetectRule, score: float) -> Check:
    """The action ``rule`` takes for an image scoring ``score``, and why."""
    if score < rule.threshold:
        return Check(rule.concept, score, rule.threshold, rule.action, "none",
                     f"score {score:.3f} < threshold {rule.threshold:g}: no action")
    return Check(rule.concept, score, rule.threshold, rule.action, rule.action,
                 f"score {score:.3f} ≥ threshold {rule.threshold:g}: {_DOES[rule.action]}")


def judge(policy: Policy, detection: list[dict[str, float]]) -> list[list[Check]]:
    """Per image, every detection rule of ``policy`` applied to its scores."""
    return [[check(rule, float(row[rule.concept])) for rule in policy.detect]
            for row in detection]


@dataclass
class Enforced:
    """A generation under a policy: the images to return (none when refused) and the report."""

    images: list[Image.Image]
    seeds: list[int]
    detection: list[dict[str, float]]  # read before the edits
    edits: list[list[ResolvedEdit]]  # per image: the edits its returned image was made with
    report: dict[str, Any] | None = None
    refusal: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    # read on the final activations (bundles with detectors; else empty)
    detection_after: list[dict[str, float]] = field(default_factory=list)

    @property
    def final_detection(self) -> list[dict[str, float]]:
        """What the returned images hold: the scores after the edits when the bundle reads
        them, else the scores before."""
        return self.detection_after or self.detection


def _refusal(policy: Policy, seeds: list[int], checks: list[list[Check]]) -> str | None:
    """The refusal message naming each concept and image, or None when nothing is refused."""
    hits = [f"{c.concept!r} in image {i} (seed {seeds[i]}, score {c.score:.3f} ≥ "
            f"{c.threshold:g})" for i, row in enumerate(checks) for c in row
            if c.action == "refuse"]
    if not hits:
        return None
    return f"refused by content policy {policy.name!r}: detected " + "; ".join(hits)


def _report(policy: Policy, plan: EditPlan, seeds: list[int], checks: list[list[Check]],
            refused: bool) -> dict[str, Any]:
    return {"name": policy.name,
            "suppressed": [e.to_dict() for e in plan.forced],
            "replaced": [e.to_dict() for e in plan.replaced],
            "images": [{"seed": seed,
                        "flagged": any(c.action == "mark" for c in row),
                        "steered": any(c.action == "steer" for c in row),
                        "checks": [c.to_dict() for c in row]}
                       for seed, row in zip(seeds, checks, strict=True)],
            "refused": refused}


def generate(pipeline: SteeredPipeline, request: GenerationRequest, plan: EditPlan,
             policy: Policy | None, progress: ProgressFn | None = None,
             should_cancel: CancelFn | None = None) -> Enforced:
    """Run ``request`` with ``plan``'s edits, then apply ``policy``'s detection rules."""
    request = replace(request, edits=as_edits(plan.applied))
    result = pipeline.generate(request, progress=progress, should_cancel=should_cancel)
    out = Enforced(list(result.images), list(result.seeds), list(result.detection),
                   [plan.applied] * len(result.images), timings=dict(result.timings),
                   detection_after=list(result.detection_after))
    if policy is None:
        return out
    checks = judge(policy, out.final_detection)
    out.refusal = _refusal(policy, out.seeds, checks)
    if out.refusal is not None:
        out.images, out.edits = [], []
    else:
        checks = [_steer(pipeline, request, plan, i, row, out, should_cancel)
                  if any(c.action == "steer" for c in row) else row
                  for i, row in enumerate(checks)]
    out.report = _report(policy, plan, out.seeds, checks, out.refusal is not None)
    return out


def _steer(pipeline: SteeredPipeline, request: GenerationRequest, plan: EditPlan, i: int,
           row: list[Check], out: Enforced, should_cancel: CancelFn | None) -> list[Check]:
    """Generate image ``i`` again with its steer concepts suppressed at the bundle defaults;
    replace it in ``out`` and return its checks with the new scores."""
    names = [c.concept for c in row if c.action == "steer"]
    forced = resolve_edits([ConceptEdit(n) for n in names], pipeline.concepts)
    edits = plan_edits(plan.applied, forced).applied
    again = pipeline.generate(replace(request, seed=out.seeds[i], n_images=1,
                                      edits=as_edits(edits)), should_cancel=should_cancel)
    out.images[i], out.detection[i], out.edits[i] = again.images[0], again.detection[0], edits
    if out.detection_after:
        out.detection_after[i] = again.detection_after[0]
    out.timings["steer_s"] = out.timings.get("steer_s", 0.0) + again.timings["generate_s"]
    new, by_name = (again.detection_after or again.detection)[0], {e.spec.name: e for e in forced}
    return [c if c.action != "steer" else replace(
                c, steered_score=float(new[c.concept]),
                reason=f"{c.reason} (γ {by_name[c.concept].gamma:g}, percentile "
                f"{by_name[c.concept].percentile:g}); score after {new[c.concept]:.3f}")
            for c in row]
