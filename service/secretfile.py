"""HMAC keys shared by the API and the workers: from settings, else a random file per data dir.

A deployment that sets ``STEER_URL_SIGNING_SECRET`` / ``STEER_WEBHOOK_SECRET`` uses those.
Otherwise the first process to need a key writes 32 random bytes (hex) to
``<data_dir>/.secrets/<name>`` and every process on the same data dir (the API, the workers,
which share the image volume anyway) reads the same file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import SecretStr


def load_or_create_secret(configured: SecretStr, data_dir: Path, name: str) -> bytes:
    """The configured secret, else the one in ``<data_dir>/.secrets/<name>`` (created once)."""
    value = configured.get_secret_value()
    if value:
        return value.encode()
    folder = Path(data_dir) / ".secrets"
    path = folder / name
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Write a private temp file, then link it into place: link() fails if another
        # process won the race, and nobody ever reads a half-written key.
        tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_text().strip()
    if not key:
        raise RuntimeError(f"{path} is empty; delete it (a new key is made) or set the secret "
                           "in the environment")
    return key.encode()
