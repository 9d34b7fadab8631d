"""TrainConfig: every setting of one SAE training run, validated up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# Fields that shape the optimisation trajectory: a resumed run must match them exactly.
TRAJECTORY_FIELDS = (
    "d_in", "num_latents", "k", "batch_size", "total_steps", "lr", "warmup_steps", "aux_k",
    "aux_coef", "dead_tokens", "grad_clip", "seed", "bf16", "buffer_blocks", "chunk_rows",
    "geometric_median_rows",
)


@dataclass
class TrainConfig:
    """TopK SAE training settings; batch_size is the global number of tokens per step."""

    d_in: int
    num_latents: int
    k: int
    total_steps: int
    batch_size: int = 4096
    lr: float = 4e-4
    warmup_steps: int = 1000
    aux_k: int | None = None
    aux_coef: float = 1 / 32
    dead_tokens: int = 10_000_000
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 50
    bf16: bool = False
    buffer_blocks: int = 64
    chunk_rows: int = 4096
    geometric_median_rows: int = 16384

    def __post_init__(self) -> None:
        """Reject settings that cannot train, naming the field."""
        positive = ("d_in", "num_latents", "k", "total_steps", "batch_size", "checkpoint_every",
                    "log_every", "buffer_blocks", "chunk_rows", "geometric_median_rows")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.k > self.num_latents:
            raise ValueError(f"TrainConfig.k={self.k} exceeds num_latents={self.num_latents}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.total_steps:
            raise ValueError(f"TrainConfig.warmup_steps={self.warmup_steps} must be in "
                             f"[0, total_steps={self.total_steps})")
        if self.lr <= 0 or self.grad_clip <= 0 or self.aux_coef < 0 or self.dead_tokens < 0:
            raise ValueError("TrainConfig: lr and grad_clip must be > 0, aux_coef and "
                             "dead_tokens >= 0")
        if self.aux_k is not None and self.aux_k <= 0:
            raise ValueError(f"TrainConfig.aux_k must be positive or None, got {self.aux_k}")

    @property
    def effective_aux_k(self) -> int:
        """k_aux for the AuxK loss: aux_k, or d_in // 2 (the paper's heuristic)."""
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)

    def local_batch(self, world_size: int) -> int:
        """Rows per rank per step; the global batch must split evenly over the ranks."""
        if self.batch_size % world_size:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by the "
                             f"world size {world_size}; pick a multiple of it")
        return self.batch_size // world_size

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-safe) of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of to_dict; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"unknown TrainConfig fields {extra}")
        return cls(**data)

    def trajectory_mismatch(self, other: TrainConfig) -> list[str]:
        """Names of trajectory fields that differ (a resume needs none)."""
        return [f for f in TRAJECTORY_FIELDS if getattr(self, f) != getattr(other, f)]
