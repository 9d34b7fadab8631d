"""Held-out quality of a trained SAE: FVU, mean L0 and dead-latent percentage."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from steering.sae import TopKSAE
from training.trainer.encode import topk_encode

if TYPE_CHECKING:
    from training.activations.loader import BlockSource


@torch.no_grad()
def evaluate_sae(sae: TopKSAE, source: BlockSource, max_rows: int = 1_000_000,
                 batch_rows: int = 4096, seed: int = 0) -> dict[str, float]:
    """FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over up to ``max_rows`` rows of ``source``.

    Blocks are read whole, in a seeded random order (a spread-out sample when max_rows is
    below the source's size). dead_pct: latents that never fire on those rows.
    """
    if source.d_in != sae.d_in:
        raise ValueError(f"held-out activations have d_in={source.d_in}, the SAE {sae.d_in}")
    sizes = source.block_rows()
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(seed)).tolist()
    dev = sae.device
    n = sae.num_latents
    sq_err = torch.zeros((), dtype=torch.float64, device=dev)
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=dev)
    sum_sq = torch.zeros((), dtype=torch.float64, device=dev)
    active = torch.zeros((), dtype=torch.float64, device=dev)
    fired = torch.zeros(n, dtype=torch.bool, device=dev)
    rows = 0
    pre = torch.empty(0, n, dtype=sae.dtype, device=dev)
    for block in order:
        if rows >= max_rows:
            break
        data = source.read_block(block)[: max_rows - rows]
        for x in data.split(batch_rows):
            x = x.to(dev, sae.dtype)
            if pre.shape[0] != x.shape[0]:
                pre = torch.empty(x.shape[0], n, dtype=sae.dtype, device=dev)
            enc = topk_encode(x, sae.b_dec, sae.encoder.weight, sae.encoder.bias, sae.k, pre)
            x_hat = sae.decode(enc.values, enc.indices)
            sq_err += (x - x_hat).pow(2).sum(dtype=torch.float64)
            x64 = x.double()
            sum_x += x64.sum(dim=0)
            sum_sq += x64.pow(2).sum()
            on = enc.values > 0
            active += on.sum()
            fired[enc.indices[on]] = True
        rows += data.shape[0]
    if rows == 0:
        raise ValueError("evaluate_sae: the held-out source has no rows")
    total_var = sum_sq - sum_x.pow(2).sum() / rows
    return {
        "fvu": float(sq_err / total_var),
        "l0": float(active / rows),
        "dead_pct": 100.0 * float((~fired).double().mean()),
        "rows": rows,
    }
