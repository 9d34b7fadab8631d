"""Reading (and rewriting) UNet blocks' outputs during a pipeline run, on diffusers' HookRegistry.

One helper for everything that records the hook block during generation: activation
collection, the learned-swap and detector fits, the gate's probe, evaluation probes. A
:class:`BlockHook` calls ``fn(step, timestep, row, x)`` on its block's output tensor ``x``
([N, C, H, W]; N = 2B under classifier-free guidance, uncond half first) at every UNet call,
and a tensor it returns replaces the output. ``step`` and ``timestep`` come from a
:class:`~steering.hooks.StepTracker` on the UNet; ``row`` is the importance-table row of the
timestep when a bundle's tables are given (None otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook
from torch import Tensor

from steering.hooks import StepTracker, attached, output_tensor, replace_output

if TYPE_CHECKING:
    from PIL import Image

    from steering.pipeline import SteeredPipeline

BlockFn = Callable[[int, int, int | None, Tensor], Tensor | None]
"""``fn(step, timestep, row, x)`` on a block's output; a returned tensor replaces it."""


class BlockHook(ModelHook):
    """Calls ``fn(step, timestep, row, x)`` on the hooked block's output tensor ``x``; a
    returned tensor replaces it. ``row_of`` maps a timestep to its table row (None: row is
    None)."""

    def __init__(self, tracker: StepTracker, fn: BlockFn,
                 row_of: Callable[[int], int] | None = None) -> None:
        super().__init__()
        self.tracker, self.fn, self.row_of = tracker, fn, row_of

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        t = self.tracker.timestep
        assert t is not None  # the tracker's pre_forward ran first (it wraps the UNet call)
        row = None if self.row_of is None else self.row_of(t)
        y = self.fn(self.tracker.step, t, row, output_tensor(output))
        return output if y is None else replace_output(output, y)


@contextmanager
def recording(unet: torch.nn.Module, blocks: Mapping[torch.nn.Module, BlockFn],
              row_of: Callable[[int], int] | None = None) -> Iterator[StepTracker]:
    """While inside: a StepTracker on ``unet`` and a :class:`BlockHook` on each block (a
    submodule of ``unet``) calling its function; all removed on exit, exceptions included."""
    tracker = StepTracker()
    hooks: list[tuple[torch.nn.Module, str, ModelHook]] = [(unet, "record_steps", tracker)]
    hooks += [(block, "record", BlockHook(tracker, fn, row_of)) for block, fn in blocks.items()]
    with attached(hooks):
        yield tracker


def generate_with(steered: SteeredPipeline, prompts: Sequence[str], seeds: Sequence[int],
                  steps: int, guidance: float, fn: BlockFn | Mapping[str, BlockFn]
                  ) -> list[Image.Image]:
    """One batched, unsteered pipeline call (a generator per seed, the pipeline's default
    size) with ``fn`` on the hook block's output at every step — or, given a mapping, each
    named UNet block's function on its output; returns the images. Rows come from the
    loaded bundle's tables (None without a bundle)."""
    pipe = steered.pipe
    if callable(fn):
        blocks = {steered.block: fn}
    else:
        blocks = {pipe.unet.get_submodule(name): f for name, f in fn.items()}
    tables = steered.bundle.tables if steered.bundle is not None else None
    row_of = tables.row_for_timestep if tables is not None else None
    size = steered.default_size()
    generators = [torch.Generator(pipe.device).manual_seed(int(s)) for s in seeds]
    with torch.no_grad(), recording(pipe.unet, blocks, row_of):
        return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance,
                    generator=generators, height=size, width=size).images
