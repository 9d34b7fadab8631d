"""UnlearnCanvas-style steering metrics with 95 % confidence intervals.

While suppressing a set of concepts, each image is judged by the attribute classifier
(``predicted``: kind -> concept) against what its prompt asked for (``asked``: kind ->
concept, only the kinds the prompt names):

- UA (unlearning accuracy): over images whose prompt asks for a suppressed concept, the
  share in which the classifier finds **none** of the suppressed concepts (one trial per
  image: with red and green suppressed, a red prompt turned green is not removed);
- IRA (in-domain retain accuracy): over images whose prompt asks, in a suppressed concept's
  kind, for a concept that is not suppressed, the share in which that concept is found;
- CRA (cross-domain retain accuracy): over all images, the share in which every asked
  attribute of the other kinds (kinds with no suppressed concept) is found.

Intervals are Wilson score intervals (right at 0 and 1, where the normal one is not).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Rate:
    """``successes`` of ``trials`` with its Wilson 95 % interval; NaN without trials."""

    successes: int
    trials: int

    @property
    def value(self) -> float:
        return self.successes / self.trials if self.trials else math.nan

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.trials)

    def to_dict(self) -> dict[str, float | int]:
        lo, hi = self.ci95
        return {"value": self.value, "ci95_low": lo, "ci95_high": hi,
                "successes": self.successes, "trials": self.trials}


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ((nan, nan) without trials)."""
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return math.nan, math.nan
    p, n = successes / trials, trials
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Judged:
    """One image: what its prompt asked for, what the classifier found, a digest of its
    pixels (to tell an untouched image from an edited one) and, where the method reports it,
    the concepts the bundle's detectors found in the run (None when not recorded)."""

    asked: Mapping[str, str]
    predicted: Mapping[str, str]
    pixels: str = ""
    detected: frozenset[str] | None = None


def steering_metrics(judged: Sequence[Judged], suppressed: Collection[str],
                     kind_of: Mapping[str, str]) -> dict[str, Rate]:
    """UA, IRA and CRA of images generated while ``suppressed`` concepts were steered away."""
    if not suppressed:
        raise ValueError("steering metrics need at least one suppressed concept")
    unknown = [c for c in suppressed if c not in kind_of]
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown}; known: {', '.join(kind_of)}")
    kinds = {kind_of[c] for c in suppressed}
    ua = ira = cra = (0, 0)
    for image in judged:
        if any(image.asked.get(kind) in suppressed for kind in kinds):
            removed = not any(c in suppressed for c in image.predicted.values())
            ua = (ua[0] + removed, ua[1] + 1)
        for kind in kinds:
            wanted = image.asked.get(kind)
            if wanted is not None and wanted not in suppressed:
                found = image.predicted.get(kind)
                ira = (ira[0] + (found == wanted), ira[1] + 1)
        others = {k: v for k, v in image.asked.items() if k not in kinds}
        if others:
            kept = all(image.predicted.get(k) == v for k, v in others.items())
            cra = (cra[0] + kept, cra[1] + 1)
    return {"UA": Rate(*ua), "IRA": Rate(*ira), "CRA": Rate(*cra)}


@dataclass(frozen=True)
class Paired:
    """One prompt/seed judged twice: unedited and steered, with whether any pixel changed."""

    unedited: Mapping[str, str]
    steered: Mapping[str, str]
    changed: bool


def implicit_metrics(pairs: Sequence[Paired], concept: str) -> dict[str, Rate]:
    """What steering ``concept`` does to images whose prompt never names its kind:

    - removal: of the images whose unedited version shows ``concept`` (judge), the share whose
      steered version does not;
    - false_edits: of the images whose unedited version does not show it, the share whose
      steered image differs in any pixel (an open-world gate should leave them alone);
    - kept: of those same images, the share whose judge labels are all unchanged.
    """
    removal = false_edits = kept = (0, 0)
    for p in pairs:
        if concept in p.unedited.values():
            removal = (removal[0] + (concept not in p.steered.values()), removal[1] + 1)
        else:
            false_edits = (false_edits[0] + p.changed, false_edits[1] + 1)
            kept = (kept[0] + (dict(p.steered) == dict(p.unedited)), kept[1] + 1)
    return {"removal": Rate(*removal), "false_edits": Rate(*false_edits), "kept": Rate(*kept)}


def detection_metrics(judged: Sequence[Judged], concept: str) -> dict[str, Rate]:
    """The detectors' precision and recall for ``concept`` against the judge, over the
    images whose detections were recorded: precision = judge agrees among the flagged
    images, recall = flagged among the images the judge finds it in."""
    precision = recall = (0, 0)
    for image in judged:
        if image.detected is None:
            continue
        shown, flagged = concept in image.predicted.values(), concept in image.detected
        if flagged:
            precision = (precision[0] + shown, precision[1] + 1)
        if shown:
            recall = (recall[0] + flagged, recall[1] + 1)
    return {"precision": Rate(*precision), "recall": Rate(*recall)}


def pixel_digest(image: Any) -> str:
    """Short digest of an image's pixels: equal digests mean not one pixel differs."""
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()[:16]
