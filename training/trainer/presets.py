"""Named scales for `steer train --preset` with their expected memory and time.

CPU presets time a couple of real steps at their shape; GPU presets give an estimate from the
per-step FLOPs and bytes under a stated sustained-throughput assumption (labelled as such).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from training.trainer.config import TrainConfig


@dataclass(frozen=True)
class Hardware:
    """Throughput assumed for a GPU estimate (sustained, not peak)."""

    name: str
    gemm_flops: float      # bf16 dense GEMM FLOP/s sustained
    mem_bytes: float       # HBM bytes/s sustained
    disk_bytes: float      # activation store read bytes/s (local NVMe)


A100 = Hardware("A100 80GB", gemm_flops=180e12, mem_bytes=1.5e12, disk_bytes=2e9)
H100 = Hardware("H100 SXM", gemm_flops=550e12, mem_bytes=2.5e12, disk_bytes=2e9)


@dataclass(frozen=True)
class Preset:
    """A full training setting sized for one machine class; num_latents = expansion · d_in."""

    name: str
    description: str
    d_in: int                      # the activation width it is sized for
    expansion: int
    k: int
    batch_size: int
    total_steps: int
    warmup_steps: int
    lr: float
    dead_tokens: int
    checkpoint_every: int
    log_every: int
    buffer_blocks: int
    chunk_rows: int
    geometric_median_rows: int
    device: str = "cpu"
    bf16: bool = False
    hardware: Hardware | None = None   # None: time is measured on this machine
    reference: str = ""                # a measurement at the preset's shape, printed beside it

    def config(self, d_in: int | None = None, **overrides: Any) -> TrainConfig:
        """TrainConfig for activations of width ``d_in`` (default the preset's); explicit
        overrides (None values ignored) win over the preset's values."""
        d = d_in or self.d_in
        values: dict[str, Any] = dict(
            d_in=d, num_latents=self.expansion * d, k=self.k, batch_size=self.batch_size,
            total_steps=self.total_steps, warmup_steps=self.warmup_steps, lr=self.lr,
            dead_tokens=self.dead_tokens, checkpoint_every=self.checkpoint_every,
            log_every=self.log_every, buffer_blocks=self.buffer_blocks,
            chunk_rows=self.chunk_rows, geometric_median_rows=self.geometric_median_rows,
            bf16=self.bf16)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["warmup_steps"] >= values["total_steps"]:
            values["warmup_steps"] = values["total_steps"] // 10
        return TrainConfig(**values)


_SD14_A100 = Preset(
    "sd14-a100", "SD-1.4 up1.1 on one A100: one pass over an 80k-prompt × 50-step store "
    "(≈ 1.0 B tokens)",
    d_in=1280, expansion=16, k=32, batch_size=4096, total_steps=250_000, warmup_steps=1000,
    lr=4e-4, dead_tokens=10_000_000, checkpoint_every=5000, log_every=100, buffer_blocks=64,
    chunk_rows=4096, geometric_median_rows=16384, device="cuda", bf16=True, hardware=A100,
    reference="measured on one NVIDIA H200 at this shape (bench/gpu_training.py, torch 2.11, "
    "2026-11-26): 5.3 ms/step (776k tokens/s), peak GPU memory 1.15 GiB; fed from a store "
    "by the loader's 8 read threads, 742k tokens/s")

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("smoke", "seconds on a laptop: checks the plumbing, not the SAE",
           d_in=64, expansion=4, k=4, batch_size=256, total_steps=20, warmup_steps=2, lr=1e-3,
           dead_tokens=100_000, checkpoint_every=10, log_every=5, buffer_blocks=4,
           chunk_rows=512, geometric_median_rows=512),
    # Measured on the toy bundle's stores (held-out FVU): n 1024 at lr 4e-4 → 0.112, at lr
    # 1e-3 → 0.100; n 2048 at lr 1e-3 → 0.097 on 1 M tokens (then data-limited, see BUILD.md).
    Preset("toy", "the toy world on 2 CPU cores (n = 32·d_in, ≈ 10 min for 6000 steps)",
           d_in=64, expansion=32, k=8, batch_size=4096, total_steps=6000, warmup_steps=100,
           lr=1e-3, dead_tokens=2_000_000, checkpoint_every=500, log_every=50,
           buffer_blocks=32, chunk_rows=4096, geometric_median_rows=16384),
    _SD14_A100,
    replace(_SD14_A100, name="sd14-h100",
            description=_SD14_A100.description.replace("A100", "H100"), hardware=H100),
)}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; the error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def num_params(cfg: TrainConfig) -> int:
    """Parameters of the SAE: E, b_enc, D, b_dec."""
    return 2 * cfg.num_latents * cfg.d_in + cfg.num_latents + cfg.d_in


