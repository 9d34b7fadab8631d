"""The content-safety policy file: named policies of always-on suppressions and detection rules.

A policy file (TOML or YAML, ``STEER_POLICY_FILE``) names a ``default`` policy and defines
``[policies.<name>]`` tables::

    default = "public"

    [policies.public]
    suppress = [{ concept = "red" }]                      # γ / percentile: bundle defaults
    detect = [{ concept = "cross", threshold = 0.48, action = "refuse" }]

Requests use the default policy unless their API key names another (``steer keys create
--policy NAME``). The gateway and every worker load the file at start-up and check it
against the bundle; any error names the file, the policy, the entry and the field.
How a policy is applied to one generation is :mod:`service.enforce`.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from steering.concepts import ConceptSpec
from steering.edits import ConceptEdit, EditError, ResolvedEdit, resolve_edits

Action = Literal["mark", "steer", "refuse"]
POLICY_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SUFFIXES = (".toml", ".yaml", ".yml")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file, policy, entry and field."""


class Suppression(BaseModel):
    """A concept suppressed in every generation, whatever the request asks for it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concept: str = Field(..., min_length=1)
    gamma: float | None = Field(None, description="Default: the concept's default_gamma")
    percentile: float | None = Field(None, description="Default: the concept's percentile")


class DetectRule(BaseModel):
    """What to do with an image whose detection score for ``concept`` reaches ``threshold``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    concept: str = Field(..., min_length=1)
    threshold: float = Field(..., gt=0.0)
    action: Action

    @field_validator("threshold")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number (≈ 1 means a typical prompt of the "
                             "concept, ≈ 0 its absence)")
        return value


class PolicyTable(BaseModel):
    """A ``[policies.<name>]`` table as written in the file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    suppress: tuple[Suppression, ...] = ()
    detect: tuple[DetectRule, ...] = ()


class Policy(PolicyTable):
    """One named policy: always-on suppressions and detection rules."""

    name: str = ""

    def suppressions(self, concepts: Mapping[str, ConceptSpec]) -> list[ResolvedEdit]:
        """The always-on suppressions with the bundle's defaults filled in."""
        return resolve_edits([ConceptEdit(s.concept, s.gamma, s.percentile)
                              for s in self.suppress], dict(concepts))


class FileSchema(BaseModel):
    """A policy file as written: the default policy's name and every policy's table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: str
    policies: dict[str, PolicyTable] = Field(..., min_length=1)


@dataclass(frozen=True)
class PolicyFile:
    """A loaded policy file: every policy by name, the default's name, where it came from."""

    default: str
    policies: dict[str, Policy]
    path: Path = Path("<memory>")
    sha256: str = ""

    def get(self, name: str | None) -> Policy:
        """The policy called ``name`` (None: the default); a PolicyError names the known ones."""
        chosen = self.default if name is None else name
        policy = self.policies.get(chosen)
        if policy is None:
            raise PolicyError(f"{self.path}: no policy {chosen!r}; it defines "
                              f"{', '.join(sorted(self.policies))}")
        return policy


def _where(loc: tuple[Any, ...], raw: Any) -> str:
    """``("policies", "public", "detect", 1, "threshold")`` → "policy 'public', detect[1]
    (concept 'cross'), field threshold"."""
    parts: list[str] = []
    rest = list(loc)
    if len(rest) >= 2 and rest[0] == "policies":
        parts.append(f"policy {rest[1]!r}")
        raw = raw.get("policies", {}).get(rest[1], {}) if isinstance(raw, dict) else {}
        rest = rest[2:]
    if len(rest) >= 2 and rest[0] in ("suppress", "detect") and isinstance(rest[1], int):
        entry = f"{rest[0]}[{rest[1]}]"
        items = raw.get(rest[0]) if isinstance(raw, dict) else None
        item = items[rest[1]] if isinstance(items, list) and rest[1] < len(items) else None
        if isinstance(item, dict) and isinstance(item.get("concept"), str):
            entry += f" (concept {item['concept']!r})"
        parts.append(entry)
        rest = rest[2:]
    if rest:
        parts.append("field " + ".".join(str(p) for p in rest))
    return ", ".join(parts) or "top level"


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    """The file's data (TOML or YAML by suffix) and its bytes."""
    if path.suffix.lower() not in SUFFIXES:
        raise PolicyError(f"{path}: a policy file must end in .toml, .yaml or .yml")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path} ({exc.strerror}): point "
                          "STEER_POLICY_FILE at a policy file, or unset it for no policy") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text ({exc})") from exc
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{path}: not valid TOML ({exc})") from exc
    else:
        import yaml  # the service extra installs PyYAML; only YAML files need it

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a table with `default` and `policies`")
    return data, raw


