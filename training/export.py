"""Build steering bundles (docs/serving.md): from SAE + importance tables, and by adding a
concept.

Concept defaults come from a spec file (JSON or TOML) layered as built-in < ``defaults`` <
``kinds.<kind>`` < ``concepts.<name>``::

    [defaults]
    default_gamma = 5.0
    gamma_range = [0.5, 50.0]
    default_percentile = 99.0
    [kinds.colour]
    default_gamma = 10.0
    [concepts.red]
    gamma_range = [1.0, 80.0]
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from torch import Tensor

from steering.bundle import MANIFEST_FILE, BundleError, SteeringBundle
from steering.concepts import ConceptSpec
from steering.fingerprint import pipeline_fingerprint
from steering.importance_tables import ImportanceTables
from steering.recipe import GATED_REPLACE, SteeringRecipe
from steering.sae import TopKSAE
from steering.schema import explain
from training.activations.prompts import PromptRecord, concept_kinds, load_prompts
from training.activations.store import ActivationStore
from training.importance import accumulate_codes, score_from_means

BUILTIN_DEFAULTS: dict[str, Any] = {
    "default_gamma": 5.0, "gamma_range": (0.5, 50.0), "default_percentile": 99.0,
}
_FIELDS = tuple(BUILTIN_DEFAULTS)

ConceptDefaults = create_model(
    "ConceptDefaults", __config__=ConfigDict(extra="forbid", frozen=True),
    **{f: (ConceptSpec.model_fields[f].annotation | None, None) for f in _FIELDS})
"""One defaults table: a subset of ConceptSpec's fields with the same types (ranges are
checked when the ConceptSpec is built, so they are declared there only)."""

_SPEC_FIX = (f"a table takes only {', '.join(_FIELDS)}, under defaults, kinds.KIND or "
             "concepts.NAME")


def current_command() -> str:
    """This process's command line, shell-quoted, for a manifest's ``command``."""
    return shlex.join(sys.argv)


# -- concept defaults ------------------------------------------------------------------------


class ConceptsSpec(BaseModel):
    """Steering defaults: global ``defaults``, then per-kind, then per-concept overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: ConceptDefaults = ConceptDefaults()  # type: ignore[valid-type]
    kinds: dict[str, ConceptDefaults] = {}  # type: ignore[valid-type]
    concepts: dict[str, ConceptDefaults] = {}  # type: ignore[valid-type]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "concepts spec") -> ConceptsSpec:
        """Parse {"defaults": {...}, "kinds": {kind: {...}}, "concepts": {name: {...}}}."""
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise ValueError(explain(e, where, _SPEC_FIX)) from None

    @classmethod
    def load(cls, path: str | Path) -> ConceptsSpec:
        """Read a .toml or .json spec file."""
        path = Path(path)
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(path.read_text())
            else:
                data = json.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot parse ({e})") from e
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a table/object at the top level")
        return cls.from_dict(data, str(path))

    def with_defaults(self, **overrides: Any) -> ConceptsSpec:
        """A copy whose global defaults take the given non-None values (CLI options)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return ConceptsSpec.from_dict({**self.model_dump(exclude_none=True),
                                       "defaults": {**_set(self.defaults), **given}}, "options")

    def spec_for(self, name: str, kind: str, base: Mapping[str, Any] | None = None
                 ) -> ConceptSpec:
        """The ConceptSpec of one concept; ``base`` replaces the built-in defaults."""
        merged = {**BUILTIN_DEFAULTS, **(base or {}), **_set(self.defaults),
                  **_set(self.kinds.get(kind)), **_set(self.concepts.get(name))}
        try:
            return ConceptSpec.model_validate({"name": name, "kind": kind, **merged})
        except ValidationError as e:
            raise ValueError(explain(e, f"concepts spec (concept {name!r})")) from None

    def resolve(self, names: Sequence[str], kinds: Mapping[str, str]) -> list[ConceptSpec]:
        """Specs for ``names`` (in order); spec entries naming unknown concepts/kinds fail."""
        stray = sorted(set(self.concepts) - set(names))
        stray_kinds = sorted(set(self.kinds) - {kinds[n] for n in names})
        if stray or stray_kinds:
            raise ValueError(f"concepts spec names concept(s) {stray} / kind(s) {stray_kinds} "
                             f"not in the tables (concepts: {', '.join(names)})")
        return [self.spec_for(n, kinds[n]) for n in names]


def _set(table: BaseModel | None) -> dict[str, Any]:
    """The fields a defaults table sets (None: the table is absent)."""
    return {} if table is None else table.model_dump(exclude_none=True)


# -- export ----------------------------------------------------------------------------------


def export_bundle(
    sae_dir: str | Path, tables_path: str | Path, store_dir: str | Path, out: str | Path,
    spec: ConceptsSpec | None = None, command: str | None = None,
    recipe: SteeringRecipe = GATED_REPLACE, closed_kinds: Sequence[str] = (),
    storage_dtype: torch.dtype | None = torch.float16,
) -> SteeringBundle:
    """Write a bundle from an SAE folder, importance tables and the store they came from.

    The store's manifest gives the pipeline fingerprint, scheduler and hook point; its prompt
    file gives each concept's kind. New bundles use this project's recipe (gated
    replacement, docs/steering-method.md); `steer eval --write-defaults` tunes its defaults.
    ``closed_kinds`` are kinds in which every image holds exactly one concept (the manifest's
    ``closed_kinds``: suppressing all of such a kind is refused). The SAE and the tables are
    stored in ``storage_dtype`` (float16 by default: half the size, loaded back to float32;
    on the toy bundle the features chosen at the 95th–99th percentile change by ≤ 0.06 % and
    the means by 2e-4 relative; None keeps the SAE's dtype and float32 tables).
    """
    sae = TopKSAE.from_pretrained(sae_dir)
    tables = ImportanceTables.load(tables_path)
    store = ActivationStore.open(store_dir)
    m = store.manifest
    if sae.d_in != m.d_in:
        raise ValueError(f"the SAE in {sae_dir} reads d_in={sae.d_in} but store {store_dir} "
                         f"holds d_in={m.d_in}; pass the SAE trained on this store's hook point")
    want_t = [m.timesteps[s] for s in m.captured_steps]
    if tables.timesteps.tolist() != want_t:
        raise ValueError(f"{tables_path} has timesteps {tables.timesteps.tolist()} but store "
                         f"{store_dir} captured {want_t}; pass the store the tables came from")
    kinds = concept_kinds(store.prompts())
    missing = [c for c in tables.concepts if c not in kinds]
    if missing:
        raise ValueError(f"{tables_path} has concept(s) {missing} that no prompt of store "
                         f"{store_dir} is labelled with; pass the store the tables came from")
    specs = (spec or ConceptsSpec()).resolve(tables.concepts, kinds)
    if storage_dtype is not None:
        sae.storage_dtype = None if storage_dtype == sae.dtype else storage_dtype
        tables.storage_dtype = None if storage_dtype == torch.float32 else storage_dtype
    bundle = SteeringBundle.create(sae, tables, specs, m.pipeline_fingerprint, m.scheduler,
                                   command or current_command(), hook_point=m.hook_point,
                                   recipe=recipe, closed_kinds=closed_kinds)
    save_bundle(bundle, out)
    return bundle


def save_bundle(bundle: SteeringBundle, out: str | Path) -> None:
    """Save into a fresh sibling folder, then swap it in: ``out`` is never half-written.

    ``out`` may be missing, empty, or an existing bundle (replaced); anything else is refused.
    """
    out = Path(out)
    if out.exists() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a steering bundle; choose another --out")
    tmp = out.with_name(out.name + ".partial")
    old = out.with_name(out.name + ".old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    bundle.save(tmp)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# -- add a concept ---------------------------------------------------------------------------


def add_concept(
    bundle_dir: str | Path, pipe: Any, prompts: str | Path | Sequence[PromptRecord],
    out: str | Path, concept: str, kind: str, steps: int | None = None,
    guidance: float = 7.5, size: int | None = None, batch_size: int = 4,
    spec: ConceptsSpec | None = None, command: str | None = None,
) -> SteeringBundle:
    """Add ``concept`` (of ``kind``) to a bundle from a few prompts, without retraining.

    Prompts labelled {kind: concept} give μ_c (if no prompt has a ``kind`` label, all of them
    do); prompts labelled with another concept of ``kind`` give μ_¬c. Without such prompts,
    μ_¬c is approximated by the mean of the bundle's μ over its ``kind`` concepts (exact when
    every concept had equally many prompts). Existing concepts' rows are kept as they are.
    """
    from steering.pipeline import ensure_ddim, pipeline_default_size

    bundle = SteeringBundle.load(bundle_dir)
    m = bundle.manifest
    bundle.check_fingerprint(pipeline_fingerprint(pipe.unet, m.hook_point))
    if concept in bundle.concept_names:
        raise BundleError(f"concept {concept!r} is already in {bundle_dir}; pick a new name")
    records = load_prompts(prompts) if isinstance(prompts, str | Path) else list(prompts)
    pos, neg = split_prompts(records, concept, kind)
    ensure_ddim(pipe)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # pipe's stays as is
    n_steps, captured = match_schedule(scheduler, bundle.tables.timesteps.tolist(), steps)
    size = size or pipeline_default_size(pipe)
    sums = _prompt_sums(bundle.sae, pipe, pos + neg, len(pos), n_steps, captured, guidance,
                        size, batch_size, m.hook_point)
    mu_c = sums[0] / len(pos)
    if neg:
        mu_not = sums[1] / len(neg)
    else:
        same = bundle.concepts_of_kind(kind)
        if not same:
            raise ValueError(
                f"no prompt is labelled with another {kind!r} concept and {bundle_dir} has no "
                f"{kind!r} concepts, so μ_¬c is undefined; add prompts labelled "
                f'{{"{kind}": "<other concept>"}} to the prompt file')
        idx = [bundle.tables.concept_index(c) for c in same]
        mu_not = bundle.tables.means[idx].double().mean(dim=0)
    t = bundle.tables
    tables = ImportanceTables(
        concepts=[*t.concepts, concept],
        scores=torch.cat([t.scores, score_from_means(mu_c, mu_not).float()[None]]),
        means=torch.cat([t.means, mu_c.float()[None]]),
        timesteps=t.timesteps,
    )
    same_kind = [c for c in m.concepts if c.kind == kind]
    base = ({"default_gamma": same_kind[0].default_gamma,
             "gamma_range": same_kind[0].gamma_range,
             "default_percentile": same_kind[0].default_percentile} if same_kind else None)
    new_spec = (spec or ConceptsSpec()).spec_for(concept, kind, base)
    new = SteeringBundle.create(
        bundle.sae, tables, [*m.concepts, new_spec], m.pipeline_fingerprint, m.scheduler,
        f"{m.command} && {command or current_command()}", hook_point=m.hook_point,
        recipe=m.recipe, closed_kinds=m.closed_kinds)
    save_bundle(new, out)
    return new


def split_prompts(records: Sequence[PromptRecord], concept: str, kind: str
                  ) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(prompts of ``concept``, prompts of another concept of ``kind``)."""
    labelled = [r for r in records if kind in r.concepts]
    if not labelled:
        return list(records), []
    pos = [r for r in labelled if r.concepts[kind] == concept]
    neg = [r for r in labelled if r.concepts[kind] != concept]
    if not pos:
        raise ValueError(f"no prompt is labelled {{\"{kind}\": \"{concept}\"}}; label the "
                         f"prompts of {concept!r} (or drop every {kind!r} label)")
    return pos, neg


