"""Hooks on the UNet (built on diffusers' HookRegistry): step tracking, capture and steering.

The hooked block is ``unet.up_blocks[1].attentions[1]``. Its output is a tuple whose tensor is
[N, C, H, W], N = 2B with classifier-free guidance (``cat([uncond, cond])``).
Hooks live only inside :func:`attached`, which removes them on exit, exceptions included.

In generation the hooks never synchronise with the host: the step's timestep and table row
come from the schedule computed before the call (:class:`StepTracker`), the plan's rows are
built before it, and a cancel is an in-process flag checked at every hooked call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import Tensor

from steering.detector import DetectorReadout
from steering.gate import ConceptGate
from steering.importance_tables import ImportanceTables
from steering.plan import DetectionPlan, RowPlan, SteeringPlan
from steering.readout import mean_codes
from steering.sae import TopKSAE

HOOK_PREFIX = "sae_steering."


def output_tensor(output: Any) -> Tensor:
    """The activation tensor of a Transformer2DModel output (tuple or output object)."""
    return output[0] if isinstance(output, tuple) else output.sample


def replace_output(output: Any, x: Tensor) -> Any:
    """The same output with its activation tensor replaced by ``x``."""
    if isinstance(output, tuple):
        return (x, *output[1:])
    output.sample = x
    return output


def to_tokens(x: Tensor) -> Tensor:
    """[N, C, H, W] -> [N·H·W, C], the SAE's token layout."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def from_tokens(tokens: Tensor, like: Tensor) -> Tensor:
    """Inverse of :func:`to_tokens` for a tensor shaped like ``like``."""
    n, c, h, w = like.shape
    return tokens.reshape(n, h, w, c).permute(0, 3, 1, 2)


def cond_half(x: Tensor, cfg: bool) -> Tensor:
    """The conditional half of the batch (the whole batch without guidance)."""
    return x.chunk(2)[1] if cfg else x


class GenerationCanceled(Exception):
    """Raised out of a generation when its cancel flag (or cancel check) said stop."""

    def __init__(self, step: int, total: int) -> None:
        super().__init__(f"generation canceled after step {step} of {total}")
        self.step, self.total = step, total


class CancelFlag(Protocol):
    """What a generation polls to stop early, e.g. a :class:`threading.Event`."""

    def is_set(self) -> bool:
        """True once the generation should stop."""
        ...


class StepTracker(ModelHook):
    """On the UNet: counts denoising steps in a call and knows the current timestep.

    Given the request's ``timesteps`` (and the table ``rows`` they map to), it reads neither
    from the UNet's arguments, which would be a device sync per step on a GPU; without them
    (activation collection) it reads the timestep argument. With ``cancel`` it raises
    :class:`GenerationCanceled` before a UNet call once the flag is set."""

    def __init__(self, timesteps: Sequence[int] | None = None, rows: Sequence[int] | None = None,
                 cancel: CancelFlag | None = None) -> None:
        super().__init__()
        if rows is not None and (timesteps is None or len(rows) != len(timesteps)):
            raise ValueError("StepTracker needs one table row per timestep of the schedule")
        if cancel is not None and timesteps is None:
            raise ValueError("StepTracker needs the schedule's timesteps to report a cancel")
        self.step = -1
        self.timestep: int | None = None
        self.row: int | None = None
        self.timesteps = None if timesteps is None else [int(t) for t in timesteps]
        self.rows = None if rows is None else [int(r) for r in rows]
        self.cancel = cancel

    def check_cancel(self, done: int) -> None:
        """Raise :class:`GenerationCanceled` (``done`` steps finished) if the flag is set."""
        if self.cancel is not None and self.cancel.is_set():
            assert self.timesteps is not None  # checked in __init__
            raise GenerationCanceled(done, len(self.timesteps))

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        self.check_cancel(self.step + 1)
        self.step += 1
        if self.timesteps is None:
            t = kwargs["timestep"] if "timestep" in kwargs else args[1]
            self.timestep = int(t.flatten()[0]) if isinstance(t, Tensor) else int(t)
            return args, kwargs
        if self.step >= len(self.timesteps):
            raise RuntimeError(f"the UNet was called {self.step + 1} times for a schedule of "
                               f"{len(self.timesteps)} steps: the scheduler calls it more than "
                               "once per step; use DDIM (SteeredPipeline does)")
        self.timestep = self.timesteps[self.step]
        if self.rows is not None:
            self.row = self.rows[self.step]
        return args, kwargs


class CaptureHook(ModelHook):
    """Hands the cond half of every hooked call, [B, H·W, C], to ``sink(step, timestep, x)``."""

    def __init__(self, tracker: StepTracker, sink: Callable[[int, int, Tensor], None],
                 cfg: bool) -> None:
        super().__init__()
        self.tracker, self.sink, self.cfg = tracker, sink, cfg

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        x = cond_half(output_tensor(output), self.cfg)
        self.sink(self.tracker.step, self.tracker.timestep, x.flatten(2).transpose(1, 2))
        return output


@dataclass
class EditStage:
    """One stage of a step's edits: a plan and the gate that reads its input's codes."""

    plan: SteeringPlan
    gate: ConceptGate | None = None


