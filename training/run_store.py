"""Recorded runs on disk, one file per batch, so that a killed recording resumes where it
stopped (`steer bundle fit-detector --work-dir`).

Each batch file holds the batch's mean codes [steps, B, n] and, in its metadata, the
(prompt, seed) of every run and, when a judge labelled them, the labels. A batch is reused
only when its runs are exactly the ones asked for, so editing the runs file or the batch size
re-records what changed and keeps the rest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor


class RunStore:
    """A folder of recorded batches, keyed by the batch's first run and its runs."""

    def __init__(self, folder: str | Path, pipeline: str, steps: int, guidance: float
                 ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # what else makes a recording: the bundle's pipeline, steps and guidance
        self.setting = json.dumps({"pipeline": pipeline, "steps": steps,
                                   "guidance": guidance}, sort_keys=True)

    def _path(self, start: int) -> Path:
        return self.folder / f"batch-{start:07d}.safetensors"

    @staticmethod
    def _key(prompts: Sequence[str], seeds: Sequence[int]) -> str:
        return json.dumps([[p, s] for p, s in zip(prompts, seeds, strict=True)])

    def load(self, start: int, prompts: Sequence[str], seeds: Sequence[int]
             ) -> tuple[Tensor, list[set[str]] | None] | None:
        """The batch's codes and labels (None when not judged), or None when it has not
        been recorded with these runs and settings."""
        path = self._path(start)
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if (meta.get("runs") != self._key(prompts, seeds)
                    or meta.get("setting") != self.setting):
                return None
            labels = json.loads(meta.get("labels", "null"))
            return f.get_tensor("codes"), (None if labels is None
                                           else [set(x) for x in labels])

    def save(self, start: int, prompts: Sequence[str], seeds: Sequence[int], codes: Tensor,
             labels: Sequence[set[str]] | None) -> None:
        """Write one batch (atomically: a file is whole or absent)."""
        path = self._path(start)
        tmp = path.with_suffix(".tmp")
        meta = {"runs": self._key(prompts, seeds), "setting": self.setting,
                "labels": json.dumps(None if labels is None else [sorted(x) for x in labels])}
        save_file({"codes": codes.contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)
