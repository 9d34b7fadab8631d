"""Generated images on disk: ``<images_dir>/<uuid>.png`` with provenance, signed links, expiry.

The folder is shared by the API (which serves the files) and the workers (which write them).
A path is only ever built from a validated UUID, so nothing a client sends reaches the
filesystem. Every PNG carries its provenance twice: a ``parameters`` text chunk written the
way AUTOMATIC1111 writes it (readable by the tools that read those), and a ``sae-steering``
chunk holding the same facts as JSON. Image links are ``/v1/images/<id>.png?exp=&sig=`` with
an HMAC-SHA256 signature, so an ``<img>`` tag works without an Authorization header.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from service.jobstore import valid_id
from service.secretfile import load_or_create_secret
from service.settings import Settings

PARAMETERS_CHUNK = "parameters"
PROVENANCE_CHUNK = "sae-steering"
# Signed links expire on a minute boundary, so links made within a minute are identical
# (and the browser's cache works for them).
EXPIRY_GRANULARITY_S = 60
_TMP_PREFIX = ".tmp-"


def _one_line(text: str) -> str:
    """``text`` with every run of line breaks (CR, LF, and Unicode's) replaced by one space."""
    return " ".join(part for part in text.splitlines() if part)


def _quote(text: str) -> str:
    """Quote a value the way AUTOMATIC1111 does when it holds a separator."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def edit_text(edit: dict[str, Any]) -> str:
    """``-red:20.0:99.5`` / ``+blue:5.0:99.0``: the syntax `steer generate --concept` parses."""
    sign = "+" if edit.get("direction") == "amplify" else "-"
    return f"{sign}{edit['name']}:{edit['gamma']}:{edit['percentile']}"


def a1111_parameters(parameters: dict[str, Any], seed: int,
                     provenance: dict[str, Any]) -> str:
    """The ``parameters`` text of one image: prompt, negative prompt, then ``Key: value``s.
    Line breaks in the prompts become spaces (A1111 readers split on lines, so a prompt could
    otherwise forge the settings line; the exact prompts are in the JSON provenance chunk)."""
    lines = [_one_line(parameters.get("prompt", ""))]
    if parameters.get("negative_prompt"):
        lines.append(f"Negative prompt: {_one_line(parameters['negative_prompt'])}")
    fields: dict[str, Any] = {
        "Steps": parameters.get("steps"),
        "Sampler": "DDIM",
        "CFG scale": parameters.get("guidance"),
        "Seed": seed,
        "Size": f"{parameters.get('width')}x{parameters.get('height')}",
        "Pipeline fingerprint": provenance.get("pipeline_fingerprint"),
    }
    edits = [e for e in parameters.get("concepts", []) if e.get("gamma")]
    if edits:
        fields["Steering"] = ", ".join(edit_text(e) for e in edits)
    fields["Steering bundle"] = provenance.get("bundle_sha256")
    fields["Version"] = f"sae-steering {provenance.get('version', '')}".strip()
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in fields.items()
                           if v is not None))
    return "\n".join(lines)


def read_png_text(path: Path) -> dict[str, str]:
    """The text chunks of a PNG (``parameters``, ``sae-steering``…)."""
    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}))


class ImageStore:
    """The image folder: save, find, sign links to, delete and expire ``<uuid>.png`` files."""

    def __init__(self, directory: Path, secret: bytes, url_ttl_s: int = 3600,
                 reserve_bytes: int = 0) -> None:
        self.directory = Path(directory)
        self._secret = secret
        self.url_ttl_s = url_ttl_s
        self.reserve_bytes = reserve_bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageStore:
        """The store of ``settings.images_dir``, signing with the shared URL secret."""
        secret = load_or_create_secret(settings.url_signing_secret, settings.data_dir, "url")
        return cls(settings.images_dir, secret, settings.image_url_ttl_s,
                   settings.image_reserve_mb * 2**20)

    def path(self, image_id: str) -> Path:
        """``<dir>/<id>.png``; ValueError unless ``image_id`` is a canonical UUID."""
        if not valid_id(image_id):
            raise ValueError(f"{image_id!r} is not an image id (a UUID)")
        return self.directory / f"{image_id}.png"

    def exists(self, image_id: str) -> bool:
        """True when the id is valid and its file is present."""
        return valid_id(image_id) and self.path(image_id).is_file()

    def save(self, image: Image.Image, image_id: str, parameters: str,
             provenance: dict[str, Any]) -> Path:
        """Write the PNG with both text chunks; readers never see a half-written file."""
        path = self.path(image_id)
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_CHUNK, parameters)
        info.add_text(PROVENANCE_CHUNK, json.dumps(provenance, sort_keys=True, default=str))
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.reserve_bytes and shutil.disk_usage(self.directory).free < self.reserve_bytes:
            # fail this image while the queue's log (the same disk when embedded) can still
            # record the failure
            raise OSError(errno.ENOSPC, f"No space left on device (under "
                          f"{self.reserve_bytes / 2**20:g} MB free, kept for the job store)")
        tmp = self.directory / f"{_TMP_PREFIX}{image_id}.png"
        try:
            image.save(tmp, format="PNG", pnginfo=info)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
            raise
        return path

    def _signature(self, image_id: str, exp: int) -> str:
        return hmac.new(self._secret, f"{image_id}:{exp}".encode(), hashlib.sha256).hexdigest()

    def signed_url(self, image_id: str, base: str = "", ttl_s: int | None = None,
                   now: float | None = None) -> str:
        """``<base>/v1/images/<id>.png?exp=<unix time>&sig=<hmac>``, valid for ``ttl_s``."""
        self.path(image_id)  # validates the id
        ttl = self.url_ttl_s if ttl_s is None else ttl_s
        now = time.time() if now is None else now
        exp = math.ceil((now + ttl) / EXPIRY_GRANULARITY_S) * EXPIRY_GRANULARITY_S
        return (f"{base.rstrip('/')}/v1/images/{image_id}.png"
                f"?exp={exp}&sig={self._signature(image_id, exp)}")

    def verify(self, image_id: str, exp: int | str | None, sig: str | None,
               now: float | None = None) -> bool:
        """True for a valid id with an unexpired ``exp`` and the right signature."""
        if not valid_id(image_id) or exp is None or not sig:
            return False
        try:
            exp_int = int(exp)
        except (TypeError, ValueError):
            return False
        if exp_int < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self._signature(image_id, exp_int), str(sig))

    def delete(self, ids: Iterable[str]) -> int:
        """Remove these images (invalid ids and missing files are skipped); how many went."""
        removed = 0
        for image_id in ids:
            if not valid_id(image_id):
                continue
            try:
                self.path(image_id).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def sweep(self, older_than_s: float, now: float | None = None) -> int:
        """Remove images (and stray temp files) older than ``older_than_s``; how many went."""
        if not self.directory.is_dir():
            return 0
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = 0
        for entry in os.scandir(self.directory):
            name = entry.name
            stem = name[len(_TMP_PREFIX):] if name.startswith(_TMP_PREFIX) else name
            if not (stem.endswith(".png") and valid_id(stem[:-4])):
                continue  # never touch files this store did not write
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
