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
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from steering.readout import LinearReadout, mean_codes

__all__ = ["GATE_PROBE_FILE", "GateProbe", "mean_codes"]

GATE_PROBE_FILE = "gate_probe.safetensors"


@dataclass
class GateProbe(LinearReadout):
    """Per concept and table row, a linear score of an image's mean SAE code."""

    WHAT: ClassVar[str] = "gate probe"
    REFIT: ClassVar[str] = "steer bundle fit-gate"

    def scores(self, mean_code: Tensor, members: Sequence[int], row: int) -> Tensor:
        """[B, len(members)] scores of concepts ``members`` (indices into ``concepts``) at
        table row ``row`` from mean codes [B, n]."""
        w = self.weight[list(members), row].to(mean_code.device, mean_code.dtype)
        return mean_code @ w.T + self.bias[list(members), row].to(mean_code)

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
