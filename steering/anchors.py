"""Each learned swap's anchor, read from the header of ``translation.safetensors`` alone.

The API gateway validates requests without torch (service/catalog.py): a safetensors file
starts with an 8-byte little-endian header length and a JSON header whose ``__metadata__``
holds the anchors (steering/translation.py writes them), so no tensor is read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

TRANSLATION_FILE = "translation.safetensors"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def read_anchors(path: str | Path) -> dict[str, str]:
    """Concept -> anchor of every swap in the translation file at ``path``."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {size} bytes; not a translation "
                             "file")
        header = json.loads(f.read(size))
    anchors = json.loads(header.get("__metadata__", {}).get("anchors", "{}"))
    if not isinstance(anchors, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in anchors.items()):
        raise ValueError(f"{path}: metadata 'anchors' must map concept to anchor")
    return anchors
