"""The base of the bundle's JSON models (manifest, concepts, recipe) and their error messages.

Each model declares its fields' types, ranges and defaults once (pydantic); this module adds
positional construction, as the dataclasses they replace allowed (``ConceptSpec("red",
"colour", 5.0, (1.0, 30.0), 99.0)``), and turns pydantic's multi-line errors into one line that
names the file and the field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


class SpecModel(BaseModel):
    """A pydantic model that also takes its fields positionally, in declaration order."""

    def __init__(self, /, *args: Any, **data: Any) -> None:
        """Map positional arguments onto the fields in order, then validate as usual."""
        names = list(type(self).model_fields)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional "
                            f"arguments ({', '.join(names)}), got {len(args)}")
        for name, value in zip(names, args, strict=False):
            if name in data:
                raise TypeError(f"{type(self).__name__} got {name!r} twice (positionally "
                                "and by name)")
            data[name] = value
        super().__init__(**data)


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("concepts", 2, "default_gamma")`` -> ``concepts[2].default_gamma``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def explain(error: ValidationError, where: str, fix: str = "") -> str:
    """``where: field: what is wrong`` per problem, joined by "; ", then ``fix`` unless every
    problem came from one of our validators (their messages already say what to do)."""
    problems = []
    generic = False
    for e in error.errors(include_url=False):
        loc = tuple(e["loc"])
        generic |= e["type"] != "value_error"
        if e["type"] == "value_error":
            what = str(e["ctx"]["error"])
        elif e["type"] == "missing":
            what = "missing (required)"
        elif e["type"] == "extra_forbidden":
            loc, what = loc[:-1], f"unknown field {loc[-1]!r}"
        else:
            what = f"{e['msg'][:1].lower()}{e['msg'][1:]}, got {e['input']!r}"
        path = field_path(loc)
        problems.append(f"{path}: {what}" if path else what)
    return f"{where}: {'; '.join(problems)}" + (f" — {fix}" if fix and generic else "")
