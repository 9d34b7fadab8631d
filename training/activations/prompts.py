"""Prompt files (JSONL): one prompt per line with its concept labels and seed.

    {"prompt": "a red circle", "concepts": {"colour": "red", "shape": "circle"}, "seed": 12}

``concepts`` maps kind -> concept name (at most one per kind, may be empty); an optional
``negative_prompt`` may be given. A record's id is its 0-based line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PromptFileError(ValueError):
    """A prompt file line that cannot be read; the message names the file, line and field."""


@dataclass(frozen=True)
class PromptRecord:
    """One line of a prompt file."""

    id: int
    prompt: str
    concepts: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    negative_prompt: str = ""

    def to_json(self) -> str:
        """The JSONL line (without newline); ``id`` is implied by the line number."""
        d: dict[str, Any] = {"prompt": self.prompt, "concepts": dict(sorted(self.concepts.items())),
                             "seed": self.seed}
        if self.negative_prompt:
            d["negative_prompt"] = self.negative_prompt
        return json.dumps(d, ensure_ascii=False)


def _record(line_no: int, obj: Any, where: str) -> PromptRecord:
    def bad(fld: str, why: str) -> PromptFileError:
        return PromptFileError(f"{where} line {line_no + 1}: field {fld!r} {why}")

    if not isinstance(obj, dict):
        raise bad("<line>", f"must be a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"prompt", "concepts", "seed", "negative_prompt"}
    if unknown:
        raise bad(sorted(unknown)[0], "is not a prompt-file field (prompt, concepts, seed, "
                  "negative_prompt)")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad("prompt", "is missing or not a non-empty string")
    concepts = obj.get("concepts", {})
    if not isinstance(concepts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in concepts.items()):
        raise bad("concepts", "must map kind -> concept name (non-empty strings), e.g. "
                  '{"colour": "red"}')
    seed = obj.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise bad("seed", "is missing or not an integer in [0, 2**63)")
    negative = obj.get("negative_prompt", "")
    if not isinstance(negative, str):
        raise bad("negative_prompt", "must be a string")
    return PromptRecord(line_no, prompt, dict(concepts), seed, negative)


def parse_prompts(text: str, where: str = "<prompts>") -> list[PromptRecord]:
    """Records of a prompt file's text; errors name ``where``, the line and the field."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            raise PromptFileError(f"{where} line {i + 1}: empty line (ids are line numbers; "
                                  "remove blank lines)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where} line {i + 1}: not valid JSON ({e.msg})") from e
        records.append(_record(i, obj, where))
    if not records:
        raise PromptFileError(f"{where} holds no prompts")
    return records


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """Read a JSONL prompt file; errors name the line and the field."""
    path = Path(path)
    return parse_prompts(path.read_text(encoding="utf-8"), str(path))


def write_prompts(path: str | Path, records: Iterable[PromptRecord]) -> None:
    """Write records as JSONL, one per line in the given order (ids become line numbers)."""
    text = "".join(r.to_json() + "\n" for r in records)
    Path(path).write_text(text, encoding="utf-8")


def concept_kinds(records: Sequence[PromptRecord]) -> dict[str, str]:
    """Concept name -> kind over all records, in (kind, name) order; a name under two kinds
    is an error."""
    kinds: dict[str, str] = {}
    for r in records:
        for kind, name in r.concepts.items():
            if kinds.setdefault(name, kind) != kind:
                raise PromptFileError(
                    f"concept {name!r} is labelled with two kinds ({kinds[name]!r} and "
                    f"{kind!r}, line {r.id + 1}); give each concept name a single kind")
    return dict(sorted(kinds.items(), key=lambda nk: (nk[1], nk[0])))
