"""Stage 3: the UNet and the small CLIP text encoder, trained jointly on captioned renders."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from training.toyworld.captions import caption
from training.toyworld.checkpoint import load_state, save_state
from training.toyworld.data import step_rng, to_tensor
from training.toyworld.loop import train
from training.toyworld.models import build_text_encoder, build_unet, training_scheduler
from training.toyworld.render import render_batch
from training.toyworld.world import Scene

EMPTY_CAPTION_P = 0.1


@torch.no_grad()
def latent_dataset(
    work_dir: Path, seed: int, vae: AutoencoderKL, n: int, chunk: int = 512
) -> tuple[torch.Tensor, list[Scene]]:
    """Render ``n`` scenes once and keep their VAE posterior means: the UNet then trains at
    its own speed instead of re-encoding every batch. Cached in work_dir."""
    path = work_dir / f"latents-{n}.pt"
    cached = load_state(path)
    if cached is not None:
        return cached["mean"], cached["scenes"]
    means, scenes = [], []
    for i in tqdm(range(0, n, chunk), desc="encode scenes"):
        images, sc = render_batch(step_rng(seed, "latents", i), min(chunk, n - i))
        means.append(vae.encode(to_tensor(images)).latent_dist.mean)
        scenes.extend(sc)
    state = {"mean": torch.cat(means), "scenes": scenes}
    save_state(path, state)
    return state["mean"], scenes


def encode_text(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, captions: list[str]):
    """Token embeddings exactly as StableDiffusionPipeline.encode_prompt makes them."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids
    return text_encoder(ids)[0]


def train_unet(
    work_dir: Path,
    seed: int,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    steps: int = 3000,
    batch: int = 64,
    lr: float = 5e-4,
    n_scenes: int = 32768,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Train (or resume) UNet + text encoder with x0 ("sample") prediction."""
    torch.manual_seed(seed)
    mean, scenes = latent_dataset(work_dir, seed, vae, n_scenes)
    unet, text_encoder = build_unet(), build_text_encoder()
    noise_scheduler = training_scheduler()
    vae.requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)

    def step_fn(step: int) -> torch.Tensor:
        rng = step_rng(seed, "unet", step)
        idx = rng.integers(0, len(scenes), batch)
        captions = ["" if rng.random() < EMPTY_CAPTION_P else caption(scenes[i], rng) for i in idx]
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        # The posterior mean, not a sample: this tiny VAE's posterior std (≈0.76) exceeds the
        # spread of its means (≈0.60), so sampled targets were mostly unpredictable noise.
        latents = mean[idx] * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, encode_text(tokenizer, text_encoder, captions)).sample
        return torch.nn.functional.mse_loss(pred, latents)

    modules = {"unet": unet, "text_encoder": text_encoder}
    train("unet+text", modules, opt, steps, step_fn, work_dir / "unet.pt", warmup=200)
    return unet, text_encoder
