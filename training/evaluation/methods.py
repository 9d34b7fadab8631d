"""The compared methods, each generating one batch for (prompts, seeds, suppressed concepts).

1. ``none``: no intervention;
2. ``negative_prompt``: the suppressed words joined with ", " as the negative prompt;
3. ``sld``: Safe Latent Diffusion (diffusers' ``StableDiffusionPipelineSafe``, strong setting)
   built from the same components, its safety concept = the suppressed words;
4. ``saeuron``: the plain SAeUron recipe (``steering.recipe.PLAIN``) at a given
   (γ, percentile), per kind;
5. ``ours``: this project's steering (the bundle's default recipe) at the bundle's defaults,
   or at an explicit (γ, percentile) in the sweep.

All use the same pipeline, DDIM steps, guidance and per-image seeds, so image i of every method
starts from the same noise. ``settings`` is what the results record and what the cache keys on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from steering.detector import DETECTORS_FILE
from steering.edits import ConceptEdit
from steering.pipeline import GenerationRequest, SteeredPipeline
from steering.recipe import PLAIN
from training.toyworld.world import kind_of

METHOD_NAMES = ("none", "negative_prompt", "sld", "saeuron", "ours")


class Method(Protocol):
    """A way to generate while keeping ``suppressed`` concepts out of the images."""

    name: str
    settings: dict[str, Any]

    def generate(self, prompts: Sequence[str], seeds: Sequence[int],
                 suppressed: Sequence[str]) -> list[Image.Image]:
        """One image per (prompt, seed), generated in one batch."""
        ...


def settings_key(settings: Mapping[str, Any]) -> str:
    """Short stable hash of a settings dict (the cache's folder name for it)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def bundle_identity(steered: SteeredPipeline) -> str:
    """Hash of the bundle's manifest without the concepts' default γ / percentile, so writing
    new defaults does not invalidate sweep results, while any other change (recipe, SAE) does."""
    if steered.bundle is None:
        return "no-bundle"
    manifest = steered.bundle.manifest.to_dict()
    manifest["concepts"] = [{k: v for k, v in c.items()
                             if k not in ("default_gamma", "default_percentile",
                                          "default_gate_margin")}
                            for c in manifest["concepts"]]
    manifest.pop("created", None)
    return settings_key(manifest)


@dataclass
class PipelineMethod:
    """``none`` and ``negative_prompt``: the steered pipeline with no edit."""

    name: str
    steered: SteeredPipeline
    steps: int
    guidance: float
    settings: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        if self.name not in ("none", "negative_prompt"):
            raise ValueError(f"PipelineMethod is none or negative_prompt, not {self.name!r}")
        self.settings = {"steps": self.steps, "guidance": self.guidance}
        self.uses_suppressed = self.name != "none"
        bundle = self.steered.bundle
        if bundle is not None and bundle.detectors is not None:
            # the detections recorded with each image come from these detectors
            self.settings["detectors"] = bundle.manifest.files.get(DETECTORS_FILE)
        if self.name == "negative_prompt":
            self.settings["negative_prompt"] = "the suppressed words joined with ', '"

    def generate(self, prompts: Sequence[str], seeds: Sequence[int],
                 suppressed: Sequence[str]) -> list[Image.Image]:
        """Generate without steering (with the suppressed words as negative prompt)."""
        return self.generate_detected(prompts, seeds, suppressed)[0]

    def generate_detected(self, prompts: Sequence[str], seeds: Sequence[int],
                          suppressed: Sequence[str]
                          ) -> tuple[list[Image.Image], list[frozenset[str]] | None]:
        """The images and, when the bundle has detectors, the concepts they found in each
        run (its detection score at or above the calibrated threshold, 0.5)."""
        negative = ", ".join(suppressed) if self.name == "negative_prompt" else None
        request = GenerationRequest.batch(prompts, seeds, steps=self.steps,
                                          guidance=self.guidance, negative_prompt=negative)
        result = self.steered.generate(request)
        found = ([frozenset(c for c, p in row.items() if p >= 0.5) for row in result.detection]
                 if "detectors" in self.settings else None)
        return list(result.images), found


@dataclass
class SldMethod:
    """Safe Latent Diffusion with diffusers' strong setting on the same components."""

    steered: SteeredPipeline
    steps: int
    guidance: float
    config: str = "STRONG"
    name: str = "sld"
    settings: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        from diffusers import DDIMScheduler
        from diffusers.pipelines.deprecated.stable_diffusion_safe import (
            SafetyConfig,
            StableDiffusionPipelineSafe,
        )

        self.sld_kwargs: dict[str, Any] = dict(getattr(SafetyConfig, self.config))
        pipe = self.steered.pipe
        self.pipe = StableDiffusionPipelineSafe(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
            unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.settings = {"steps": self.steps, "guidance": self.guidance,
                         "config": self.config, **self.sld_kwargs,
                         "safety_concept": "the suppressed words joined with ', '"}

    def generate(self, prompts: Sequence[str], seeds: Sequence[int],
                 suppressed: Sequence[str]) -> list[Image.Image]:
        """Generate with SLD guidance away from the suppressed words."""
        self.pipe.safety_concept = ", ".join(suppressed)
        device = self.steered.pipe.device
        generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        size = self.steered.default_size()
        out = self.pipe(prompt=list(prompts), height=size, width=size,
                        num_inference_steps=self.steps, guidance_scale=self.guidance,
                        generator=generators, **self.sld_kwargs)
        return list(out.images)


@dataclass
class SteeringMethod:
    """SAE steering: ``saeuron`` (plain recipe) or ``ours`` (the bundle's default recipe).

    ``per_kind`` maps a kind to its (γ, percentile); a kind not in it (or ``per_kind`` None)
    uses the bundle's defaults for the concept (ConceptEdit(c) with None fields).
    """

    name: str
    steered: SteeredPipeline
    steps: int
    guidance: float
    # kind -> (γ, percentile) or (γ, percentile, gate margin); margins only for gated recipes
    per_kind: dict[str, tuple[float, ...]] | None = None
    settings: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        if self.name not in ("saeuron", "ours"):
            raise ValueError(f"SteeringMethod is saeuron or ours, not {self.name!r}")
        self.recipe = PLAIN if self.name == "saeuron" else None
        per_kind = {k: [float(v) for v in setting]
                    for k, setting in sorted((self.per_kind or {}).items())}
        defaults = {c.name: [c.default_gamma, c.default_percentile]
                    + ([c.default_gate_margin] if c.default_gate_margin else [])
                    for c in self.steered.concepts.values()
                    if c.kind not in per_kind}
        self.settings = {
            "steps": self.steps, "guidance": self.guidance,
            "recipe": "plain" if self.name == "saeuron" else "bundle default",
            "per_kind": per_kind, "bundle_defaults": defaults,
            "bundle": bundle_identity(self.steered),
        }

    def edits(self, suppressed: Sequence[str]) -> tuple[ConceptEdit, ...]:
        """One suppression edit per concept, at its kind's (γ, percentile) or the defaults."""
        out = []
        for concept in suppressed:
            setting = (self.per_kind or {}).get(kind_of(concept))
            gamma, pct, *margin = setting if setting is not None else (None, None)
            out.append(ConceptEdit(concept, gamma=gamma, percentile=pct,
                                   gate_margin=margin[0] if margin else None))
        return tuple(out)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int],
                 suppressed: Sequence[str]) -> list[Image.Image]:
        """Generate with the suppression edits applied at the hook point."""
        request = GenerationRequest.batch(prompts, seeds, steps=self.steps,
                                          guidance=self.guidance, edits=self.edits(suppressed),
                                          recipe=self.recipe)
        return self.steered.generate(request).images


def build_method(name: str, steered: SteeredPipeline, steps: int, guidance: float,
                 per_kind: dict[str, tuple[float, ...]] | None = None,
                 sld_config: str = "STRONG") -> Method:
    """The method called ``name`` (one of :data:`METHOD_NAMES`)."""
    if name in ("none", "negative_prompt"):
        return PipelineMethod(name, steered, steps, guidance)
    if name == "sld":
        return SldMethod(steered, steps, guidance, config=sld_config)
    if name in ("saeuron", "ours"):
        return SteeringMethod(name, steered, steps, guidance, per_kind)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")
