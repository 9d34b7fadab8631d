"""Edits whose learned swaps lead into each other: staged so the anchor's edit sees what the
first swap made, cycles refused, and on the toy world red + green suppressed together."""

from __future__ import annotations

import pytest

from steering.anchors import read_anchors
from steering.concepts import ConceptSpec
from steering.edits import ConceptEdit, Direction, EditError, ResolvedEdit
from steering.swap_chains import check_swap_cycles, edit_stages
from tests.conftest import ASSETS

# the toy bundle's swaps (TRANSLATIONS.md): colours chain red → green → blue ⇄ green
ANCHORS = {"red": "green", "green": "blue", "blue": "green", "yellow": "red",
           "circle": "triangle", "triangle": "circle"}


def edit(name: str, final: bool = False, gamma: float = 1.0,
         direction: Direction = Direction.SUPPRESS) -> ResolvedEdit:
    spec = ConceptSpec(name, "k", 1.0, (0.0, 5.0), 99.0)
    return ResolvedEdit(spec, gamma, 99.0, direction, final=final)


def names(stages: list[list[ResolvedEdit]]) -> list[list[str]]:
    return [[e.spec.name for e in s] for s in stages]


def test_one_stage_when_no_swap_leads_to_another_suppressed_concept():
    assert names(edit_stages([edit("red"), edit("circle")], ANCHORS)) == [["red", "circle"]]
    assert names(edit_stages([], ANCHORS)) == [[]]
    # the policy's final edits keep their own stage after the request's
    assert names(edit_stages([edit("red"), edit("circle", final=True)], ANCHORS)) == [
        ["red"], ["circle"]]


def test_a_chain_gets_one_stage_per_link_in_swap_order():
    stages = edit_stages([edit("green"), edit("yellow"), edit("red"), edit("circle")], ANCHORS)
    # yellow → red → green: yellow first, red next, green last; circle is on its own
    assert names(stages) == [["yellow", "circle"], ["red"], ["green"]]
    # an amplification or an edit turned off (γ 0) never orders anything
    off = edit_stages([edit("red", gamma=0.0), edit("green"),
                       edit("red", direction=Direction.AMPLIFY)], ANCHORS)
    assert names(off) == [["red", "green", "red"]]


def test_a_request_suppression_a_policy_swap_leads_to_is_applied_again_after_it():
    stages = edit_stages([edit("green"), edit("red", final=True)], ANCHORS)
    assert names(stages) == [["green"], ["red"], ["green"]]


def test_a_cycle_is_refused_naming_it():
    with pytest.raises(EditError, match="blue → green → blue") as info:
        edit_stages([edit("blue"), edit("green")], ANCHORS)
    assert info.value.field == "concepts" and "keep one of them" in str(info.value)
    with pytest.raises(EditError, match="circle → triangle → circle"):
        check_swap_cycles(["triangle", "circle"][::-1], ANCHORS)  # request or policy alike
    check_swap_cycles(["red", "green"], ANCHORS)  # a chain is fine


def test_the_toy_bundles_anchors_are_read_from_the_file_header_alone():
    anchors = read_anchors(ASSETS / "toy-bundle" / "translation.safetensors")
    assert {c: anchors[c] for c in ANCHORS} == ANCHORS


def test_red_and_green_suppressed_together_leave_neither():
    """Red's swap makes green; green's edit, staged after it, reads that and makes blue. On
    the same seeds both edits in one stage left red or green in 6 of 16 images."""
    from steering.pipeline import GenerationRequest, SteeredPipeline
    from training.toyworld.classifier import AttributeClassifier

    steered = SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", ASSETS / "toy-bundle")
    prompts = [f"a {c} {s} on a {b} background" for c in ("red", "green")
               for s in ("circle", "square", "triangle", "cross") for b in ("plain", "striped")]
    out = steered.generate(GenerationRequest.batch(
        prompts, range(5000, 5016), edits=[ConceptEdit("red"), ConceptEdit("green")],
        steps=20, guidance=4.0))
    judge = AttributeClassifier.from_pretrained(ASSETS / "toy-classifier")
    colours = [p["colour"] for p in judge.predict(out.images)]
    assert sum(c in ("red", "green") for c in colours) <= 1, colours  # measured: 0 of 16
    with pytest.raises(EditError, match="blue → green → blue"):
        steered.generate(GenerationRequest.batch(
            prompts[:1], [1], edits=[ConceptEdit("blue"), ConceptEdit("green")], steps=2))
