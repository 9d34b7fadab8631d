"""The recording helper: fn(step, timestep, row, x) on a block's output during one pipeline call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from steering.hooks import active_hook_names
from steering.pipeline import SteeredPipeline
from steering.recording import generate_with, recording

ASSETS = Path(__file__).resolve().parents[2] / "assets"
PROMPTS, SEEDS, STEPS = ["a red circle", "a blue square"], [3, 4], 4


@pytest.fixture(scope="module")
def toy() -> SteeredPipeline:
    return SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", ASSETS / "toy-bundle")


def _plain(toy: SteeredPipeline) -> list:
    size = toy.default_size()
    gens = [torch.Generator(toy.pipe.device).manual_seed(s) for s in SEEDS]
    return toy.pipe(prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0,
                    generator=gens, height=size, width=size).images


def test_fn_sees_every_step_with_its_timestep_and_row_and_leaves_images_alone(toy):
    seen = []

    def fn(step, timestep, row, x):
        seen.append((step, timestep, row, tuple(x.shape)))

    images = generate_with(toy, PROMPTS, SEEDS, STEPS, 4.0, fn)
    timesteps, rows = toy.schedule(STEPS)
    assert [s[:3] for s in seen] == list(zip(range(STEPS), timesteps, rows, strict=True))
    assert all(s[3][0] == 2 * len(PROMPTS) for s in seen)  # both CFG halves
    plain = _plain(toy)
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(images, plain, strict=True))
    assert active_hook_names(toy.pipe.unet) == [] and active_hook_names(toy.block) == []


def test_a_returned_tensor_replaces_the_output_of_a_named_block(toy):
    name = next(n for n, m in toy.pipe.unet.named_modules() if m is toy.block)
    edited = generate_with(toy, PROMPTS, SEEDS, STEPS, 4.0, {name: lambda s, t, r, x: -x})
    plain = _plain(toy)
    assert not any(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(edited, plain, strict=True))


def test_hooks_are_removed_when_fn_raises_and_rows_need_tables(toy):
    class Stop(Exception):
        pass

    def stop(step, timestep, row, x):
        assert row is None  # no row_of given: rows are the caller's business
        raise Stop

    with pytest.raises(Stop), recording(toy.pipe.unet, {toy.block: stop}):
        _plain(toy)
    assert active_hook_names(toy.pipe.unet) == [] and active_hook_names(toy.block) == []
