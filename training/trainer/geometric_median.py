"""Geometric median by Weiszfeld's iteration (as sparsify used for b_dec), over a row sample."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Point minimising the sum of Euclidean distances to the rows of ``points`` [N, d].

    Starts at the mean and reweights by inverse distance (computed in float64); stops when a
    step moves less than ``tol`` times the sample's scale.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [N, d] tensor, got "
                         f"{list(points.shape)}")
    p = points.to(torch.float64)
    guess = p.mean(dim=0)
    scale = float(torch.linalg.vector_norm(p - guess, dim=1).mean()) or 1.0
    eps = 1e-12 * scale
    for _ in range(max_iter):
        dist = torch.linalg.vector_norm(p - guess, dim=1).clamp_min(eps)
        w = 1.0 / dist
        new = (w[:, None] * p).sum(dim=0) / w.sum()
        moved = float(torch.linalg.vector_norm(new - guess))
        guess = new
        if moved < tol * scale:
            break
    return guess.to(points.dtype)