class SteeringHook(ModelHook):
    """Encodes the block's tokens with the SAE; detects on the cond half, then edits.

    Edits come in up to two stages: the request's (``stages[0]``), then the ``final`` ones (a
    content policy's always-on suppressions), which read the codes of what the first stage
    produced — their gate sees the concept however the other edits brought it about. Each edit
    is error-preserving and applied to both CFG halves (SAeUron) unless ``cond_only``. With no
    active edit the output is returned untouched, so results stay bit-identical to the plain
    pipeline, and only the cond half is encoded (detection reads nothing else).

    Detection: with the bundle's detectors, ``before`` reads the codes each step starts from
    (before any edit) and ``after`` the codes of the edited output (the final activations);
    bundles without detectors report the sparse importance score (``detection``) instead.
    """

    def __init__(self, sae: TopKSAE, tables: ImportanceTables, tracker: StepTracker, cfg: bool,
                 stages: Sequence[EditStage] = (), detection: DetectionPlan | None = None,
                 cond_only: bool = False, before: DetectorReadout | None = None,
                 after: DetectorReadout | None = None) -> None:
        super().__init__()
        self.sae, self.tables, self.tracker, self.cfg = sae, tables, tracker, cfg
        self.stages = [s for s in stages if s.plan]
        self.detection, self.cond_only = detection, cond_only
        self.before, self.after = before, after
        self.detection_sum: Tensor | None = None
        self.detection_steps = 0

    def _encode_cond(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Codes [B, tokens, k] of the cond half of block output x."""
        xc = cond_half(x, self.cfg)
        b, _, h, w = xc.shape
        values, indices = self.sae.encode(to_tokens(xc))
        return values.view(b, h * w, -1), indices.view(b, h * w, -1)

    def _read(self, cv: Tensor, ci: Tensor, row: int, readout: DetectorReadout | None,
              sparse: bool) -> None:
        """Feed one step's cond-half codes to a detector readout (and, for the codes before
        any edit, to the sparse detection score)."""
        if readout is not None:
            readout.update(mean_codes(cv, ci, self.tables.num_latents), row)
        if sparse and self.detection is not None:
            score = self.detection.score(cv, ci, row)
            self.detection_sum = score if self.detection_sum is None else self.detection_sum + score
            self.detection_steps += 1

    @torch.no_grad()
    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.tracker.check_cancel(self.tracker.step)  # mid-call: this step is not done
        x = output_tensor(output)
        row = self.tracker.row
        if row is None:  # no precomputed schedule (tests, tools): look it up, a host sync
            row = self.tables.row_for_timestep(self.tracker.timestep)
        if not self.stages:
            cv, ci = self._encode_cond(x)
            self._read(cv, ci, row, self.before, sparse=True)
            return output
        n, _, h, w = x.shape
        edited = x
        for i, stage in enumerate(self.stages):
            values, indices = self.sae.encode(to_tokens(edited))
            # the cond half's codes, [B, tokens, k] views: what detection and the gate read
            cv = cond_half(values.view(n, h * w, -1), self.cfg)
            ci = cond_half(indices.view(n, h * w, -1), self.cfg)
            if i == 0:
                self._read(cv, ci, row, self.before, sparse=True)
            if stage.gate is not None:
                stage.gate.update(cv, ci, row)
            delta = self._delta(stage, stage.plan.row(row), values, indices, n)
            if self.cond_only and self.cfg:
                delta = delta.view(n, h * w, -1)
                delta[: n // 2] = 0
            edited = edited + from_tokens(delta, x).to(x.dtype)
        if self.after is not None:
            cv, ci = self._encode_cond(edited)
            self._read(cv, ci, row, self.after, sparse=False)
        return replace_output(output, edited)

    def _delta(self, stage: EditStage, row: RowPlan, values: Tensor, indices: Tensor, n: int
               ) -> Tensor:
        """Sum of the row's edits [T, d_in]; a gated edit only on images where its concept is."""
        delta: Tensor | None = None
        for gate_concept, part in row.parts:
            d = part.delta(values, indices)
            if gate_concept is not None and stage.gate is not None:
                keep = stage.gate.present(gate_concept).to(d.dtype)
                if self.cfg:
                    keep = torch.cat([keep, keep])  # both halves of a gated image
                d = (d.view(n, -1, d.shape[-1]) * keep.view(n, 1, 1)).view(-1, d.shape[-1])
            delta = d if delta is None else delta + d
        assert delta is not None  # a truthy plan has at least one part
        return delta

    def detection_scores(self) -> Tensor | None:
        """Per-image detection scores [B, C] read before the edits: the detectors' (0.5 at
        the calibrated threshold) or, without detectors, the sparse score's mean over steps
        (None before any step)."""
        if self.before is not None:
            return self.before.probability()
        if self.detection_sum is None:
            return None
        return self.detection_sum / self.detection_steps

    def detection_after_scores(self) -> Tensor | None:
        """[B, C] the detectors read on the edited output; the scores before when nothing
        was edited (None without detectors or before any step)."""
        if self.after is not None and self.stages:
            return self.after.probability()
        return self.before.probability() if self.before is not None else None


@contextmanager
def attached(hooks: Sequence[tuple[torch.nn.Module, str, ModelHook]]) -> Iterator[None]:
    """Register (module, name, hook) triples for the duration of the block; always removed."""
    done: list[tuple[torch.nn.Module, str]] = []
    try:
        for module, name, hook in hooks:
            HookRegistry.check_if_exists_or_initialize(module).register_hook(
                hook, HOOK_PREFIX + name)
            done.append((module, name))
        yield
    finally:
        for module, name in reversed(done):
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(
                HOOK_PREFIX + name, recurse=False)


def active_hook_names(module: torch.nn.Module) -> list[str]:
    """Names of this project's hooks currently registered on ``module`` (for tests, checks)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return []
    return [n for n in registry.hooks if n.startswith(HOOK_PREFIX)]
