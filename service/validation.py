"""Checks of a request against this deployment's limits and the bundle's concepts.

The schemas (service.schemas) hold the fixed shape; the bounds here come from Settings and the
bundle, so they are checked after parsing. Every failure is a 422 naming the field, e.g.
``requests[2].concepts[0].gamma``.
"""

from __future__ import annotations

from service.catalog import Catalog
from service.errors import ApiError
from service.job_limits import JobLimits
from service.schemas import SEED_LIMIT, BatchCreate, GenerationCreate
from service.settings import Settings
from service.webhook_guard import WebhookRefused, check_url
from steering.edits import (
    EditError,
    ResolvedEdit,
    check_closed_kinds,
    resolve_edits,
    suppressed_names,
)
from steering.swap_chains import check_swap_cycles

_EDIT_FIELDS = {"concept": "name", "gamma": "gamma", "percentile": "percentile"}


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, f"{field}: {message}", field=field)


def check_generation(req: GenerationCreate, settings: Settings, catalog: Catalog,
                     at: str = "") -> list[ResolvedEdit]:
    """Raise a 422 for the first field out of bounds; return the edits with defaults filled."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name)
        if text is not None and len(text) > settings.max_prompt_chars:
            raise _invalid(at + name, f"{len(text)} characters; at most "
                           f"{settings.max_prompt_chars} are accepted")
    if not 1 <= req.steps <= settings.max_steps:
        raise _invalid(at + "steps", f"{req.steps} is outside [1, {settings.max_steps}]")
    limits = JobLimits.from_settings(settings)
    for name in ("width", "height"):
        size = getattr(req, name)
        if size is None:
            continue
        if size % 8:
            raise _invalid(at + name, f"{size} is not a multiple of 8 (try {size - size % 8 or 8})")
        if not settings.min_size <= size <= limits.max_size:
            raise _invalid(at + name, f"{size} is outside [{settings.min_size}, "
                           f"{limits.max_size}] (this model's native side is "
                           f"{limits.native})")
    if not 1 <= req.n_images <= settings.max_n_images:
        raise _invalid(at + "n_images", f"{req.n_images} is outside [1, {settings.max_n_images}]")
    cost = limits.cost(req.width, req.height, req.steps, req.n_images)
    if cost > limits.max_cost:
        raise _invalid(at + "steps", f"width × height × steps × n_images = {cost:,} pixel-steps "
                       f"is over this deployment's budget of {limits.max_cost:,} per job "
                       "(STEER_MAX_JOB_COST); ask for fewer steps or images, or a smaller size")
    if req.seed is not None and req.seed + req.n_images > SEED_LIMIT:
        raise _invalid(at + "seed", f"image i uses seed + i, and {req.seed} + "
                       f"{req.n_images - 1} passes {SEED_LIMIT - 1}: use a seed ≤ "
                       f"{SEED_LIMIT - req.n_images}")
    check_webhook(req.webhook, settings, at + "webhook")
    first: dict[str, int] = {}
    for i, edit in enumerate(req.concepts):
        if edit.name in first:
            raise _invalid(f"{at}concepts[{i}].name", f"{edit.name!r} is already edited by "
                           f"concepts[{first[edit.name]}]; name each concept once (one "
                           "direction, one γ)")
        first[edit.name] = i
    resolved = []
    for i, edit in enumerate(req.concepts):
        try:
            resolved += resolve_edits([edit.to_edit()], catalog.concepts)
        except EditError as exc:
            field = f"{at}concepts[{i}].{_EDIT_FIELDS.get(exc.field, exc.field)}"
            raise _invalid(field, str(exc)) from None
    if catalog.manifest is not None:
        try:
            suppressed = suppressed_names(resolved)
            check_closed_kinds(suppressed, catalog.manifest)
            check_swap_cycles(suppressed, catalog.anchors)
        except EditError as exc:
            raise _invalid(at + "concepts", str(exc)) from None
    return resolved


def check_batch(batch: BatchCreate, settings: Settings, catalog: Catalog) -> None:
    """The batch size limit, then every request as :func:`check_generation` does."""
    if len(batch.requests) > settings.max_batch_items:
        raise _invalid("requests", f"{len(batch.requests)} requests; at most "
                       f"{settings.max_batch_items} per batch (split it)")
    check_webhook(batch.webhook, settings, "webhook")
    for i, req in enumerate(batch.requests):
        check_generation(req, settings, catalog, at=f"requests[{i}].")


def check_webhook(url: object | None, settings: Settings, field: str) -> None:
    """422 for a webhook aimed at a private or loopback address (service.webhook_guard)."""
    if url is None:
        return
    try:
        check_url(str(url), settings.webhook_allowed)
    except WebhookRefused as exc:
        raise _invalid(field, str(exc)) from None
