"""Pipeline fingerprint: tells which UNet (e.g. SD-1.4 vs SD-1.5) a steering bundle fits."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

HOOK_POINT = "up_blocks.1.attentions.1"


def _canonical_config(unet: torch.nn.Module) -> bytes:
    """UNet config as sorted JSON without private keys like _name_or_path/_diffusers_version."""
    config: Any = getattr(unet, "config", None)
    if config is None:
        raise TypeError(f"{type(unet).__name__} has no .config; expected a diffusers UNet")
    items = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    return json.dumps(items, sort_keys=True, default=str).encode("utf-8")


def pipeline_fingerprint(unet: torch.nn.Module, hook_point: str = HOOK_POINT) -> str:
    """Sha256 hex of the UNet config plus the hooked block's weights (cast to fp16, cheap)."""
    h = hashlib.sha256()
    h.update(_canonical_config(unet))
    try:
        block = unet.get_submodule(hook_point)
    except AttributeError as e:
        raise ValueError(f"UNet has no submodule {hook_point!r} to fingerprint") from e
    state = block.state_dict()
    for key in sorted(state):
        h.update(key.encode("utf-8"))
        t = state[key].detach().to(device="cpu", dtype=torch.float16).contiguous()
        h.update(t.numpy().tobytes())
    return h.hexdigest()
