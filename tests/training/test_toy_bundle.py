"""The shipped toy bundle: it loads for the shipped pipeline, meets its build targets, and
steering "red" visibly removes red (the attribute classifier is the judge)."""

from __future__ import annotations

import json

import pytest

from steering.bundle import SteeringBundle
from steering.fingerprint import pipeline_fingerprint
from steering.pipeline import SteeredPipeline
from tests.conftest import ASSETS
from training.toyworld.build import load_pipeline
from training.toyworld.bundle_report import TARGETS
from training.toyworld.classifier import AttributeClassifier
from training.toyworld.steering_check import removal_check
from training.toyworld.world import KINDS

BUNDLE = ASSETS / "toy-bundle"


@pytest.fixture(scope="module")
def steered() -> SteeredPipeline:
    pipe = load_pipeline(ASSETS / "toy-pipeline")
    return SteeredPipeline(pipe, SteeringBundle.load(BUNDLE, pipeline_fingerprint(pipe.unet)))


def test_bundle_is_small_and_documented() -> None:
    size = sum(f.stat().st_size for f in BUNDLE.iterdir() if f.is_file())
    assert size <= 25e6  # the learned swaps (format 3) are 15.8 MB of it
    assert "FVU" in (BUNDLE / "BUILD.md").read_text()


def test_bundle_meets_its_build_targets() -> None:
    build = json.loads((BUNDLE / "build.json").read_text())
    bundle = SteeringBundle.load(BUNDLE)
    held = build["heldout"]
    assert held["fvu"] <= TARGETS["fvu"]
    assert held["dead_pct"] <= TARGETS["dead_pct"]
    assert 0.75 * bundle.manifest.k <= held["l0"] <= bundle.manifest.k
    names = {c.name: c.kind for c in bundle.manifest.concepts}
    assert names == {c: kind for kind, members in KINDS.items() for c in members}


def test_steering_red_removes_red(steered: SteeredPipeline) -> None:
    """At the strength the toy policy uses (the learned swap red → green at γ 2) red goes.
    The bundle's own defaults are chosen for the best mean of removal and retention
    (docs/results.md), so they are not what this checks."""
    classifier = AttributeClassifier.from_pretrained(ASSETS / "toy-classifier")
    result = removal_check(steered, classifier, "red", count=6, gamma=2.0,
                           percentile=steered.concepts["red"].default_percentile)
    assert result["present_plain"] >= 5 / 6  # the pipeline draws red when asked …
    assert result["present_steered"] <= 1 / 6  # … and the strong edit takes it away
