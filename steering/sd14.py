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
