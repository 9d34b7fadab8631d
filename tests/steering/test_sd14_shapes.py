"""SD-1.4 shapes at the hook point, checked on the meta device (no weights, no download)."""

from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.models import Transformer2DModel

from steering.fingerprint import HOOK_POINT
from steering.hooks import active_hook_names, attached, output_tensor, to_tokens
from steering.sd14 import SD14_UNET_CONFIG, build_sd14_unet


class _ShapeRecorder(ModelHook):
    """Records the shape of the hooked block's output tensor on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.token_shapes: list[tuple[int, ...]] = []

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        x = output_tensor(output)
        self.shapes.append(tuple(x.shape))
        self.token_shapes.append(tuple(to_tokens(x).shape))
        return output


def test_sd14_hook_point_shapes_with_cfg_batch() -> None:
    unet = build_sd14_unet("meta")
    assert unet.device.type == "meta"
    assert dict(unet.config)["cross_attention_dim"] == SD14_UNET_CONFIG["cross_attention_dim"]
    assert isinstance(unet.up_blocks[1].attentions[1], Transformer2DModel)
    block = unet.get_submodule(HOOK_POINT)
    assert block is unet.up_blocks[1].attentions[1]

    recorder = _ShapeRecorder()
    with torch.device("meta"):
        latents = torch.randn(2, 4, 64, 64)  # CFG: cat([uncond, cond]), 512x512 images
        timestep = torch.tensor([981, 981])
        text = torch.randn(2, 77, 768)
    with torch.no_grad(), attached([(block, "shape", recorder)]):
        assert active_hook_names(block) == ["sae_steering.shape"]
        out = unet(latents, timestep, encoder_hidden_states=text).sample

    assert tuple(out.shape) == (2, 4, 64, 64)
    assert recorder.shapes == [(2, 1280, 16, 16)]
    assert recorder.token_shapes == [(512, 1280)]
    assert active_hook_names(block) == []
