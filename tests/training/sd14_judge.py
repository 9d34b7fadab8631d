"""A stand-in judge for the random-weight SD-1.4-architecture chain test (`--judge
tests.training.sd14_judge:judge`).

A pipeline with random weights draws no red or blue, so no honest judge of image content
exists for it; this one only has to be deterministic and give `steer bundle tune` both
labels, so that its code paths (judging unedited and steered images, the figures, the
choice) run at SD-1.4 shapes. It calls an image "red" when its mean red-minus-blue value is
above the median of its batch, "blue" otherwise — a relative pixel statistic, not a
detection of anything the prompt asked for.
"""

from __future__ import annotations

from statistics import median

import numpy as np
from PIL import Image


def redness(image: Image.Image) -> float:
    """Mean red minus mean blue channel value of ``image`` (0–255 scale)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    return float(rgb[..., 0].mean() - rgb[..., 2].mean())


def judge(images: list[Image.Image]) -> list[set[str]]:
    """Per image, {"red"} when its redness is above its batch's median, else {"blue"}; a
    batch of one is "red" (so a lone image still has a label)."""
    scores = [redness(im) for im in images]
    if len(scores) == 1:
        return [{"red"}]
    middle = median(scores)
    return [{"red"} if s > middle else {"blue"} for s in scores]
