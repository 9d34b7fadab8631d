"""Deterministic per-step batches of rendered scenes and captions (resumable by step index)."""

from __future__ import annotations

import numpy as np
import torch

from training.toyworld.captions import caption
from training.toyworld.render import render_batch
from training.toyworld.world import Scene


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    """The RNG for one training step: the same batch whether or not the run was resumed."""
    return np.random.default_rng([seed, sum(map(ord, stage)), step])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def labels(scenes: list[Scene]) -> torch.Tensor:
    """Class indices [B, 3] (shape, colour, background)."""
    return torch.tensor([s.label_indices() for s in scenes], dtype=torch.long)


def captioned_batch(
    rng: np.random.Generator, batch: int, empty_p: float = 0.1
) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """Images in [-1, 1], varied captions (empty with p = empty_p, for guidance) and scenes."""
    images, scenes = render_batch(rng, batch)
    caps = ["" if rng.random() < empty_p else caption(s, rng) for s in scenes]
    return to_tensor(images), caps, scenes
