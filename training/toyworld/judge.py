"""A judge for `steer bundle fit-detector` on the toy world: the shipped attribute classifier.

    steer bundle fit-detector BUNDLE ... --judge training.toyworld.judge:judge

Every toy image has one concept of each kind, so the verdict always holds three names; the
detectors still learn present/absent per concept from it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from PIL import Image

from training.toyworld.classifier import AttributeClassifier

CLASSIFIER_DIR = Path(__file__).resolve().parents[2] / "assets" / "toy-classifier"


@cache
def classifier() -> AttributeClassifier:
    """The shipped classifier, loaded once per process."""
    return AttributeClassifier.from_pretrained(CLASSIFIER_DIR)


def judge(images: list[Image.Image]) -> list[set[str]]:
    """The concepts the classifier sees in each image (one per kind)."""
    return [set(found.values()) for found in classifier().predict(images)]