def parse_policies(data: dict[str, Any], path: Path = Path("<memory>"), sha256: str = ""
                   ) -> PolicyFile:
    """Validate the structure of a policy file's data (not yet against a bundle)."""
    try:
        parsed = FileSchema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; allowed: " + _allowed(err["loc"])
        elif err["type"] == "missing":
            msg = "missing"
        raise PolicyError(f"{path}: {_where(tuple(err['loc']), data)}: {msg}{more}") from None
    for name, policy in parsed.policies.items():
        if not re.fullmatch(POLICY_NAME, name):
            raise PolicyError(f"{path}: policy {name!r}: names use letters, digits, '_', '-' "
                              "and '.' (at most 64)")
        for field in ("suppress", "detect"):
            seen: set[str] = set()
            for i, entry in enumerate(getattr(policy, field)):
                if entry.concept in seen:
                    raise PolicyError(f"{path}: policy {name!r}, {field}[{i}] (concept "
                                      f"{entry.concept!r}): listed twice; keep one entry")
                seen.add(entry.concept)
        suppressed = {s.concept for s in policy.suppress}
        for i, rule in enumerate(policy.detect):
            if rule.action == "steer" and rule.concept in suppressed:
                raise PolicyError(
                    f"{path}: policy {name!r}, detect[{i}] (concept {rule.concept!r}), field "
                    "action: the concept is always suppressed by this policy, so 'steer' would "
                    "regenerate what is already steered; use 'mark' or 'refuse'")
    if parsed.default not in parsed.policies:
        raise PolicyError(f"{path}: field default: {parsed.default!r} is not a policy; "
                          f"defined: {', '.join(sorted(parsed.policies))}")
    return PolicyFile(parsed.default, {n: Policy(name=n, **dict(table))
                                       for n, table in parsed.policies.items()}, path, sha256)


def _allowed(loc: tuple[Any, ...] | list[Any]) -> str:
    """The fields allowed where an unknown one was found."""
    depth = [p for p in loc[:-1] if not isinstance(p, int)]
    model: type[BaseModel] = FileSchema
    if depth[:1] == ["policies"]:
        model = PolicyTable
        if len(depth) >= 3:
            model = Suppression if depth[2] == "suppress" else DetectRule
    return ", ".join(model.model_fields)


def load_policies(path: Path) -> PolicyFile:
    """Read and validate a policy file's structure (use :func:`check_policies` for the bundle)."""
    path = Path(path)
    data, raw = _read(path)
    return parse_policies(data, path, hashlib.sha256(raw).hexdigest())


def check_policies(policies: PolicyFile, concepts: Mapping[str, ConceptSpec]) -> None:
    """Every concept a policy names is in the bundle, with γ / percentile in its range."""
    known = ", ".join(concepts) or "(none: no steering bundle is loaded)"
    for name, policy in policies.policies.items():
        for field in ("suppress", "detect"):
            for i, entry in enumerate(getattr(policy, field)):
                where = (f"{policies.path}: policy {name!r}, {field}[{i}] (concept "
                         f"{entry.concept!r})")
                if entry.concept not in concepts:
                    raise PolicyError(f"{where}, field concept: not in the bundle; known: "
                                      f"{known}")
                if isinstance(entry, Suppression):
                    _check_suppression(entry, concepts, where)


def _check_suppression(entry: Suppression, concepts: Mapping[str, ConceptSpec],
                       where: str) -> None:
    """γ and percentile within the concept's ranges, and not 0 (which would be "off")."""
    try:
        (edit,) = resolve_edits([ConceptEdit(entry.concept, entry.gamma, entry.percentile)],
                                dict(concepts))
    except EditError as exc:
        raise PolicyError(f"{where}, field {exc.field}: {exc}") from None
    if not edit.active:
        raise PolicyError(f"{where}, field gamma: 0 turns the suppression off; remove the "
                          "entry instead")


def load_checked(path: Path | None, concepts: Mapping[str, ConceptSpec]) -> PolicyFile | None:
    """The policy file at ``path`` checked against ``concepts``; None when there is none."""
    if path is None:
        return None
    policies = load_policies(path)
    check_policies(policies, concepts)
    return policies
