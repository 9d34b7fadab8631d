"""Online mode: a BlockSource that generates its activations on demand (nothing on disk).

Block b holds prompts [b·P, (b+1)·P), generated when the loader asks for it. The loader's
prefetch thread calls :meth:`PipelineSource.read_block`, so its bounded queue is the buffer
between collection and training. A block's rows are those of store shard b collected with
the same settings and prompts_per_shard = P.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from steering.fingerprint import HOOK_POINT
from steering.pipeline import pipeline_default_size
from training.activations.collect import capture_activations, plan_store
from training.activations.prompts import PromptRecord
from training.activations.store import StoreManifest


class PipelineSource:
    """Loader BlockSource over prompts run through the pipeline with the capture hook."""

    def __init__(self, pipe: Any, prompts: Sequence[PromptRecord], steps: int = 50,
                 guidance: float = 7.5, height: int | None = None, width: int | None = None,
                 captured_steps: Sequence[int] | None = None, prompts_per_block: int = 64,
                 batch_size: int = 8, command: str = "", hook_point: str = HOOK_POINT) -> None:
        if not prompts:
            raise ValueError("PipelineSource needs at least one prompt")
        if prompts_per_block < 1 or batch_size < 1:
            raise ValueError("prompts_per_block and batch_size must be >= 1")
        self.pipe, self.prompts = pipe, list(prompts)
        self.batch_size, self.hook_point = batch_size, hook_point
        size = pipeline_default_size(pipe)
        text = "".join(p.to_json() + "\n" for p in self.prompts)
        #: What a store collected with these settings would record (d_in, timesteps, ...).
        self.manifest: StoreManifest = plan_store(
            pipe, self.prompts, hashlib.sha256(text.encode()).hexdigest(), steps, guidance,
            height or size, width or size, captured_steps, prompts_per_block, command,
            hook_point)
        self.d_in = self.manifest.d_in

    def block_rows(self) -> list[int]:
        """Rows of every block: its prompts × captured steps × tokens per step."""
        return [self.manifest.shard_rows(b) for b in range(self.manifest.num_shards)]

    def block_prompts(self, i: int) -> list[PromptRecord]:
        """The prompts of block ``i``."""
        return [self.prompts[p] for p in self.manifest.shard_prompts(i)]

    def read_block(self, i: int) -> Tensor:
        """Generate block ``i``: CPU float16 [block_rows()[i], d_in] in (prompt, step, token)
        order."""
        if not 0 <= i < self.manifest.num_shards:
            raise IndexError(f"block {i} of {self.manifest.num_shards}")
        m = self.manifest
        parts = [acts for _, acts in capture_activations(
            self.pipe, self.block_prompts(i), m.num_inference_steps, m.guidance_scale, m.height,
            m.width, m.captured_steps, self.batch_size, hook_point=self.hook_point)]
        return torch.cat(parts)
