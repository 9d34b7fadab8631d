"""Training metrics to out_dir/metrics.jsonl and TensorBoard (out_dir/tb), from rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class MetricsWriter:
    """Appends one JSON object per log step and mirrors the numbers as TensorBoard scalars.

    On resume, lines past the resumed step (written after the last checkpoint) are dropped
    and TensorBoard purges its events past that step, so the logs match an unbroken run.
    """

    def __init__(self, out_dir: str | Path, start_step: int = 0) -> None:
        """Open (and, on resume, trim) the run's metrics files."""
        from torch.utils.tensorboard import SummaryWriter

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / METRICS_FILE
        kept: list[str] = []
        if start_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line torn by a crash
        self.path.write_text("".join(line + "\n" for line in kept))
        self._tb = SummaryWriter(str(out_dir / TB_DIR),
                                 purge_step=start_step if start_step > 0 else None)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record ``values`` (numbers) at ``step``."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the JSONL file is closed after each line)."""
        self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
