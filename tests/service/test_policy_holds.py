"""A policy's always-on suppression holds whatever other edit a request asks for.

For every pair (P, E) of toy concepts: a policy always suppresses P, the request suppresses
E at its default γ on prompts asking for E (and, for P's kind, another concept than P), so P
can only come from E's edit — e.g. yellow's learned swap turns yellow into red. The
suppression is applied last, on what E's edit made. 8 seeds per pair, 110 pairs; the 6 pairs
whose learned swaps lead into each other (blue ⇄ green, circle ⇄ triangle, plain ⇄ striped) are
refused (steering/swap_chains.py), so 104 pairs generate.

The target is that the judge (the attribute classifier) finds P in at most 1 % of the
images. Measured on the format-5 toy bundle: 16 of 880 (1.8 %) with the first detectors and
17 of 880 (1.9 %) with the refitted ones (4,096 runs, step-weight floor 0.3), and 17 of 832
(2.0 %) once the cycle pairs are refused — yellow's swap to red under "red always removed"
(the bypass) no longer comes back; 16 of the 17 are shapes. With the detectors rescaled per
step: 17 of 832 again, 15 shapes, one green and one plain background (triangle's edit).
Shape swaps sometimes draw an in-between blob (a triangle swapped towards
a circle comes out as a rounded square the judge calls "square", or an outline it calls
"cross"); the detectors, reading the edited activations, see the swap's target there (the
square score falls from ≈ 0.45 to ≈ 0.30 after the edit), so the final suppression is not
triggered. Better detectors do not fix this; cleaner shape swaps would. This test guards the
measured level (≤ 2.5 %) until the target is reached; docs/serving.md says so."""

from __future__ import annotations

import itertools
from functools import cache

from service import enforce, runner
from service.policy import Policy, Suppression
from service.settings import REPO_ASSETS
from steering.edits import ConceptEdit, EditError, resolve_edits
from steering.pipeline import GenerationRequest, SteeredPipeline
from training.toyworld.captions import compose
from training.toyworld.classifier import AttributeClassifier
from training.toyworld.world import KINDS, kind_of

SEEDS_PER_PAIR = 8
SEED_BASE = 1_450_000  # after the policy checks' 1.1M–1.4M; 8 seeds per pair
STEPS, GUIDANCE = 20, 4.0


@cache
def pipeline() -> SteeredPipeline:
    return runner.load_pipeline(REPO_ASSETS / "toy-pipeline", REPO_ASSETS / "toy-bundle")


def prompts_for(edited: str, forced: str) -> list[str]:
    """Prompts asking for ``edited``; the other kinds cycle over their concepts, never
    ``forced``, so the judge finding ``forced`` means an edit produced it."""
    options = {k: [c for c in members if c != forced] for k, members in KINDS.items()}
    options[kind_of(edited)] = [edited]
    combos = list(itertools.product(*(options[k] for k in ("shape", "colour", "background"))))
    return [compose(*combos[i % len(combos)], i % 3) for i in range(SEEDS_PER_PAIR)]


def test_an_always_suppressed_concept_stays_out_whatever_else_is_edited():
    steered = pipeline()
    concepts = steered.concepts
    judge = AttributeClassifier.from_pretrained(REPO_ASSETS / "toy-classifier")
    names = list(concepts)
    leaks: list[tuple[str, str, int]] = []
    refused: list[tuple[str, str]] = []
    total = 0
    for p, (forced, edited) in enumerate(itertools.permutations(names, 2)):
        policy = Policy(name=f"no-{forced}", suppress=[Suppression(concept=forced)])
        plan = enforce.plan_edits(resolve_edits([ConceptEdit(edited)], concepts),
                                  policy.suppressions(concepts))
        seed = SEED_BASE + p * SEEDS_PER_PAIR
        request = GenerationRequest.batch(prompts_for(edited, forced),
                                          range(seed, seed + SEEDS_PER_PAIR), steps=STEPS,
                                          guidance=GUIDANCE)
        try:
            out = enforce.generate(steered, request, plan, policy)
        except EditError:  # the two swaps lead into each other: refused, nothing generated
            refused.append((forced, edited))
            continue
        found = [pred[kind_of(forced)] == forced for pred in judge.predict(out.images)]
        total += len(found)
        leaks += [(forced, edited, seed + i) for i, hit in enumerate(found) if hit]
    print(f"\nforced concept found in {len(leaks)} of {total} images: {leaks}; "
          f"refused: {refused}")
    anchors = steered.swap_anchors(steered.bundle.manifest.recipe)
    assert refused == [(p, e) for p, e in itertools.permutations(names, 2)
                       if anchors.get(p) == e and anchors.get(e) == p]
    assert total == (110 - len(refused)) * SEEDS_PER_PAIR
    assert len(leaks) <= 0.025 * total, leaks  # target 1 %: not met yet (module docstring)
