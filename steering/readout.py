"""The shape the gate's probe and the open-world detectors share: per concept and table row,
a linear score of an image's mean SAE code over tokens (weights [C, steps, n] in float16,
biases [C, steps] in float32), checked against the bundle it serves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


def mean_codes(values: Tensor, indices: Tensor, num_latents: int) -> Tensor:
    """Each image's mean SAE code over its tokens, [B, n], from top-k codes [B, tokens, k]:
    the evidence the gate reads and the read-outs are fitted on (one function, so both
    agree)."""
    b, tokens, _ = values.shape
    out = torch.zeros(b, num_latents, device=values.device)
    out.scatter_add_(1, indices.reshape(b, -1), values.float().reshape(b, -1))
    return out / tokens


@dataclass
class LinearReadout:
    """Per concept and table row, a linear score of the mean SAE code."""

    concepts: list[str]
    weight: Tensor  # [C, steps, n]
    bias: Tensor  # [C, steps]

    WHAT: ClassVar[str] = "read-out"  # named in errors
    REFIT: ClassVar[str] = ""  # the command that refits it, named in errors

    def __post_init__(self) -> None:
        self.weight = self.weight.detach().to(torch.float16)
        self.bias = self.bias.detach().to(torch.float32)
        if not (self.weight.ndim == 3 and self.bias.shape == self.weight.shape[:2]
                and len(self.concepts) == self.weight.shape[0]):
            raise ValueError(f"{self.WHAT}: weight {list(self.weight.shape)}, bias "
                             f"{list(self.bias.shape)} and {len(self.concepts)} concepts must "
                             "be [C, steps, n], [C, steps] and C names")

    @property
    def num_steps(self) -> int:
        """Table rows it was fitted for."""
        return int(self.weight.shape[1])

    @property
    def n_latents(self) -> int:
        """Width of the SAE code it reads."""
        return int(self.weight.shape[2])

    def validate(self, concepts: list[str] | tuple[str, ...], n_latents: int,
                 num_steps: int) -> None:
        """Raise ValueError unless made for these concepts (in this order) and SAE sizes."""
        if list(concepts) != self.concepts:
            raise ValueError(f"made for concepts {self.concepts}, the bundle has "
                             f"{list(concepts)}: refit with `{self.REFIT}`")
        if (self.n_latents, self.num_steps) != (n_latents, num_steps):
            raise ValueError(f"made for [n_latents, steps] = [{self.n_latents}, "
                             f"{self.num_steps}], the bundle has [{n_latents}, {num_steps}]: "
                             f"refit with `{self.REFIT}`")
