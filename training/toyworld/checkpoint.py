"""Resumable training state for the toy-world stages: atomic save, load if present."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (temp file + rename): a crash never leaves a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict[str, Any] | None:
    """The saved state, or None when the stage has not checkpointed yet."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
