"""Edits in two stages and detection before / after the edit, on the shipped toy pipeline.

A ``final`` edit (a content policy's always-on suppression) runs after the request's other
edits with a gate of its own that reads the codes those edits produced; the bundle's
detectors are read on the codes each step starts from (before) and on the edited output
(after)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import steering.hooks as hooks_module
from steering.bundle import SteeringBundle
from steering.detector import ConceptDetectors
from steering.edits import ConceptEdit
from steering.pipeline import GenerationRequest, SteeredPipeline
from tests.conftest import ASSETS

PROMPTS = ["a yellow square on a plain background", "a red circle on a dotted background"]


@pytest.fixture(scope="module")
def toy() -> SteeredPipeline:
    """The toy pipeline with its bundle and stand-in detectors (random read-outs, τ = 0)."""
    bundle = SteeringBundle.load(ASSETS / "toy-bundle")
    m = bundle.manifest
    g = torch.Generator().manual_seed(0)
    c = len(m.concepts)
    bundle.detectors = ConceptDetectors(
        [x.name for x in m.concepts], torch.randn(c, m.steps, m.n_latents, generator=g),
        torch.zeros(c, m.steps), torch.zeros(c))
    pipe = SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline").pipe
    return SteeredPipeline(pipe, bundle)


def generate(toy: SteeredPipeline, edits: list[ConceptEdit]):
    return toy.generate(GenerationRequest.batch(PROMPTS, [5, 6], edits=edits, steps=8,
                                                guidance=4.0))


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(im) for im in result.images]


def test_a_final_edit_alone_is_the_same_edit(toy: SteeredPipeline) -> None:
    plain = generate(toy, [ConceptEdit("red")])
    final = generate(toy, [ConceptEdit("red", final=True)])
    assert all(np.array_equal(a, b) for a, b in zip(pixels(plain), pixels(final), strict=True))
    assert final.edits[0].final


def test_the_final_stage_gates_on_what_the_other_edits_made(toy: SteeredPipeline,
                                                            monkeypatch) -> None:
    seen: list[list[torch.Tensor]] = []
    original = hooks_module.ConceptGate.update

    def spy(self, values, indices, row):
        if not seen or len(seen[-1]) == 2:
            seen.append([])
        seen[-1].append(indices.clone())
        return original(self, values, indices, row)

    monkeypatch.setattr(hooks_module.ConceptGate, "update", spy)
    out = generate(toy, [ConceptEdit("red", final=True), ConceptEdit("yellow", gamma=3.0)])
    assert len(seen) == 8 and all(len(step) == 2 for step in seen)  # two gates, every step
    # step 0 starts from the same activations; the final gate then reads the yellow edit's
    # output, which differs from what the first stage read
    assert any(not torch.equal(first, final) for first, final in seen)
    unedited = generate(toy, [])
    assert not all(np.array_equal(a, b)
                   for a, b in zip(pixels(out), pixels(unedited), strict=True))


def test_detection_before_and_after_the_edit(toy: SteeredPipeline) -> None:
    unedited = generate(toy, [])
    assert len(unedited.detection) == 2 and unedited.detection_after == unedited.detection
    assert all(0.0 <= p <= 1.0 for row in unedited.detection for p in row.values())
    edited = generate(toy, [ConceptEdit("yellow", gamma=3.0)])
    # the codes each step starts from are those the edits of earlier steps made, so only
    # the first step matches; the read on the edited output differs
    assert edited.detection_after != edited.detection
    assert set(edited.detection_after[0]) == set(toy.concepts)


def test_bundles_without_detectors_report_no_after(toy: SteeredPipeline) -> None:
    bundle = dataclasses.replace(toy.bundle, detectors=None)
    plain = SteeredPipeline(toy.pipe, bundle)
    out = plain.generate(GenerationRequest.batch(PROMPTS, [5, 6], steps=4, guidance=4.0,
                                                 edits=[ConceptEdit("red")]))
    assert out.detection and out.detection_after == []


def test_suppressing_a_whole_closed_kind_is_refused_before_generating(toy: SteeredPipeline
                                                                     ) -> None:
    from steering.edits import EditError

    assert toy.bundle.manifest.closed_kinds == ["shape", "colour", "background"]
    every_colour = [ConceptEdit(c) for c in ("red", "green", "blue", "yellow")]
    with pytest.raises(EditError, match="'colour' is closed") as err:
        generate(toy, every_colour)
    assert err.value.field == "concepts"
    # a final (policy) suppression counts too: the request and the policy together
    with pytest.raises(EditError, match="closed"):
        generate(toy, [*every_colour[:3], ConceptEdit("yellow", final=True)])
