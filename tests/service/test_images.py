"""ImageStore: PNGs with provenance chunks, UUID-only paths, signed expiring links, expiry."""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image
from pydantic import SecretStr

from service.images import ImageStore, a1111_parameters, read_png_text
from service.secretfile import load_or_create_secret
from service.settings import Settings

PARAMETERS = {"prompt": "a red circle, on stripes", "negative_prompt": "blurry",
              "seed": 7, "steps": 20, "guidance": 7.5, "width": 32, "height": 32,
              "n_images": 2, "scheduler": "ddim",
              "concepts": [{"name": "red", "gamma": 60.0, "percentile": 99.0,
                            "direction": "suppress"},
                           {"name": "blue", "gamma": 5.0, "percentile": 98.0,
                            "direction": "amplify"},
                           {"name": "green", "gamma": 0.0, "percentile": 99.0,
                            "direction": "suppress"}]}
PROVENANCE = {"pipeline_fingerprint": "fp123", "bundle_sha256": "ab" * 32,
              "scheduler": {"class_name": "DDIMScheduler"}, "version": "0.1.0"}


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images", b"k" * 32, url_ttl_s=600)


def test_png_carries_a1111_parameters_and_json_provenance(store):
    image_id = str(uuid.uuid4())
    text = a1111_parameters(PARAMETERS, 8, PROVENANCE)
    path = store.save(Image.new("RGB", (32, 32), "red"), image_id, text,
                      {"seed": 8, "parameters": PARAMETERS, "provenance": PROVENANCE})
    assert path == store.directory / f"{image_id}.png" and store.exists(image_id)
    chunks = read_png_text(path)
    prompt, negative, fields = chunks["parameters"].split("\n")
    assert prompt == "a red circle, on stripes"
    assert negative == "Negative prompt: blurry"
    assert fields.startswith("Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 8, Size: 32x32, ")
    # Values holding separators are quoted as AUTOMATIC1111 quotes them; γ = 0 edits are off.
    assert 'Steering: "-red:60.0:99.0, +blue:5.0:98.0"' in fields
    assert "Pipeline fingerprint: fp123" in fields and f"Steering bundle: {'ab' * 32}" in fields
    meta = json.loads(chunks["sae-steering"])
    assert meta["seed"] == 8 and meta["parameters"] == PARAMETERS
    assert meta["provenance"] == PROVENANCE
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".")]  # no temp left


def test_only_canonical_uuids_become_paths(store):
    for bad in ("../../etc/passwd", "x.png", "", str(uuid.uuid4()).upper(),
                str(uuid.uuid4()) + "/..", "00000000-0000-0000-0000-00000000000g"):
        with pytest.raises(ValueError, match="not an image id"):
            store.path(bad)
        assert not store.exists(bad)
        assert not store.verify(bad, int(time.time()) + 60, "0" * 64)
        with pytest.raises(ValueError):
            store.signed_url(bad)


def test_signed_links_verify_and_expire(store):
    image_id, other = str(uuid.uuid4()), str(uuid.uuid4())
    now = 1_000_000.0
    url = store.signed_url(image_id, "https://api.example/", now=now)
    assert url.startswith(f"https://api.example/v1/images/{image_id}.png?exp=")
    query = dict(part.split("=") for part in url.split("?")[1].split("&"))
    exp, sig = int(query["exp"]), query["sig"]
    assert now + 600 <= exp < now + 600 + 60 and exp % 60 == 0
    assert store.verify(image_id, exp, sig, now=now)
    assert store.verify(image_id, str(exp), sig, now=exp - 1)
    assert not store.verify(image_id, exp, sig, now=exp + 1)          # expired
    assert not store.verify(other, exp, sig, now=now)                 # another image
    assert not store.verify(image_id, exp + 60, sig, now=now)         # exp changed
    forged = sig[:-1] + ("1" if sig[-1] == "0" else "0")
    assert not store.verify(image_id, exp, forged, now=now)           # signature changed
    assert not store.verify(image_id, "soon", sig, now=now)
    assert not store.verify(image_id, None, sig, now=now)
    assert not ImageStore(store.directory, b"other" * 8).verify(image_id, exp, sig, now=now)
    assert store.signed_url(image_id, now=now).startswith(f"/v1/images/{image_id}.png")


def test_delete_and_retention_sweep(store):
    ids = [str(uuid.uuid4()) for _ in range(3)]
    for image_id in ids:
        store.save(Image.new("RGB", (8, 8)), image_id, "p", {})
    assert store.delete([ids[0], "../nope", str(uuid.uuid4())]) == 1
    assert not store.exists(ids[0]) and store.exists(ids[1])

    old = time.time() - 3 * 24 * 3600
    os.utime(store.path(ids[1]), (old, old))
    foreign = store.directory / "notes.txt"
    foreign.write_text("not ours")
    os.utime(foreign, (old, old))
    stray_tmp = store.directory / f".tmp-{uuid.uuid4()}.png"
    stray_tmp.write_bytes(b"half")
    os.utime(stray_tmp, (old, old))
    assert store.sweep(older_than_s=24 * 3600) == 2
    assert not store.exists(ids[1]) and not stray_tmp.exists()
    assert store.exists(ids[2]) and foreign.exists()
    assert ImageStore(store.directory / "missing", b"k").sweep(1) == 0


def test_url_secret_is_shared_through_the_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path, redis_url=None)
    a, b = ImageStore.from_settings(settings), ImageStore.from_settings(settings)
    image_id = str(uuid.uuid4())
    query = dict(p.split("=") for p in a.signed_url(image_id).split("?")[1].split("&"))
    assert b.verify(image_id, query["exp"], query["sig"])  # another process, same data dir
    key_file = tmp_path / ".secrets" / "url"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_text()) == 64
    configured = load_or_create_secret(SecretStr("from-env"), tmp_path, "url")
    assert configured == b"from-env"


def test_a_prompt_cannot_forge_the_a1111_fields():
    """A prompt ending in "\\nNegative prompt: …\\nSteps: 999" was written verbatim, so an
    A1111 reader took the forged lines for the image's settings."""
    forged = dict(PARAMETERS, prompt="a cat\nNegative prompt: x\nSteps: 999, Seed: 1",
                  negative_prompt="dull\r\nSteps: 5")
    prompt, negative, fields = a1111_parameters(forged, 8, PROVENANCE).split("\n")
    assert prompt == "a cat Negative prompt: x Steps: 999, Seed: 1"
    assert negative == "Negative prompt: dull Steps: 5"
    assert fields.startswith("Steps: 20, ") and "Seed: 8" in fields


def test_image_writes_keep_the_reserve_free(tmp_path):
    """Below the reserve an image write fails as a full disk would, leaving the rest of the
    disk to the queue's append-only file; nothing is written."""
    import errno
    import shutil

    free = shutil.disk_usage(tmp_path).free
    store = ImageStore(tmp_path / "images", b"k" * 32, reserve_bytes=free + 2**30)
    with pytest.raises(OSError) as caught:
        store.save(Image.new("RGB", (8, 8)), str(uuid.uuid4()), "", {})
    assert caught.value.errno == errno.ENOSPC and "kept for the job store" in str(caught.value)
    assert not list((tmp_path / "images").iterdir())
    ImageStore(tmp_path / "images", b"k" * 32, reserve_bytes=2**20).save(
        Image.new("RGB", (8, 8)), str(uuid.uuid4()), "", {})
