"""Stage 1: the tiny AutoencoderKL that maps 32×32 renders to 16×16×4 latents."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from training.toyworld.data import step_rng, to_tensor
from training.toyworld.loop import train
from training.toyworld.models import build_vae
from training.toyworld.render import render_batch

KL_WEIGHT = 1e-5


def train_vae(work_dir: Path, seed: int, steps: int = 800, batch: int = 32) -> AutoencoderKL:
    """Train (or resume) the VAE, then set its scaling_factor to 1/std of the latents."""
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)

    def step_fn(step: int) -> torch.Tensor:
        rng = step_rng(seed, "vae", step)
        x = to_tensor(render_batch(rng, batch)[0])
        posterior = vae.encode(x).latent_dist
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        recon = vae.decode(posterior.sample(generator=gen)).sample
        return torch.nn.functional.mse_loss(recon, x) + KL_WEIGHT * posterior.kl().mean()

    train("vae", {"vae": vae}, opt, steps, step_fn, work_dir / "vae.pt")
    with torch.no_grad():
        x = to_tensor(render_batch(step_rng(seed, "vae-scale", 0), 512)[0])
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae
