"""`steer gallery`: a concept × γ grid, unedited column first, rows parsed from concept=prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from steering.cli import app
from steering.edits import Direction
from steering.gallery import GAP, HEADER_H, LABEL_W, GalleryRow, render_gallery
from steering.pipeline import SteeredPipeline


def test_rows_parse_and_refuse_bad_specs() -> None:
    assert GalleryRow.parse("red=a red circle") == GalleryRow("red", "a red circle")
    assert GalleryRow.parse("+blue = a blue square").direction == Direction.AMPLIFY
    for bad in ("red", "=a prompt", "red="):
        with pytest.raises(ValueError, match="concept=prompt"):
            GalleryRow.parse(bad)


def test_gallery_grid_has_one_cell_per_row_and_gamma(tiny_pipeline_dir: Path,
                                                     tiny_bundle_dir: Path) -> None:
    steered = SteeredPipeline.from_pretrained(tiny_pipeline_dir, tiny_bundle_dir)
    rows = [GalleryRow("red", "a red circle"), GalleryRow("circle", "a green circle")]
    seen: list[tuple[int, int]] = []
    image = render_gallery(steered, rows, [0, 40], seed=5, n_seeds=2, steps=3, cell_side=16,
                           progress=lambda d, t: seen.append((d, t)))
    strip = 2 * 16 + 2
    assert image.size == (LABEL_W + 2 * (strip + GAP) + GAP, HEADER_H + 2 * (16 + GAP) + GAP)
    assert seen[-1] == (4, 4)
    pixels = np.asarray(image).astype(int)
    y = HEADER_H
    unedited = pixels[y:y + 16, LABEL_W:LABEL_W + strip]
    steered_cell = pixels[y:y + 16, LABEL_W + strip + GAP:LABEL_W + 2 * strip + GAP]
    assert np.abs(unedited - steered_cell).max() > 0  # γ = 40 changed the image
    with pytest.raises(ValueError, match="unknown concept"):
        render_gallery(steered, [GalleryRow("purple", "x")], [0])


def test_cli_writes_the_png(tiny_pipeline_dir: Path, tiny_bundle_dir: Path,
                            tmp_path: Path) -> None:
    out = tmp_path / "g.png"
    result = CliRunner().invoke(app, [
        "gallery", "--out", str(out), "--pipeline", str(tiny_pipeline_dir), "--bundle",
        str(tiny_bundle_dir), "--row", "red=a red circle", "--gamma", "0", "--gamma", "20",
        "--seeds", "1", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size[0] > LABEL_W
    bad = CliRunner().invoke(app, ["gallery", "--out", str(out), "--pipeline",
                                   str(tiny_pipeline_dir), "--bundle", str(tiny_bundle_dir),
                                   "--row", "nonsense"])
    assert bad.exit_code != 0 and "concept=prompt" in bad.output
