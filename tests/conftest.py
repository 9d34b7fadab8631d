"""Shared fixtures: a tiny random SD-architecture pipeline on disk and a bundle made for it.

They exercise the real code paths (diffusers folder layout, fingerprint check, hooks) in
seconds, without the trained toy assets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from steering.bundle import SteeringBundle
from steering.concepts import ConceptSpec
from steering.fingerprint import pipeline_fingerprint
from steering.importance_tables import ImportanceTables
from steering.sae import SaeConfig, TopKSAE
from training.toyworld.models import (
    build_text_encoder,
    build_unet,
    build_vae,
    sampling_scheduler,
)
from training.toyworld.tokenizer import build_clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
TINY_STEPS = 6
TINY_CONCEPTS = {"red": "colour", "green": "colour", "blue": "colour",
                 "circle": "shape", "square": "shape"}


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised toy-architecture StableDiffusionPipeline saved in diffusers layout."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-pipeline")
    tokenizer = build_clip_tokenizer(out / "tok")
    pipe = StableDiffusionPipeline(
        vae=build_vae(), text_encoder=build_text_encoder(), tokenizer=tokenizer,
        unet=build_unet(), scheduler=sampling_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "pipe")
    return out / "pipe"


def make_bundle(pipeline_dir: Path, out: Path, seed: int = 0, n_latents: int = 128,
                k: int = 8, steps: int = TINY_STEPS) -> Path:
    """A random but well-formed bundle whose fingerprint matches ``pipeline_dir``'s UNet."""
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SaeConfig(d_in=64, num_latents=n_latents, k=k))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(n_latents, 64, generator=gen))
        sae.set_decoder_norm_to_unit_norm()
        sae.encoder.weight.copy_(sae.W_dec)
    pipe.scheduler.set_timesteps(steps)
    names = list(TINY_CONCEPTS)
    tables = ImportanceTables(
        concepts=names,
        scores=torch.randn(len(names), steps, n_latents, generator=gen),
        means=torch.rand(len(names), steps, n_latents, generator=gen),
        timesteps=pipe.scheduler.timesteps.clone(),
    )
    specs = [ConceptSpec(n, kind, default_gamma=5.0, gamma_range=(0.5, 50.0),
                         default_percentile=90.0) for n, kind in TINY_CONCEPTS.items()]
    bundle = SteeringBundle.create(
        sae, tables, specs, pipeline_fingerprint(pipe.unet), pipe.scheduler,
        command="tests/conftest.py make_bundle")
    bundle.save(out)
    return out


@pytest.fixture(scope="session")
def tiny_bundle_dir(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random bundle made for the tiny pipeline."""
    return make_bundle(tiny_pipeline_dir, tmp_path_factory.mktemp("tiny-bundle"))