def match_schedule(scheduler: Any, timesteps: Sequence[int], steps: int | None
                   ) -> tuple[int, list[int]]:
    """(step count, captured step indices) whose DDIM schedule holds exactly ``timesteps``.

    Tries ``steps`` if given, else the smallest count ≥ len(timesteps) that fits.
    """
    last = int(scheduler.config.num_train_timesteps)
    candidates = [steps] if steps is not None else range(max(1, len(timesteps)), last + 1)
    for n in candidates:
        scheduler.set_timesteps(n)
        schedule = [int(v) for v in scheduler.timesteps]
        if all(t in schedule for t in timesteps):
            return n, [schedule.index(t) for t in timesteps]
    raise ValueError(
        f"the bundle's tables are for timesteps {list(timesteps)}, which "
        + (f"a {steps}-step schedule does not contain; pass the --steps used for collection"
           if steps is not None else "no DDIM schedule of this pipeline's scheduler contains"))


@torch.no_grad()
def _prompt_sums(sae: TopKSAE, pipe: Any, prompts: list[PromptRecord], n_pos: int,
                 n_steps: int, captured: list[int], guidance: float, size: int,
                 batch_size: int, hook_point: str) -> Tensor:
    """[2, S, n]: sums over prompts[:n_pos] / prompts[n_pos:] of per-step token-mean z."""
    from training.activations.collect import capture_activations

    s = len(captured)
    sums = torch.zeros(2 * s, sae.num_latents, dtype=torch.float64, device=sae.device)
    first = {r.id for r in prompts[:n_pos]}
    if len(first) != n_pos:
        raise ValueError("prompt ids must be unique (ids are prompt-file line numbers)")
    for record, rows in capture_activations(pipe, prompts, n_steps, guidance, size, size,
                                            captured, batch_size, hook_point=hook_point):
        tokens = rows.shape[0] // s
        step = torch.arange(s).repeat_interleave(tokens)
        slots = (step + (0 if record.id in first else s))[:, None]
        weights = torch.full((rows.shape[0],), 1.0 / tokens, dtype=torch.float64)
        accumulate_codes(sae, rows.float(), slots, weights, sums)
    return sums.view(2, s, -1).cpu()
