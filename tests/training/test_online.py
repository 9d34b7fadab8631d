"""PipelineSource (online mode): blocks are generated on demand and equal the stored shards."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from training.activations.collect import collect
from training.activations.loader import ActivationLoader
from training.activations.online import PipelineSource
from training.activations.prompts import PromptRecord, load_prompts, write_prompts


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)


def test_blocks_equal_the_collected_store(pipe, tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_prompts(path, [PromptRecord(i, f"a {c} circle", {"colour": c}, seed=i)
                         for i, c in enumerate(["red", "green", "blue", "red", "green"])])
    settings = dict(steps=3, guidance=4.0, captured_steps=[1, 2], batch_size=2)
    store = collect(pipe, path, tmp_path / "store", prompts_per_shard=2, progress=False,
                    **settings)
    source = PipelineSource(pipe, load_prompts(path), prompts_per_block=2, **settings)
    assert source.d_in == store.manifest.d_in == 64
    assert source.block_rows() == [store.shard_rows(s) for s in store.shard_ids()] == \
        [256, 256, 128]
    assert source.manifest.timesteps == store.manifest.timesteps
    for b in (2, 0, 1):  # any order: each block is generated from its own prompts and seeds
        block = source.read_block(b)
        assert block.dtype == torch.float16
        np.testing.assert_array_equal(block.numpy(), store.shard_array(b))
    with pytest.raises(IndexError):
        source.read_block(3)

    # Through the loader (its prefetch thread runs the pipeline): one epoch = every stored row.
    with ActivationLoader(source, batch_size=128, buffer_blocks=2) as loader:
        stream = iter(loader)
        epoch = torch.cat([next(stream) for _ in range(loader.epoch_rows // 128)])
    stored = np.concatenate([store.shard_array(s) for s in store.shard_ids()])
    assert epoch.shape == stored.shape
    np.testing.assert_array_equal(np.unique(epoch.numpy(), axis=0),
                                  np.unique(stored.astype(np.float32), axis=0))
