"""Compact swap storage and factored serving rows: the shipped toy's swaps re-saved compact
give the images the former storage and materialised rows gave; files read back exactly."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from steering.edits import ConceptEdit
from steering.pipeline import GenerationRequest, SteeredPipeline
from steering.plan import RowCache
from steering.recipes.translate import RowTranslate, TranslateRecipe
from steering.translation import TRANSLATION_FILE, TranslationTables
from tests.conftest import ASSETS

PROMPTS = ["a red circle on a striped background", "a red square on a plain background",
           "a blue triangle on a dotted background"]
SEEDS = [1, 2, 3]
SHIPPED = ASSETS / "toy-bundle" / TRANSLATION_FILE


@pytest.fixture(scope="module")
def toy() -> SteeredPipeline:
    return SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", ASSETS / "toy-bundle")


def images(toy: SteeredPipeline, translations: TranslationTables) -> np.ndarray:
    """The prompts with red suppressed, served from ``translations`` with a fresh row cache."""
    bundle = copy.copy(toy.bundle)
    bundle.translations = translations
    steered = SteeredPipeline(toy.pipe, bundle, row_cache=RowCache())
    result = steered.generate(GenerationRequest.batch(PROMPTS, SEEDS, edits=[ConceptEdit("red")],
                                                      steps=20, guidance=4.0))
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def former_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve as before: deltas [m, d_in] materialised from the shipped float32 basis."""
    with safe_open(str(SHIPPED), framework="pt") as f:
        bases = {k.removesuffix(".basis"): f.get_tensor(k).float() for k in f.keys()  # noqa: SIM118
                 if k.endswith(".basis")}

    def build(self, plan, learned, r):
        name = next(c for c, t in plan.translations.concepts.items() if t is learned)
        feats, coef, _, _ = learned.factors(r, plan.tables.num_latents)
        here = (learned.row == r) & (learned.feature == plan.tables.num_latents)
        bias = (learned.coefficients(torch.nonzero(here).flatten()) @ bases[name][r]).sum(0)
        device, dtype = plan.w_dec.device, plan.swap_dtype
        return RowTranslate(feats.to(device), (coef @ bases[name][r]).to(device, dtype),
                            bias.to(device, dtype))

    monkeypatch.setattr(TranslateRecipe, "build", build)


def save_former_format(tables: TranslationTables, path) -> None:
    """The storage of bundle formats 3–4: int32 ids and a float32 basis."""
    tensors = {}
    for c, t in tables.concepts.items():
        tensors |= {f"{c}.row": t.row.int(), f"{c}.feature": t.feature.int(),
                    f"{c}.coef": t.coef, f"{c}.basis": t.basis.float()}
    save_file(tensors, str(path), metadata={
        "anchors": json.dumps({c: t.anchor for c, t in tables.concepts.items()}),
        "n_latents": str(tables.n_latents), "d_in": str(tables.d_in),
        "num_steps": str(tables.num_steps)})


def test_compact_swaps_give_the_former_images(toy, tmp_path, monkeypatch):
    shipped = TranslationTables.load(SHIPPED)
    save_former_format(shipped, tmp_path / "former.safetensors")
    former = TranslationTables.load(tmp_path / "former.safetensors")  # formats 3–4 still load
    former.save(tmp_path / TRANSLATION_FILE)
    compact = TranslationTables.load(tmp_path / TRANSLATION_FILE)
    size = (tmp_path / TRANSLATION_FILE).stat().st_size
    assert size < 0.9 * (tmp_path / "former.safetensors").stat().st_size
    new = images(toy, compact)
    former_rows(monkeypatch)
    old = images(toy, former)
    # float16 basis and a factored sum instead of float32 materialised rows: rounding only
    assert np.abs(new - old).max() <= 2, np.abs(new - old).max()
    assert np.abs(new - old).mean() < 0.05


def test_compact_file_reads_back_exactly_and_saves_the_same_bytes(tmp_path):
    tables = TranslationTables.load(SHIPPED).quantized()
    tables.save(tmp_path / "a.safetensors")
    back = TranslationTables.load(tmp_path / "a.safetensors")
    for c, t in tables.concepts.items():
        b = back.get(c)
        for name in ("row", "feature", "coef", "basis", "scale"):
            assert torch.equal(getattr(t, name), getattr(b, name)), (c, name)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        dtypes = {k.split(".", 1)[1]: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"row": "U8", "feature": "I16", "coef": "I8", "basis": "F16",
                      "scale": "F16"}
    back.save(tmp_path / "b.safetensors")
    again = TranslationTables.load(tmp_path / "b.safetensors")
    assert all(torch.equal(again.get(c).coef, back.get(c).coef) for c in back.concepts)


def test_pruning_keeps_the_bias_and_the_largest_rows():
    tables = TranslationTables.load(SHIPPED)
    red = tables.get("red")
    kept = red.pruned(0.9, tables.n_latents)
    n = tables.n_latents
    assert int((kept.feature == n).sum()) == int((red.feature == n).sum())
    assert len(kept.row) < len(red.row)
    with pytest.raises(ValueError, match="pruning mass"):
        red.pruned(0.0, n)
