"""Steering bundle: one checksummed folder with the SAE, importance tables and a manifest.

    manifest.json            format version, pipeline fingerprint, hook point, sizes, scheduler
                             and steps, concepts, sha256 of every other file, the command
    cfg.json, sae.safetensors   the SAE in sparsify's layout
    importance.safetensors   scores / means [C, steps, n] and timesteps [steps]
    translation.safetensors  optional (format 3): learned swaps per concept (translate recipe)
    gate_probe.safetensors   optional (format 4): the detection gate's learned read-out
    detectors.safetensors    optional (format 5): calibrated per-concept detectors (open world)

``manifest.json`` is written last, so a folder without one is an unfinished export.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from steering.concepts import ConceptSpec
from steering.detector import DETECTORS_FILE, ConceptDetectors
from steering.fingerprint import HOOK_POINT
from steering.gate_probe import GATE_PROBE_FILE, GateProbe
from steering.importance_tables import ImportanceTables, UnknownConceptError
from steering.manifest import (  # re-exported: the bundle format's public names
    BUNDLE_FORMAT_VERSION,
    MANIFEST_FILE,
    BundleError,
    BundleManifest,
    scheduler_description,
)
from steering.recipe import PLAIN, SteeringRecipe
from steering.sae import CFG_FILE, WEIGHTS_FILE, TopKSAE
from steering.schema import explain
from steering.translation import TRANSLATION_FILE, TranslationTables

IMPORTANCE_FILE = "importance.safetensors"
REQUIRED_FILES = (CFG_FILE, WEIGHTS_FILE, IMPORTANCE_FILE)

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Sha256 hex of a file, read in 1 MiB chunks so large files never sit in RAM."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _load_part(path: Path, manifest: BundleManifest, load: Callable[..., Any],
               check: Callable[[Any, BundleManifest], None], what: str,
               device: str | torch.device) -> Any:
    """An optional bundle file, loaded and checked against the manifest when it lists it."""
    if path.name not in manifest.files:
        return None
    try:
        part = load(path, device)
        check(part, manifest)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path.name}: cannot load {what}: {e}") from e
    return part


@dataclass
class SteeringBundle:
    """A loaded (or about-to-be-saved) steering bundle: manifest, SAE, importance tables and,
    optionally, the learned swaps of the translate recipe, the gate's probe and the
    calibrated concept detectors."""

    manifest: BundleManifest
    sae: TopKSAE
    tables: ImportanceTables
    translations: TranslationTables | None = None
    gate_probe: GateProbe | None = None
    detectors: ConceptDetectors | None = None
    _manifest_sha256: str | None = field(default=None, repr=False, compare=False)
    # optional file -> (the object loaded from it, its path, its sha256): saving the same
    # object back to that path keeps the file (safetensors writes metadata in hash-map order,
    # so a rewrite of unchanged swaps would change their bytes and checksum)
    _loaded_parts: dict[str, tuple[object, Path, str]] = field(
        default_factory=dict, repr=False, compare=False)

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        sae: TopKSAE,
        tables: ImportanceTables,
        concepts: Sequence[ConceptSpec],
        pipeline_fingerprint: str,
        scheduler: dict[str, Any] | Any,
        command: str,
        hook_point: str = HOOK_POINT,
        recipe: SteeringRecipe = PLAIN,
        closed_kinds: Sequence[str] = (),
    ) -> SteeringBundle:
        """Assemble a bundle and its manifest (steps = table rows; checksums filled by save);
        ``closed_kinds`` are kinds whose concepts cover every image (one each)."""
        concepts = list(concepts)
        names = [c.name for c in concepts]
        if names != list(tables.concepts):
            raise BundleError(
                f"concept specs {names} do not match the importance tables' concepts "
                f"{list(tables.concepts)} (same names, same order)"
            )
        if tables.num_latents != sae.num_latents:
            raise BundleError(
                f"importance tables have n={tables.num_latents} features but the SAE has "
                f"n_latents={sae.num_latents}"
            )
        try:
            manifest = BundleManifest(
                format_version=BUNDLE_FORMAT_VERSION,
                pipeline_fingerprint=pipeline_fingerprint,
                hook_point=hook_point,
                d_in=sae.d_in,
                n_latents=sae.num_latents,
                k=sae.k,
                scheduler=scheduler_description(scheduler),
                steps=tables.num_steps,
                concepts=concepts,
                files={},
                command=command,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                recipe=recipe,
                closed_kinds=list(closed_kinds),
            )
        except ValidationError as e:
            raise BundleError(explain(e, MANIFEST_FILE)) from None
        return cls(manifest=manifest, sae=sae, tables=tables)

    def save(self, directory: str | Path) -> None:
        """Write SAE and tables, checksum them, then write manifest.json last (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        manifest_path = directory / MANIFEST_FILE
        # An old manifest must not vouch for files that are about to be replaced.
        manifest_path.unlink(missing_ok=True)
        self.manifest.format_version = BUNDLE_FORMAT_VERSION  # written in today's format
        self.sae.save_pretrained(directory)
        self.tables.save(directory / IMPORTANCE_FILE)
        names = list(REQUIRED_FILES)
        if self.translations is not None:
            self.check_translations(self.translations, self.manifest)
        if self.gate_probe is not None:
            self.check_gate_probe(self.gate_probe, self.manifest)
        if self.detectors is not None:
            self.check_detectors(self.detectors, self.manifest)
        for name, part in self._optional_parts():
            if part is None:
                (directory / name).unlink(missing_ok=True)
                continue
            names.append(name)
            loaded, path, sha = self._loaded_parts.get(name, (None, None, None))
            target = (directory / name).resolve()
            if loaded is part and path == target and target.is_file() and \
                    sha256_file(target) == sha:
                continue  # unchanged since loaded from this very file
            part.save(directory / name)
        self.manifest.files = {name: sha256_file(directory / name) for name in names}
        text = self.manifest.to_json()
        tmp = directory / (MANIFEST_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest_path)
        self._manifest_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        directory: str | Path,
        expected_fingerprint: str | None = None,
        device: str | torch.device = "cpu",
    ) -> SteeringBundle:
        """Load and verify version, checksums, shapes, concept names and pipeline fingerprint."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.is_file():
            raise BundleError(
                f"{MANIFEST_FILE} not found in {directory}: not a steering bundle, or its "
                "export did not finish"
            )
        raw = manifest_path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BundleError(f"{MANIFEST_FILE}: not UTF-8 text ({e})") from e
        manifest = BundleManifest.from_json(text)

        # 1. checksums of every listed file (and the required ones must be listed)
        unlisted = [name for name in REQUIRED_FILES if name not in manifest.files]
        if unlisted:
            raise BundleError(f"{MANIFEST_FILE}: files does not list {unlisted}")
        for name, expected in manifest.files.items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise BundleError(f"{MANIFEST_FILE}: file entry {name!r} is not a plain file name")
            path = directory / name
            if not path.is_file():
                raise BundleError(f"{name}: listed in {MANIFEST_FILE} but missing from {directory}")
            actual = sha256_file(path)
            if actual != expected:
                raise BundleError(
                    f"{name}: sha256 is {actual}, {MANIFEST_FILE} says {expected} — the file "
                    "was changed or corrupted; re-export the bundle"
                )

        # 2. SAE shapes vs manifest
        try:
            sae = TopKSAE.from_pretrained(directory, device=device)
        except (OSError, ValueError) as e:
            raise BundleError(f"{WEIGHTS_FILE}: cannot load the SAE: {e}") from e
        m = manifest
        if (sae.num_latents, sae.d_in) != (m.n_latents, m.d_in):
            raise BundleError(
                f"{WEIGHTS_FILE}: W_dec has shape {[sae.num_latents, sae.d_in]} but "
                f"{MANIFEST_FILE} says [n_latents, d_in] = {[m.n_latents, m.d_in]}"
            )
        if sae.k != m.k:
            raise BundleError(f"{CFG_FILE}: k is {sae.k} but {MANIFEST_FILE} says k = {m.k}")

        # 3. tables shapes and concept names vs manifest
        try:
            tables = ImportanceTables.load(directory / IMPORTANCE_FILE, device=device)
        except (OSError, ValueError) as e:
            raise BundleError(f"{IMPORTANCE_FILE}: cannot load the tables: {e}") from e
        want = [len(m.concepts), m.steps, m.n_latents]
        got = list(tables.scores.shape)
        if got != want:
            raise BundleError(
                f"{IMPORTANCE_FILE}: scores has shape {got} but {MANIFEST_FILE} says "
                f"[concepts, steps, n_latents] = {want}"
            )
        names = [c.name for c in m.concepts]
        if list(tables.concepts) != names:
            raise BundleError(
                f"{IMPORTANCE_FILE}: concepts are {list(tables.concepts)} but {MANIFEST_FILE} "
                f"lists {names} (same names in the same order are required)"
            )

        # 4. learned swaps (format 3), the gate's probe (4) and the detectors (5), when listed
        translations = _load_part(directory / TRANSLATION_FILE, manifest, TranslationTables.load,
                                  cls.check_translations, "the learned swaps", device)
        if translations is None and manifest.recipe.name == "translate":
            raise BundleError(f"{MANIFEST_FILE}: recipe 'translate' needs {TRANSLATION_FILE}, "
                              "which the bundle does not list; rebuild it with its swaps or "
                              "set the recipe to 'replace'")
        gate_probe = _load_part(directory / GATE_PROBE_FILE, manifest, GateProbe.load,
                                cls.check_gate_probe, "the gate's probe", device)
        detectors = _load_part(directory / DETECTORS_FILE, manifest, ConceptDetectors.load,
                               cls.check_detectors, "the concept detectors", device)

        # 5. pipeline fingerprint
        bundle = cls(
            manifest=manifest,
            sae=sae,
            tables=tables,
            translations=translations,
            gate_probe=gate_probe,
            detectors=detectors,
            _manifest_sha256=hashlib.sha256(raw).hexdigest(),
        )
        bundle._loaded_parts = {name: (part, (directory / name).resolve(), manifest.files[name])
                                for name, part in bundle._optional_parts() if part is not None}
        if expected_fingerprint is not None:
            bundle.check_fingerprint(expected_fingerprint)
        return bundle

    @staticmethod
    def check_translations(translations: TranslationTables, manifest: BundleManifest) -> None:
        """Refuse learned swaps made for another SAE size, step count or concept list."""
        m = manifest
        have = (translations.n_latents, translations.d_in, translations.num_steps)
        if have != (m.n_latents, m.d_in, m.steps):
            raise BundleError(f"{TRANSLATION_FILE}: made for [n_latents, d_in, steps] = "
                              f"{list(have)} but {MANIFEST_FILE} says "
                              f"{[m.n_latents, m.d_in, m.steps]}")
        try:
            translations.validate(c.name for c in m.concepts)
        except ValueError as e:
            raise BundleError(f"{TRANSLATION_FILE}: {e}") from e

    def _optional_parts(self) -> list[tuple[str, Any]]:
        """(file name, object or None) of every optional part, in one place for save/load."""
        return [(TRANSLATION_FILE, self.translations), (GATE_PROBE_FILE, self.gate_probe),
                (DETECTORS_FILE, self.detectors)]

    @staticmethod
    def _check_readout(part: ConceptDetectors | GateProbe, file: str,
                       manifest: BundleManifest) -> None:
        """Refuse a per-concept read-out (detectors, gate probe) made for another concept
        list, SAE size or step count, naming its file."""
        try:
            part.validate([c.name for c in manifest.concepts], manifest.n_latents,
                          manifest.steps)
        except ValueError as e:
            raise BundleError(f"{file}: {e}") from e

    @classmethod
    def check_detectors(cls, detectors: ConceptDetectors, manifest: BundleManifest) -> None:
        """Refuse detectors made for another concept list, SAE size or step count."""
        cls._check_readout(detectors, DETECTORS_FILE, manifest)

    @classmethod
    def check_gate_probe(cls, probe: GateProbe, manifest: BundleManifest) -> None:
        """Refuse a gate probe made for another concept list, SAE size or step count."""
        cls._check_readout(probe, GATE_PROBE_FILE, manifest)

    def check_fingerprint(self, fingerprint: str) -> None:
        """Refuse a pipeline other than the one the bundle was made for."""
        made_for = self.manifest.pipeline_fingerprint
        if fingerprint != made_for:
            raise BundleError(
                f"{MANIFEST_FILE}: the bundle was made for pipeline fingerprint "
                f"{made_for} but the loaded pipeline is {fingerprint} "
                "(a different model, e.g. SD-1.4 vs SD-1.5); rebuild the bundle for this pipeline"
            )

    # -- queries -----------------------------------------------------------------------------

    @property
    def sha256(self) -> str:
        """Sha256 of manifest.json's bytes: the bundle's id in provenance records."""
        if self._manifest_sha256 is None:
            return hashlib.sha256(self.manifest.to_json().encode("utf-8")).hexdigest()
        return self._manifest_sha256

    @property
    def concept_names(self) -> list[str]:
        """Concept names in manifest order."""
        return [c.name for c in self.manifest.concepts]

    def concept(self, name: str) -> ConceptSpec:
        """The spec of concept ``name``; unknown names raise KeyError listing the known ones."""
        for c in self.manifest.concepts:
            if c.name == name:
                return c
        raise UnknownConceptError(
            f"unknown concept {name!r}; known concepts: {', '.join(self.concept_names)}"
        )

    def concepts_of_kind(self, kind: str) -> list[str]:
        """Names of the bundle's concepts of the given kind, in manifest order."""
        return [c.name for c in self.manifest.concepts if c.kind == kind]
