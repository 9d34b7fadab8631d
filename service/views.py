"""Job records (service.jobstore) → the API's response models (service.schemas); the gateway's
routes and the webhook deliveries (service.webhooks) show a job the same way."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from service.images import ImageStore
from service.jobstore import GenerationRecord
from service.schemas import Batch, Generation, ImageOut, Links, PolicyReport, Progress, Timings

TERMINAL = frozenset({"succeeded", "failed", "canceled"})


def generation_links(base: str, job_id: str) -> Links:
    """Absolute links of a generation (``base`` has no trailing slash)."""
    self_url = f"{base}/v1/generations/{job_id}"
    return Links(self=self_url, cancel=f"{self_url}/cancel")


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 6) if start and end else None


def _requested_seeds(payload: dict) -> list[int]:
    """Seeds a queued job will use (the gateway fills a missing seed at submission)."""
    seed = payload.get("seed")
    return [] if seed is None else [seed + i for i in range(int(payload.get("n_images", 1)))]


def generation_view(record: GenerationRecord, images: ImageStore, base: str = "") -> Generation:
    """The API view of one job; links start with ``base`` (no trailing slash; "" = relative)
    and image links are signed for ``images.url_ttl_s``."""
    outcome = record.outcome
    timings = Timings(
        created_at=record.created_at, started_at=record.started_at,
        finished_at=record.finished_at,
        queued_s=_seconds(record.created_at, record.started_at),
        run_s=_seconds(record.started_at, record.finished_at),
        generate_s=outcome.timings.get("generate_s") if outcome else None)
    progress = record.progress if record.status != "queued" else None
    return Generation(
        id=record.id, status=record.status,  # type: ignore[arg-type]
        queue_position=record.queue_position,
        progress=Progress(**progress) if progress else None,
        timings=timings,
        seeds=(outcome.seeds if outcome and outcome.seeds else _requested_seeds(record.payload)),
        parameters=(outcome.parameters if outcome and outcome.parameters else record.payload),
        provenance=outcome.provenance if outcome else {},
        detection=outcome.detection if outcome else [],
        detection_after=outcome.detection_after if outcome else [],
        images=[ImageOut(id=im["id"], seed=im["seed"], url=images.signed_url(im["id"], base))
                for im in (outcome.images if outcome else [])],
        error=record.error, error_code=outcome.error_code if outcome else None,
        policy=PolicyReport.model_validate(outcome.policy) if outcome and outcome.policy
        else None,
        batch_id=record.batch_id, links=generation_links(base, record.id))


def batch_status(statuses: list[str]) -> str:
    """queued / running while any job is unfinished; the common end state, else "partial"."""
    if not statuses:
        return "canceled"
    if all(s == "queued" for s in statuses):
        return "queued"
    if any(s not in TERMINAL for s in statuses):
        return "running"
    first = statuses[0]
    return first if all(s == first for s in statuses) else "partial"


def batch_view(batch_id: str, ids: list[str], records: list[GenerationRecord | None],
               images: ImageStore, base: str = "") -> Batch:
    """A batch: its jobs in submission order (deleted or expired ones counted as "deleted")."""
    found = [r for r in records if r is not None]
    counts = Counter(r.status for r in found)
    if len(found) < len(ids):
        counts["deleted"] = len(ids) - len(found)
    return Batch(id=batch_id, status=batch_status([r.status for r in found]),  # type: ignore
                 counts=dict(sorted(counts.items())),
                 generations=[generation_view(r, images, base) for r in found])
