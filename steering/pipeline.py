"""SteeredPipeline: a diffusers Stable-Diffusion pipeline plus a steering bundle.

It loads SD-1.x from a local folder (the real layout; the toy pipeline uses it too), forces
DDIM, and generates with concept edits applied by :class:`steering.hooks.SteeringHook`.
Image i of a request uses seed + i with its own generator, so each image is reproducible
alone; with no active edit the images are bit-identical to the plain pipeline's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.hooks import ModelHook
from PIL import Image

from steering.bundle import SteeringBundle
from steering.concepts import ConceptSpec
from steering.detector import DetectorReadout
from steering.edits import (
    ConceptEdit,
    ResolvedEdit,
    check_closed_kinds,
    resolve_edits,
    suppressed_names,
)
from steering.fingerprint import HOOK_POINT, pipeline_fingerprint
from steering.gate import ConceptGate
from steering.hooks import (
    CancelFlag,
    EditStage,
    GenerationCanceled,
    SteeringHook,
    StepTracker,
    attached,
)
from steering.plan import DetectionPlan, RowCache, SteeringPlan
from steering.recipe import SteeringRecipe
from steering.swap_chains import edit_stages

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


@dataclass
class GenerationRequest:
    """Everything that determines a generation (the steering edits included)."""

    prompt: str | list[str]
    negative_prompt: str | None = None
    edits: Sequence[ConceptEdit] = ()
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    n_images: int = 1

    seed_list: Sequence[int] | None = None
    recipe: SteeringRecipe | None = None  # None: the bundle's default recipe
    # Set (e.g. a threading.Event from another thread) to stop within one UNet call: checked
    # in process before every UNet call and in the steering hook, never a network call.
    cancel: CancelFlag | None = field(default=None, compare=False, repr=False)

    @property
    def seeds(self) -> list[int]:
        """Seed of each image: seed + i, or ``seed_list`` when a batch of prompts gives its own."""
        if self.seed_list is not None:
            return list(self.seed_list)
        return [self.seed + i for i in range(self.n_images)]

    @classmethod
    def batch(cls, prompts: Sequence[str], seeds: Sequence[int], **kwargs: Any
              ) -> GenerationRequest:
        """One image per (prompt, seed) pair in one pipeline call (evaluation sweeps): image i
        has the noise a single request for prompts[i] with seed seeds[i] would get, and equals
        its image up to the float rounding of batched kernels."""
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and "
                             f"{len(seeds)} seeds")
        return cls(prompt=list(prompts), seed_list=list(seeds), **kwargs)


@dataclass
class GenerationResult:
    """Images with what produced them: seeds, the edits actually applied, detection, timings."""

    images: list[Image.Image]
    seeds: list[int]
    edits: list[ResolvedEdit]
    # per image, concept -> score read before the edits (with detectors: 0.5 at the
    # calibrated threshold) and, with detectors, read on the edited (final) activations
    detection: list[dict[str, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    detection_after: list[dict[str, float]] = field(default_factory=list)


def ensure_ddim(pipe: StableDiffusionPipeline) -> None:
    """Switch the pipeline to DDIM (the scheduler bundles are made for) unless it uses it."""
    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


def pipeline_default_size(pipe: StableDiffusionPipeline) -> int:
    """Image side the UNet was trained for (512 for SD-1.x, 32 for the toy)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


