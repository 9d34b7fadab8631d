"""Side-by-side "original | steered" contact sheets for comparing generations."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

LABEL_H = 14
GAP = 4


def _scale(image: Image.Image, min_side: int) -> tuple[int, int]:
    """Integer upscale (nearest) so tiny toy images stay visible."""
    w, h = image.size
    scale = max(1, min_side // max(w, h))
    return w * scale, h * scale


def grid(images: Sequence[Image.Image], min_side: int = 128) -> Image.Image:
    """All images in one row, upscaled like the side-by-side sheet."""
    if not images:
        raise ValueError("need at least one image")
    cw, ch = _scale(images[0], min_side)
    sheet = Image.new("RGB", (len(images) * (cw + GAP) + GAP, ch + 2 * GAP), "white")
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB").resize((cw, ch), Image.NEAREST), (GAP + i * (cw + GAP), GAP))
    return sheet


def side_by_side(originals: Sequence[Image.Image], steered: Sequence[Image.Image],
                 min_side: int = 192) -> Image.Image:
    """One row per image: original left, steered right; small images are upscaled (nearest)."""
    if len(originals) != len(steered) or not originals:
        raise ValueError("need the same, non-zero number of original and steered images")
    cw, ch = _scale(originals[0], min_side)
    sheet = Image.new("RGB", (2 * cw + 3 * GAP, LABEL_H + len(originals) * (ch + GAP) + GAP),
                      "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, 1), "original", fill="black")
    draw.text((2 * GAP + cw, 1), "steered", fill="black")
    for i, (a, b) in enumerate(zip(originals, steered, strict=True)):
        y = LABEL_H + i * (ch + GAP)
        sheet.paste(a.convert("RGB").resize((cw, ch), Image.NEAREST), (GAP, y))
        sheet.paste(b.convert("RGB").resize((cw, ch), Image.NEAREST), (2 * GAP + cw, y))
    return sheet
