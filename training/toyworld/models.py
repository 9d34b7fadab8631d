"""Configurations of the toy world's small SD-architecture models (the real diffusers classes).

The recipe was verified on 2 CPU cores: three resolution levels so that the
conditioning flows through ``up_blocks[1].attentions[1]`` (with four it did not).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from training.toyworld.render import IMAGE_SIZE

TEXT_HIDDEN = 64
MAX_TOKENS = 32

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    # SD's own scheduler config has clip_sample=False; True turns every toy sample into noise.
    "clip_sample": False,
    "prediction_type": "sample",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def build_vae() -> AutoencoderKL:
    """Tiny AutoencoderKL: 32×32 RGB ↔ 16×16×4 latents (down-scaling 2)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    """Small SD-1.x-shaped UNet whose up_blocks[1].attentions[1] sees 8×8 tokens of width 64."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
    )


def build_text_encoder() -> CLIPTextModel:
    """Two-layer CLIPTextModel over the full CLIP BPE vocabulary."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=TEXT_HIDDEN,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def training_scheduler() -> DDPMScheduler:
    """The noise schedule used for training."""
    return DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})


def sampling_scheduler() -> DDIMScheduler:
    """The DDIM scheduler shipped with the toy pipeline (clip_sample=False)."""
    return DDIMScheduler(**SCHEDULER_CONFIG)
