"""Atomic training checkpoints: everything needed to continue bit-exactly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from training.trainer.config import TrainConfig
from training.trainer.step import TrainStep

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.pt"


def checkpoint_path(out_dir: str | Path) -> Path:
    """Where the latest checkpoint of a run lives."""
    return Path(out_dir) / CHECKPOINT_DIR / LATEST


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | Path, trainer: TrainStep, step: int) -> Path:
    """Write model, Adam, scheduler, step, dead counters, RNG and loader position atomically.

    The file is written beside its final name, fsynced, then renamed over it: a crash leaves
    the previous checkpoint intact.
    """
    path = checkpoint_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "config": trainer.cfg.to_dict(),
        "world_size": trainer.env.world_size,
        "model": trainer.sae.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "tokens_since_fired": trainer.tokens_since_fired,
        "rng": _rng_state(),
        # The loader is seekable: batch b of every rank is ActivationLoader(start_batch=b).
        "loader": {"start_batch": step},
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(out_dir: str | Path, trainer: TrainStep) -> int:
    """Restore ``trainer`` from the run's latest checkpoint; returns the step to continue at."""
    path = checkpoint_path(out_dir)
    try:
        # On CPU: the RNG states must stay CPU tensors; load_state_dict/copy_ move the rest.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn or foreign file: say which and what to do
        raise RuntimeError(f"cannot read checkpoint {path} ({exc}); delete it to start over "
                           "or point --out at another run") from exc
    saved = TrainConfig.from_dict(state["config"])
    diff = trainer.cfg.trajectory_mismatch(saved)
    if diff:
        pairs = ", ".join(f"{f}: {getattr(saved, f)} -> {getattr(trainer.cfg, f)}" for f in diff)
        raise ValueError(f"cannot resume {path}: settings differ from the checkpoint's ({pairs});"
                         " use the same settings, or a new --out")
    if state["world_size"] != trainer.env.world_size:
        raise ValueError(f"cannot resume {path}: it was written by {state['world_size']} "
                         f"processes, this run has {trainer.env.world_size} (each rank's data "
                         "stream depends on the world size); relaunch with the same count")
    trainer.sae.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.tokens_since_fired.copy_(state["tokens_since_fired"])
    _set_rng_state(state["rng"])
    return int(state["step"])
