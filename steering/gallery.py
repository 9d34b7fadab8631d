"""A gallery: what steering does, as one PNG — rows of concepts, columns of γ, a few seeds.

Each row asks for its concept in the prompt and suppresses (or amplifies) it at every γ of
the columns; γ = 0 is the unedited generation. Image i of a cell uses seed + i, the same in
every cell, so a row reads left to right as one image changing with γ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from steering.edits import ConceptEdit, Direction
from steering.pipeline import GenerationRequest, SteeredPipeline

GAP, HEADER_H, LABEL_W = 6, 22, 150


@dataclass(frozen=True)
class GalleryRow:
    """One row: the concept edited and a prompt that asks for it."""

    concept: str
    prompt: str
    direction: Direction = Direction.SUPPRESS

    @classmethod
    def parse(cls, spec: str) -> GalleryRow:
        """``[+]concept=prompt`` (``+`` amplifies), e.g. ``red=a red circle on a plain
        background``."""
        name, sep, prompt = spec.partition("=")
        if not sep or not name.strip() or not prompt.strip():
            raise ValueError(f"cannot parse gallery row {spec!r}; use concept=prompt, e.g. "
                             "'red=a red circle on a plain background'")
        name = name.strip()
        direction = Direction.AMPLIFY if name.startswith("+") else Direction.SUPPRESS
        return cls(name.lstrip("+-"), prompt.strip(), direction)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_gallery(steered: SteeredPipeline, rows: Sequence[GalleryRow],
                   gammas: Sequence[float], seed: int = 0, n_seeds: int = 3, steps: int = 20,
                   guidance: float = 4.0, cell_side: int = 72,
                   progress: Callable[[int, int], None] | None = None) -> Image.Image:
    """The gallery image: one generation of ``n_seeds`` images per (row, γ)."""
    if not rows or not gammas:
        raise ValueError("a gallery needs at least one row and one gamma")
    known = steered.concepts
    unknown = [r.concept for r in rows if r.concept not in known]
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown}; the bundle has: {', '.join(known)}")
    strip_w = n_seeds * cell_side + (n_seeds - 1) * 2
    width = LABEL_W + len(gammas) * (strip_w + GAP) + GAP
    height = HEADER_H + len(rows) * (cell_side + GAP) + GAP
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    bold, small = _font(13), _font(10)
    for j, gamma in enumerate(gammas):
        x = LABEL_W + j * (strip_w + GAP)
        draw.text((x, 4), "unedited" if gamma == 0 else f"gamma = {gamma:g}", fill="black",
                  font=bold)
    total, done = len(rows) * len(gammas), 0
    for i, row in enumerate(rows):
        y = HEADER_H + i * (cell_side + GAP)
        sign = "+" if row.direction == Direction.AMPLIFY else "-"
        draw.text((GAP, y + 4), f"{sign}{row.concept}", fill="black", font=bold)
        draw.multiline_text((GAP, y + 24), _wrap(row.prompt, 24), fill="dimgray", font=small)
        for j, gamma in enumerate(gammas):
            edits = [ConceptEdit(row.concept, gamma=float(gamma), direction=row.direction)]
            result = steered.generate(GenerationRequest(
                row.prompt, edits=edits if gamma else (), seed=seed, steps=steps,
                guidance=guidance, n_images=n_seeds))
            x = LABEL_W + j * (strip_w + GAP)
            for k, image in enumerate(result.images):
                sheet.paste(image.convert("RGB").resize((cell_side, cell_side), Image.NEAREST),
                            (x + k * (cell_side + 2), y))
            done += 1
            if progress is not None:
                progress(done, total)
    return sheet


def _wrap(text: str, width: int) -> str:
    """Greedy word wrap to ``width`` characters per line (at most three lines)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines[:3])
