"""The Stable Diffusion 1.4 UNet's architecture, buildable without weights or a model hub.

Shape tests and benchmarks need the real SD-1.4 shapes (hook output [2B, 1280, 16, 16] at 512²)
on machines that cannot download weights; this module gives the exact config and a builder.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import UNet2DConditionModel

# CompVis/stable-diffusion-v1-4 unet/config.json, verbatim (every other field is the diffusers
# default). The private "_" keys are ignored by the constructor and by the pipeline fingerprint.
SD14_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.2.2",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}


def build_sd14_unet(
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> UNet2DConditionModel:
    """SD-1.4 UNet without downloading anything: meta (shapes only) or seeded random weights."""
    config = copy.deepcopy(SD14_UNET_CONFIG)
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    else:
        # Random init on CPU under a private RNG state: same weights on any device, global RNG kept.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel.from_config(config)
        unet = unet.to(device=device)
    if dtype != unet.dtype:  # diffusers warns on every dtype cast, so cast only when needed
        unet = unet.to(dtype=dtype)
    return unet.eval()


# CompVis/stable-diffusion-v1-4's text encoder (CLIP ViT-L/14's text tower), VAE and scheduler,
# as configs: with the UNet above they make a pipeline of SD-1.4's architecture.
SD14_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "projection_dim": 768,
}
SD14_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "sample_size": 512,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD14_DDIM_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "num_train_timesteps": 1000,
}


def build_sd14_pipeline(tokenizer: Any, dtype: torch.dtype = torch.float32, seed: int = 0
                        ) -> Any:
    """A StableDiffusionPipeline of SD-1.4's architecture with seeded random weights (UNet,
    768-wide CLIP text encoder, VAE, DDIM): the whole chain runs on it without downloading
    weights. ``tokenizer`` is any CLIPTokenizer (its length is set to SD's 77 tokens)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD14_TEXT_CONFIG)).eval()
        vae = AutoencoderKL(**SD14_VAE_CONFIG).eval()
    tokenizer.model_max_length = SD14_TEXT_CONFIG["max_position_embeddings"]
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        unet=build_sd14_unet("cpu", seed=seed), scheduler=DDIMScheduler(**SD14_DDIM_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe.to(dtype=dtype)
