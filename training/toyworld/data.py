"""Per-step RNGs (resumable by step index) and image/label tensor conversions."""

from __future__ import annotations

import numpy as np
import torch

from training.toyworld.world import Scene


def step_rng(seed: int, stage: str, step: int) -> np.random.Generator:
    """The RNG for one training step: the same batch whether or not the run was resumed."""
    return np.random.default_rng([seed, sum(map(ord, stage)), step])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def labels(scenes: list[Scene]) -> torch.Tensor:
    """Class indices [B, 3] (shape, colour, background)."""
    return torch.tensor([s.label_indices() for s in scenes], dtype=torch.long)
