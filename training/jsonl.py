"""Reading the JSONL inputs of the bundle commands (pairs, detector runs, tuning prompts):
one JSON object a line, blank lines skipped, every error naming the file and line to fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_objects(path: str | Path, what: str) -> list[tuple[str, dict[str, Any]]]:
    """(``file:line``, object) of every non-blank line; ``what`` says what a line holds
    (e.g. "an object with prompt, counterfactual and seed"), for the errors."""
    out = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg}); each line is {what}") from e
        if not isinstance(item, dict):
            raise ValueError(f"{where}: each line is {what}")
        out.append((where, item))
    if not out:
        raise ValueError(f"{path} holds nothing; write {what} a line")
    return out


def is_seed(value: Any) -> bool:
    """A seed is a non-negative integer (JSON true/false are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
