"""The concepts the gateway validates requests against: the steering bundle's manifest.

The gateway never loads the SAE (nor torch: steering.manifest is torch-free); it reads
``manifest.json`` once at start-up. Its sha256 is the
bundle's id (as ``SteeringBundle.sha256``), which /readyz compares with what workers loaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from steering.anchors import TRANSLATION_FILE, read_anchors
from steering.concepts import ConceptSpec
from steering.manifest import MANIFEST_FILE, BundleError, BundleManifest


@dataclass(frozen=True)
class Catalog:
    """Concepts by name (manifest order) and the bundle's sha256; empty without a bundle."""

    concepts: dict[str, ConceptSpec] = field(default_factory=dict)
    bundle_sha256: str | None = None
    manifest: BundleManifest | None = None  # closed kinds and the rest of the bundle's terms
    # concept -> the anchor its learned swap turns it into (recipes that use the swaps)
    anchors: dict[str, str] = field(default_factory=dict)


def load_catalog(bundle_dir: Path | None) -> Catalog:
    """Read the bundle's manifest; a missing or bad one stops start-up with what to fix."""
    if bundle_dir is None:
        return Catalog()
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RuntimeError(f"cannot read {path} ({exc.strerror}): point STEER_BUNDLE_DIR at a "
                           "steering bundle folder, or set it empty to serve without one") from exc
    try:
        manifest = BundleManifest.from_json(raw.decode("utf-8"))
    except (BundleError, UnicodeDecodeError) as exc:
        raise RuntimeError(f"{path}: {exc}") from exc
    anchors: dict[str, str] = {}
    if manifest.recipe.name == "translate" and TRANSLATION_FILE in manifest.files:
        swaps = Path(bundle_dir) / TRANSLATION_FILE
        try:
            anchors = read_anchors(swaps)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"{swaps}: {exc}") from exc
    return Catalog({c.name: c for c in manifest.concepts}, hashlib.sha256(raw).hexdigest(),
                   manifest, anchors)