def memory_estimate(cfg: TrainConfig, world_size: int = 1,
                    source_itemsize: int = 2) -> dict[str, int]:
    """Bytes per rank: params, grads, Adam, step activations at the batch, loader buffers."""
    p, n, d = num_params(cfg), cfg.num_latents, cfg.d_in
    b = cfg.local_batch(world_size)
    gemm = 2 if cfg.bf16 else 4
    k_all = cfg.k + cfg.effective_aux_k
    activations = (
        b * n * gemm                       # pre-activation scratch buffer (reused)
        + b * n * gemm                     # AuxK: pre over dead latents (at most all of them)
        + 12 * b * d * 4                   # x, x - b_dec, x_hat, residual, their grads
        + b * k_all * (8 + 8 + 4 + 4) * 2  # indices, CSR order/rows, values, grads
        + 2 * n * (d + 1) * 4              # sparse weight-gradient product and its copy
        + (n * d * 2 if cfg.bf16 else 0)   # bf16 copy of the encoder for the GEMM
    )
    loader = 4 * cfg.buffer_blocks * cfg.chunk_rows * d * source_itemsize
    return {"params": 4 * p, "grads": 4 * p, "adam": 8 * p, "activations": activations,
            "loader_buffers": loader}


def step_flops(cfg: TrainConfig) -> float:
    """FLOPs of one step: the dense encoder GEMM plus the sparse decode/backward terms."""
    b, n, d = cfg.batch_size, cfg.num_latents, cfg.d_in
    sparse = 2 * b * d * (cfg.k * 3 + (cfg.k + cfg.effective_aux_k) * 2 + cfg.effective_aux_k)
    return 2.0 * b * n * d + sparse


def step_bytes(cfg: TrainConfig) -> float:
    """Device bytes moved per step: pre buffer write + top-k reads, Adam/clip/renorm passes."""
    gemm = 2 if cfg.bf16 else 4
    return 4.0 * cfg.batch_size * cfg.num_latents * gemm + 4.0 * num_params(cfg) * 14


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds per step and in total, and how the figure was obtained."""

    per_step: float
    total: float
    how: str


def measure_step_seconds(cfg: TrainConfig, device: torch.device | str = "cpu",
                         steps: int = 3) -> float:
    """Median wall time of a real training step at cfg's shape on random data.

    One warm-up step; when it alone takes over a second, it is the figure (no more waiting).
    """
    from training.trainer.distributed import DistEnv
    from training.trainer.loop import new_sae
    from training.trainer.step import TrainStep

    dev = torch.device(device)
    env = DistEnv(rank=0, world_size=1, device=dev)
    trainer = TrainStep(replace(cfg, bf16=cfg.bf16 and dev.type == "cuda"), new_sae(cfg, dev),
                        env)
    x = torch.randn(cfg.batch_size, cfg.d_in, generator=torch.Generator().manual_seed(0)).to(dev)

    def timed() -> float:
        t0 = time.perf_counter()
        trainer(x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    first = timed()
    if first > 1.0:
        return first
    times = sorted(timed() for _ in range(steps))
    return times[len(times) // 2]


def time_estimate(preset: Preset, cfg: TrainConfig,
                  device: torch.device | str = "cpu") -> TimeEstimate:
    """Measured (CPU presets, on ``device``) or FLOP/byte-based (GPU presets: an estimate)."""
    hw = preset.hardware
    if hw is None:
        per = measure_step_seconds(cfg, device)
        return TimeEstimate(per, per * cfg.total_steps,
                            f"measured: {per * 1e3:.0f} ms/step on this machine's "
                            f"{torch.device(device).type}")
    compute = step_flops(cfg) / hw.gemm_flops + step_bytes(cfg) / hw.mem_bytes
    io = cfg.batch_size * cfg.d_in * 2 / hw.disk_bytes
    per = max(compute, io)
    bound = "reading activations" if io > compute else "compute"
    return TimeEstimate(per, per * cfg.total_steps,
                        f"estimate, not measured: {step_flops(cfg) / 1e9:.0f} GFLOP/step at an "
                        f"assumed {hw.gemm_flops / 1e12:.0f} TFLOP/s bf16 + "
                        f"{step_bytes(cfg) / 1e9:.2f} GB/step at {hw.mem_bytes / 1e12:.1f} TB/s on "
                        f"{hw.name} = {compute * 1e3:.1f} ms; fp16 rows at an assumed "
                        f"{hw.disk_bytes / 1e9:.0f} GB/s disk = {io * 1e3:.1f} ms; "
                        f"bound by {bound}")


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**27 else f"{x / 2**20:.1f} MiB"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def describe(preset: Preset, cfg: TrainConfig, world_size: int = 1,
             device: torch.device | str = "cpu") -> str:
    """Multi-line summary: settings, expected memory per rank and expected time."""
    mem = memory_estimate(cfg, world_size)
    total = sum(mem.values())
    est = time_estimate(preset, cfg, device)
    parts = ", ".join(f"{k.replace('_', ' ')} {_gib(v)}" for k, v in mem.items())
    tokens = cfg.total_steps * cfg.batch_size
    return (f"preset {preset.name}: {preset.description}\n"
            f"  d_in {cfg.d_in}, n {cfg.num_latents}, k {cfg.k}, batch {cfg.batch_size}, "
            f"{cfg.total_steps} steps ({tokens / 1e6:.1f} M tokens), lr {cfg.lr:g}"
            f"{', bf16' if cfg.bf16 else ''}\n"
            f"  expected memory per rank: {_gib(total)} ({parts})\n"
            f"  expected time: {_duration(est.total)} ({est.how})"
            + (f"\n  {preset.reference}" if preset.reference else ""))