class SteeredPipeline:
    """Generation with SAE concept steering at the bundle's hook point (SD: up1.1)."""

    def __init__(self, pipe: StableDiffusionPipeline, bundle: SteeringBundle | None = None,
                 row_cache: RowCache | None = None) -> None:
        if not isinstance(pipe, StableDiffusionPipeline):
            raise TypeError(f"only SD-1.x StableDiffusionPipeline is supported, got "
                            f"{type(pipe).__name__}")
        ensure_ddim(pipe)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        hook_point = bundle.manifest.hook_point if bundle is not None else HOOK_POINT
        self.block = pipe.unet.get_submodule(hook_point)
        self.bundle = bundle
        # plan rows built once per process and shared by requests (STEER_PLAN_CACHE_MB)
        self.row_cache = row_cache if row_cache is not None else RowCache.from_env()
        self._rows_of: dict[tuple[int, ...], list[int]] = {}  # schedule -> its table rows
        self.fingerprint = pipeline_fingerprint(pipe.unet, hook_point)
        if bundle is not None:
            bundle.check_fingerprint(self.fingerprint)
            sae = bundle.sae.to(pipe.device)
            self._kinds: dict[str, list[str]] = {}
            for spec in bundle.manifest.concepts:
                self._kinds.setdefault(spec.kind, []).append(spec.name)
            self._detection = DetectionPlan(
                bundle.tables, [c.detection_pct for c in bundle.manifest.concepts],
                pipe.device)
            self.sae = sae.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, pipeline_dir: str | Path, bundle_dir: str | Path | None = None,
                        device: str = "cpu", dtype: torch.dtype = torch.float32
                        ) -> SteeredPipeline:
        """Load a local SD-1.x folder (never the hub) and, optionally, a verified bundle."""
        path = Path(pipeline_dir)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no "
                                    "model_index.json); pass the folder of an SD-1.x pipeline")
        pipe = StableDiffusionPipeline.from_pretrained(
            path, torch_dtype=dtype, local_files_only=True, safety_checker=None,
            requires_safety_checker=False).to(device)
        # The constructor checks the bundle against this pipeline's fingerprint.
        bundle = None if bundle_dir is None else SteeringBundle.load(bundle_dir, device=device)
        return cls(pipe, bundle)

    @property
    def concepts(self) -> dict[str, ConceptSpec]:
        """The bundle's concepts by name (empty without a bundle)."""
        if self.bundle is None:
            return {}
        return {c.name: c for c in self.bundle.manifest.concepts}

    def default_size(self) -> int:
        """Image side the UNet was trained for (512 for SD-1.x, 32 for the toy)."""
        return pipeline_default_size(self.pipe)

    def schedule(self, steps: int) -> tuple[list[int], list[int] | None]:
        """(timestep, table row) of every step of a ``steps``-step request, computed on the
        host before the call (on a copy of the scheduler, as diffusers sets them inside it),
        so no hook reads the timestep tensor; rows are None without a bundle."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        timesteps = [int(t) for t in scheduler.timesteps]
        if self.bundle is None:
            return timesteps, None
        key = tuple(timesteps)
        if key not in self._rows_of:  # the lookup reads the tables (a device sync): once
            self._rows_of[key] = self.bundle.tables.rows_for_timesteps(timesteps)
        return timesteps, self._rows_of[key]

    def swap_anchors(self, recipe: SteeringRecipe) -> dict[str, str]:
        """Concept -> the anchor its learned swap turns it into, under ``recipe`` (none unless
        the recipe uses the bundle's swaps)."""
        swaps = self.bundle.translations if self.bundle is not None else None
        if recipe.name != "translate" or swaps is None:
            return {}
        return {c: t.anchor for c, t in swaps.concepts.items()}

    def _stage(self, edits: list[ResolvedEdit], recipe: SteeringRecipe, rows: Sequence[int]
               ) -> EditStage:
        """One stage of edits: its plan (rows built now, host work outside the hook) and, for
        a gated recipe, a gate of its own reading the stage's input."""
        assert self.bundle is not None
        plan = SteeringPlan(self.bundle.tables, self.sae.W_dec, edits, self._kinds, recipe,
                            self.bundle.translations, cache=self.row_cache,
                            scope=self.bundle.sha256, swap_dtype=self.pipe.unet.dtype)
        plan.prepare(sorted(set(rows)))
        margins = plan.gate_margins
        gate = (ConceptGate(self.bundle.tables, self._kinds, margins, plan.gate_anchors,
                            self.bundle.gate_probe, self.bundle.detectors)
                if margins else None)
        return EditStage(plan, gate)

    def generate(self, request: GenerationRequest, progress: ProgressFn | None = None,
                 should_cancel: CancelFn | None = None) -> GenerationResult:
        """Run one request; ``progress(step, total)`` after each step; stops with
        :class:`GenerationCanceled` within one UNet call of ``request.cancel`` being set, or
        between steps when ``should_cancel()`` says so."""
        started = time.perf_counter()
        edits = resolve_edits(list(request.edits), self.concepts)
        if self.bundle is not None:
            check_closed_kinds(suppressed_names(edits), self.bundle.manifest)
        total = request.steps
        flag = request.cancel

        def on_step_end(pipe, step, timestep, callback_kwargs):
            if flag is not None and flag.is_set():  # set during this step: drop it unreported
                raise GenerationCanceled(step, total)
            if progress is not None:
                progress(step + 1, total)
            if should_cancel is not None and should_cancel():
                raise GenerationCanceled(step + 1, total)
            return callback_kwargs

        cfg = request.guidance > 1.0
        timesteps, rows = self.schedule(total)
        tracker = StepTracker(timesteps, rows, cancel=flag)
        # the tracker counts steps and checks the cancel flag, so it is on even unsteered
        hooks: list[tuple[torch.nn.Module, str, ModelHook]] = [
            (self.pipe.unet, "step_tracker", tracker)]
        steer = None
        if self.bundle is not None:
            assert rows is not None  # a bundle's schedule has its table rows
            recipe = request.recipe or self.bundle.manifest.recipe
            stages = [self._stage(group, recipe, rows)
                      for group in edit_stages(edits, self.swap_anchors(recipe))]
            detectors = self.bundle.detectors
            before = DetectorReadout(detectors) if detectors is not None else None
            after = (DetectorReadout(detectors)
                     if detectors is not None and any(s.plan for s in stages) else None)
            if detectors is None:
                self._detection.prepare(sorted(set(rows)))
            steer = SteeringHook(self.sae, self.bundle.tables, tracker, cfg, stages,
                                 None if detectors is not None else self._detection,
                                 before=before, after=after)
            hooks.append((self.block, "steering", steer))
        size = self.default_size()
        device = self.pipe.device
        generators = [torch.Generator(device).manual_seed(s) for s in request.seeds]
        negative = request.negative_prompt
        if isinstance(request.prompt, list) and negative is not None:
            negative = [negative] * len(request.prompt)  # diffusers wants the prompt's type
        with attached(hooks):
            out = self.pipe(
                prompt=request.prompt,
                negative_prompt=negative,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance,
                height=request.height or size,
                width=request.width or size,
                num_images_per_prompt=1 if isinstance(request.prompt, list) else request.n_images,
                generator=generators,
                callback_on_step_end=on_step_end,
            )
        names = list(self.concepts)

        def rows_of(scores: torch.Tensor | None) -> list[dict[str, float]]:
            if scores is None:
                return []
            return [dict(zip(names, row.tolist(), strict=True)) for row in scores.float().cpu()]

        detection = rows_of(steer.detection_scores() if steer is not None else None)
        detected_after = rows_of(steer.detection_after_scores() if steer is not None else None)
        return GenerationResult(
            images=out.images, seeds=request.seeds, edits=edits, detection=detection,
            detection_after=detected_after,
            timings={"generate_s": time.perf_counter() - started})
