"""The steering bundle's manifest.json: what a bundle is for and the checksum of every file.

Kept apart from :mod:`steering.bundle` and free of torch, so a process that only needs a
bundle's concepts (the API gateway, ``steer policy check``) reads them without loading torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from steering.concepts import ConceptSpec
from steering.recipe import PLAIN, SteeringRecipe

# 2 adds ``recipe`` (steering/recipe.py); a version-1 bundle loads with the plain recipe.
# 3 adds the optional learned swaps, translation.safetensors (steering/translation.py).
# 4 adds the optional detection probe, gate_probe.safetensors (steering/gate_probe.py).
# 5 adds the optional open-world concept detectors, detectors.safetensors
#   (steering/detector.py).
BUNDLE_FORMAT_VERSION = 5
MANIFEST_FILE = "manifest.json"


class BundleError(ValueError):
    """A steering bundle that cannot be used; the message names the file and what differs."""


def scheduler_description(scheduler: Any) -> dict[str, Any]:
    """Return {"class_name", "config"} for a diffusers scheduler, or a dict unchanged."""
    if isinstance(scheduler, dict):
        desc = dict(scheduler)
    else:
        config = getattr(scheduler, "config", {}) or {}
        desc = {
            "class_name": type(scheduler).__name__,
            "config": {k: v for k, v in dict(config).items() if not str(k).startswith("_")},
        }
    # Round-trip through JSON so the manifest holds only JSON-native values.
    return json.loads(json.dumps(desc, sort_keys=True, default=str))


@dataclass
class BundleManifest:
    """Contents of manifest.json: what the bundle is for and the checksum of every file."""

    format_version: int
    pipeline_fingerprint: str
    hook_point: str
    d_in: int
    n_latents: int
    k: int
    scheduler: dict[str, Any]
    steps: int
    concepts: list[ConceptSpec]
    files: dict[str, str]
    command: str
    created: str
    recipe: SteeringRecipe = PLAIN

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in a fixed key order."""
        return {
            "format_version": self.format_version,
            "pipeline_fingerprint": self.pipeline_fingerprint,
            "hook_point": self.hook_point,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "k": self.k,
            "scheduler": self.scheduler,
            "steps": self.steps,
            "concepts": [c.to_dict() for c in self.concepts],
            "files": dict(sorted(self.files.items())),
            "command": self.command,
            "created": self.created,
            "recipe": self.recipe.to_dict(),
        }

    def to_json(self) -> str:
        """Serialise as indented JSON (the exact bytes written to manifest.json)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BundleManifest:
        """Parse a manifest dict, raising BundleError for a missing field or bad concept."""
        if not isinstance(d, dict):
            raise BundleError(f"{MANIFEST_FILE}: expected a JSON object")
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BundleError(f"{MANIFEST_FILE}: format_version must be a positive integer")
        if version > BUNDLE_FORMAT_VERSION:
            raise BundleError(
                f"{MANIFEST_FILE}: bundle format_version {version} is newer than this "
                f"sae-steering supports ({BUNDLE_FORMAT_VERSION}); upgrade sae-steering"
            )
        required = (
            "pipeline_fingerprint", "hook_point", "d_in", "n_latents", "k", "scheduler",
            "steps", "concepts", "files", "command", "created",
        )  # fmt: skip
        missing = [k for k in required if k not in d]
        if missing:
            raise BundleError(f"{MANIFEST_FILE}: missing field(s) {missing}")
        try:
            concepts = [ConceptSpec.from_dict(c) for c in d["concepts"]]
        except (TypeError, ValueError) as e:
            raise BundleError(f"{MANIFEST_FILE}: bad concept entry: {e}") from e
        files = d["files"]
        if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in files.items()
        ):
            raise BundleError(f"{MANIFEST_FILE}: files must map file names to sha256 strings")
        try:
            return cls(
                format_version=version,
                pipeline_fingerprint=str(d["pipeline_fingerprint"]),
                hook_point=str(d["hook_point"]),
                d_in=int(d["d_in"]),
                n_latents=int(d["n_latents"]),
                k=int(d["k"]),
                scheduler=dict(d["scheduler"]),
                steps=int(d["steps"]),
                concepts=concepts,
                files=dict(files),
                command=str(d["command"]),
                created=str(d["created"]),
                recipe=SteeringRecipe.from_dict(d.get("recipe", {})),
            )
        except (TypeError, ValueError) as e:
            raise BundleError(f"{MANIFEST_FILE}: bad field value: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> BundleManifest:
        """Parse manifest.json text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BundleError(f"{MANIFEST_FILE}: not valid JSON ({e})") from e
        return cls.from_dict(data)
