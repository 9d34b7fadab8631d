"""How much work one job may ask for, derived from the pipeline the workers load.

Fixed limits (1024², 8 images, 150 steps) let a request on a 32-pixel model ask for a job
that runs for hours on a CPU worker. The gateway reads the pipeline folder's configs (JSON
only: it loads no weights and imports no torch) for the model's native image side
(``unet.sample_size`` × the VAE's downsampling) and derives:

- the largest side: twice the native one (SD-1.x: 1024; the toy: 64), unless
  ``STEER_MAX_SIZE`` is set;
- a cost budget per job in pixel-steps, width × height × steps × n_images: the native side²
  × 50 steps × 8 images (SD-1.x: 8 native images at 50 steps, or 2 at 1024² — 105 M), unless
  ``STEER_MAX_JOB_COST`` is set. A request over it is a 422 naming the budget.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings

BUDGET_STEPS, BUDGET_IMAGES = 50, 8
FALLBACK_SIZE = 512  # when the pipeline folder cannot be read (SD-1.x's native side)


def native_size(pipeline_dir: Path | None) -> int | None:
    """The pipeline's native image side from its unet and vae configs (None if unreadable)."""
    if pipeline_dir is None:
        return None
    try:
        unet = json.loads((Path(pipeline_dir) / "unet" / "config.json").read_text())
        vae = json.loads((Path(pipeline_dir) / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class JobLimits:
    """The bounds a job is checked against (besides steps and n_images from Settings)."""

    native: int     # the model's native side (the default width and height)
    max_size: int   # largest width or height
    max_cost: int   # width × height × steps × n_images

    @classmethod
    def from_settings(cls, settings: Settings) -> JobLimits:
        """Settings' explicit limits, else the ones derived from the pipeline folder (read
        once per folder and settings)."""
        return _limits(settings.pipeline_dir, settings.max_size, settings.max_job_cost)

    def cost(self, width: int | None, height: int | None, steps: int, n_images: int) -> int:
        """Pixel-steps of a job (an unset side is the native one)."""
        return (width or self.native) * (height or self.native) * steps * n_images


@functools.cache
def _limits(pipeline_dir: Path | None, max_size: int | None, max_cost: int | None) -> JobLimits:
    native = native_size(pipeline_dir) or FALLBACK_SIZE
    return JobLimits(native=native, max_size=max_size or 2 * native,
                     max_cost=max_cost or native * native * BUDGET_STEPS * BUDGET_IMAGES)
