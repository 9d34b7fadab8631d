"""A complete activation store of random float16 rows, for benchmarks (reused when present).

Written with the store's own ShardWriter, so the files are exactly what `steer collect` makes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.activations.prompts import PromptRecord, write_prompts
from training.activations.store import (
    FORMAT_VERSION,
    ActivationStore,
    ShardWriter,
    StoreError,
    StoreManifest,
    atomic_write,
)


def build_random_store(directory: Path, d_in: int, prompts: int, tokens_per_step: int,
                       steps: int, prompts_per_shard: int, seed: int, command: str,
                       side: int = 512) -> ActivationStore:
    """``prompts`` × ``steps`` × ``tokens_per_step`` standard-normal rows of width ``d_in``."""
    rows_per_prompt = tokens_per_step * steps
    try:
        store = ActivationStore.open(directory)
        m = store.manifest
        if (store.complete and store.num_rows == prompts * rows_per_prompt
                and m.prompts_per_shard == prompts_per_shard and m.d_in == d_in):
            return store
    except (StoreError, FileNotFoundError):
        pass
    manifest = StoreManifest(
        format_version=FORMAT_VERSION, d_in=d_in, dtype="float16", hook_point="bench",
        pipeline_fingerprint="bench", scheduler={}, num_inference_steps=steps,
        guidance_scale=7.5, height=side, width=side, tokens_per_step=tokens_per_step,
        timesteps=list(range(steps)), captured_steps=list(range(steps)),
        prompts_sha256="bench", num_prompts=prompts, prompts_per_shard=prompts_per_shard,
        num_shards=-(-prompts // prompts_per_shard), command=command)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "store.json", manifest.to_json().encode())
    write_prompts(directory / "prompts.jsonl",
                  [PromptRecord(i, f"bench {i}", {}, i) for i in range(prompts)])
    rng = np.random.default_rng(seed)
    for shard in range(manifest.num_shards):
        writer = ShardWriter(directory, manifest, shard)
        for pid in manifest.shard_prompts(shard):
            writer.write_prompt(pid, rng.standard_normal((rows_per_prompt, d_in), np.float32))
        writer.commit()
    return ActivationStore.open(directory)
