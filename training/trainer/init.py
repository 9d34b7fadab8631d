"""Data-dependent initialisation from a sample of the first global batches."""

from __future__ import annotations

import torch
from torch import Tensor

from steering.sae import TopKSAE
from training.trainer.encode import topk_encode
from training.trainer.geometric_median import geometric_median


@torch.no_grad()
def initialise_from_sample(sae: TopKSAE, sample: Tensor, pre: Tensor) -> float:
    """b_dec := geometric median of ``sample``; E := s·D with s fit by least squares.

    E keeps D's directions (the recipe initialises E equal to D); the scalar s minimises
    Σ‖(x − b_dec) − s·Σ_j z_j d_j‖² over the sample, where z is the unit-E encoding. TopK's
    choice of latents does not depend on s > 0, so only the initial reconstruction's scale
    changes (unit E overshoots with k random directions). ``pre`` [rows, n] is scratch, used in
    chunks of its rows. Returns s.
    """
    sae.b_dec.copy_(geometric_median(sample).to(sae.b_dec.dtype))
    sae.encoder.weight.copy_(sae.W_dec)
    sae.encoder.bias.zero_()
    dot = torch.zeros((), dtype=torch.float64, device=sample.device)
    sq = torch.zeros((), dtype=torch.float64, device=sample.device)
    for x in sample.split(pre.shape[0]):
        buf = pre[: x.shape[0]]
        enc = topk_encode(x, sae.b_dec, sae.encoder.weight, sae.encoder.bias, sae.k, buf)
        y = sae.decode(enc.values, enc.indices) - sae.b_dec
        dot += (y * (x - sae.b_dec)).sum(dtype=torch.float64)
        sq += y.pow(2).sum(dtype=torch.float64)
    scale = float(dot / sq) if float(sq) > 0 else 1.0
    if scale > 0:
        sae.encoder.weight.mul_(scale)
    return scale
