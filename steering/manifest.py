"""The steering bundle's manifest.json: what a bundle is for and the checksum of every file.

Kept apart from :mod:`steering.bundle` and free of torch, so a process that only needs a
bundle's concepts (the API gateway, ``steer policy check``) reads them without loading torch.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_serializer,
    model_validator,
)

from steering.concepts import ConceptSpec, NonBlank
from steering.recipe import PLAIN, SteeringRecipe
from steering.schema import SpecModel, explain

# 2 adds ``recipe`` (steering/recipe.py); a version-1 bundle loads with the plain recipe.
# 3 adds the optional learned swaps, translation.safetensors (steering/translation.py).
# 4 adds the optional detection probe, gate_probe.safetensors (steering/gate_probe.py).
# 5 adds the optional open-world concept detectors, detectors.safetensors
#   (steering/detector.py), and ``closed_kinds`` (steering/edits.py check_closed_kinds).
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


def _supported(version: int) -> int:
    """Refuse a bundle written by a newer sae-steering (its fields may mean more)."""
    if version > BUNDLE_FORMAT_VERSION:
        raise ValueError(f"bundle format_version {version} is newer than this sae-steering "
                         f"supports ({BUNDLE_FORMAT_VERSION}); upgrade sae-steering")
    return version


FIX = "correct manifest.json or re-export the bundle (`steer export`)"


class BundleManifest(SpecModel):
    """Contents of manifest.json: what the bundle is for and the checksum of every file.

    Fields are written in declaration order (the bytes are checksummed as the bundle's id);
    fields newer than format 1 have defaults, so older manifests load, and are left out of
    the JSON while unset."""

    model_config = ConfigDict(validate_assignment=True)

    format_version: Annotated[int, Field(strict=True, ge=1), AfterValidator(_supported)]
    pipeline_fingerprint: str
    hook_point: str
    d_in: PositiveInt
    n_latents: PositiveInt
    k: PositiveInt
    scheduler: dict[str, Any]
    steps: PositiveInt
    concepts: list[ConceptSpec]
    files: dict[str, str]  # file name -> sha256 hex
    command: str
    created: str
    recipe: SteeringRecipe = PLAIN  # format 2
    # format 5: kinds in which every image holds exactly one concept (steering.edits)
    closed_kinds: list[NonBlank] = Field(default_factory=list, exclude_if=lambda v: not v)

    @field_serializer("files")
    def _sorted_files(self, files: dict[str, str]) -> dict[str, str]:
        """Files in name order, so the same bundle always writes the same bytes."""
        return dict(sorted(files.items()))

    @model_validator(mode="after")
    def _closed_kinds_exist(self) -> BundleManifest:
        """Every closed kind must be a kind of the bundle's concepts."""
        kinds = list(dict.fromkeys(c.kind for c in self.concepts))
        stray = [k for k in self.closed_kinds if k not in kinds]
        if stray:
            raise ValueError(f"closed_kinds names {stray}, which no concept has; the bundle's "
                             f"kinds are {', '.join(kinds) or '(none)'}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in a fixed key order."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        """Serialise as indented JSON (the exact bytes written to manifest.json)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> BundleManifest:
        """Parse a manifest dict; BundleError names the field and what to do."""
        if not isinstance(d, dict):
            raise BundleError(f"{MANIFEST_FILE}: expected a JSON object")
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise BundleError(explain(e, MANIFEST_FILE, FIX)) from None

    @classmethod
    def from_json(cls, text: str) -> BundleManifest:
        """Parse manifest.json text."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BundleError(f"{MANIFEST_FILE}: not valid JSON ({e})") from e
        return cls.from_dict(data)
