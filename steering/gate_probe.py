"""A learned read-out for the detection gate: which concept of each kind an image carries.

Nearest-centroid over the importance tables' means (steering/gate.py) needs no training but
reads the first denoising steps badly: on the toy world it found the prompted shape in 64–77 %
of images at step 0, and a swap that starts late does not remove the shape. A linear read-out
of the same evidence — the image's mean SAE code over tokens (cond half) — fitted on labelled
runs separates them from step 0 (``training/gate_probe_fit.py``):

    score_{c,t}(image) = z̄ · W_{c,t} + b_{c,t}

per concept c and table row t, fitted within c's kind (ridge on one-hot targets), so the
highest score of a kind names its concept. Stored as ``weight`` [C, steps, n] (float16) and
``bias`` [C, steps] with the concept names (the bundle's, in its order) in the metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

GATE_PROBE_FILE = "gate_probe.safetensors"


def mean_codes(values: Tensor, indices: Tensor, num_latents: int) -> Tensor:
    """Each image's mean SAE code over its tokens, [B, n], from top-k codes [B, tokens, k]:
    the evidence the gate reads and the probe is fitted on (one function, so both agree)."""
    b, tokens, _ = values.shape
    out = torch.zeros(b, num_latents, device=values.device)
    out.scatter_add_(1, indices.reshape(b, -1), values.float().reshape(b, -1))
    return out / tokens


@dataclass
class GateProbe:
    """Per concept and table row, a linear score of an image's mean SAE code."""

    concepts: list[str]
    weight: Tensor  # [C, steps, n]
    bias: Tensor  # [C, steps]

    def __post_init__(self) -> None:
        self.weight = self.weight.detach().to(torch.float16)
        self.bias = self.bias.detach().to(torch.float32)
        if not (self.weight.ndim == 3 and self.bias.shape == self.weight.shape[:2]
                and len(self.concepts) == self.weight.shape[0]):
            raise ValueError(f"gate probe: weight {list(self.weight.shape)}, bias "
                             f"{list(self.bias.shape)} and {len(self.concepts)} concepts must "
                             "be [C, steps, n], [C, steps] and C names")

    @property
    def num_steps(self) -> int:
        """Table rows the probe was fitted for."""
        return int(self.weight.shape[1])

    @property
    def n_latents(self) -> int:
        """Width of the SAE code it reads."""
        return int(self.weight.shape[2])

    def scores(self, mean_code: Tensor, members: Sequence[int], row: int) -> Tensor:
        """[B, len(members)] scores of concepts ``members`` (indices into ``concepts``) at
        table row ``row`` from mean codes [B, n]."""
        w = self.weight[list(members), row].to(mean_code.device, mean_code.dtype)
        return mean_code @ w.T + self.bias[list(members), row].to(mean_code)

    def validate(self, concepts: Sequence[str], n_latents: int, num_steps: int) -> None:
        """Raise ValueError unless made for these concepts (in this order) and SAE sizes."""
        if list(concepts) != self.concepts:
            raise ValueError(f"made for concepts {self.concepts}, the bundle has "
                             f"{list(concepts)}: refit it with `steer bundle fit-gate`")
        if (self.n_latents, self.num_steps) != (n_latents, num_steps):
            raise ValueError(f"made for [n_latents, steps] = [{self.n_latents}, "
                             f"{self.num_steps}], the bundle has [{n_latents}, {num_steps}]")

    def to(self, device: str | torch.device) -> GateProbe:
        """The same probe with its tensors on ``device``."""
        return GateProbe(list(self.concepts), self.weight.to(device), self.bias.to(device))

    def save(self, path: str | Path) -> None:
        """One safetensors file; concept names in its metadata."""
        save_file({"weight": self.weight.contiguous().cpu(),
                   "bias": self.bias.contiguous().cpu()},
                  str(path), metadata={"concepts": json.dumps(self.concepts)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> GateProbe:
        """Read a file written by :meth:`save`."""
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if "concepts" not in meta:
                raise ValueError(f"{path}: no concept names in its metadata; not a gate probe")
            return cls(json.loads(meta["concepts"]), f.get_tensor("weight"),
                       f.get_tensor("bias"))
