"""The Redis data model shared by gateway and workers: jobs, their state, flags and owners.

A generation is one RQ job whose id is the generation id (a UUID4). What each side writes:

- gateway: the job (payload = the validated request, ``meta`` = owner, batch, request id,
  webhook, content policy name), the per-key active set, the cancel flag; it never writes
  ``meta`` after enqueue;
- worker: ``meta['progress']`` / ``meta['started_at']`` / ``meta['worker']`` through
  :func:`update_meta` (a WATCH transaction: other fields are never clobbered), and the job's
  return value, a :class:`JobOutcome` dict.

The API status is derived here, in :func:`read_generation`, from RQ's status + the outcome.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

PREFIX = "steer:"
RUN_GENERATION = "service.runner.run_generation"  # the job function (worker side)


def cancel_key(job_id: str) -> str:
    """Set (any value) to ask the worker to stop the job between denoising steps."""
    return f"{PREFIX}cancel:{job_id}"


def cancel_channel(job_id: str) -> str:
    """Pub/sub channel on which a cancel is announced to the worker running the job."""
    return f"{PREFIX}cancel-events:{job_id}"


RESERVED_PREFIX = f"{PREFIX}reserved:"  # + job id: a per-key slot taken by admission


def reserved_key(job_id: str) -> str:
    """Marker of a per-key slot admission reserved for ``job_id`` before its enqueue."""
    return f"{RESERVED_PREFIX}{job_id}"


def active_key(owner: str) -> str:
    """SET of an API key's queued + running job ids (the per-key cap)."""
    return f"{PREFIX}active:{owner}"


def batch_key(batch_id: str) -> str:
    """JSON {"ids": [...], "owner": ..., "created_at": ...} of a batch."""
    return f"{PREFIX}batch:{batch_id}"


def new_id() -> str:
    """A fresh generation / batch / image id (UUID4, the only ids the API accepts)."""
    return str(uuid.uuid4())


def valid_id(text: str) -> bool:
    """True for a canonical UUID string (ids from clients never reach Redis or disk otherwise)."""
    try:
        return str(uuid.UUID(text)) == text
    except (ValueError, AttributeError, TypeError):
        return False


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class JobOutcome:
    """What the job function returns (RQ stores it as the job's result)."""

    status: str                                  # succeeded | canceled | failed
    images: list[dict[str, Any]] = field(default_factory=list)   # [{"id", "seed"}]
    seeds: list[int] = field(default_factory=list)
    detection: list[dict[str, float]] = field(default_factory=list)  # before the edits
    parameters: dict[str, Any] = field(default_factory=dict)     # after defaults / policy
    provenance: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_code: str | None = None                # content_policy_violation when refused
    policy: dict[str, Any] | None = None         # the content policy's report (enforce.py)
    detection_after: list[dict[str, float]] = field(default_factory=list)  # final activations

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationRecord:
    """A job as the API reports it (see service.schemas.Generation)."""

    id: str
    status: str
    owner: str | None
    batch_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_position: int | None
    progress: dict[str, int] | None
    outcome: JobOutcome | None
    error: str | None
    payload: dict[str, Any]
    webhook: str | None


def queues(conn: redis.Redis, generations: str, webhooks: str) -> tuple[Queue, Queue]:
    """The generation queue and the webhook-delivery queue on ``conn``."""
    return Queue(generations, connection=conn), Queue(webhooks, connection=conn)


def enqueue_generation(queue: Queue, payload: dict[str, Any], *, job_id: str,
                       owner: str | None, request_id: str | None, batch_id: str | None,
                       webhook: str | None, timeout_s: int, retention_s: int,
                       pipeline: redis.client.Pipeline | None = None,
                       policy: str | None = None, at_front: bool = False) -> Job:
    """Enqueue one generation (``at_front``: next for the workers); a worker that dies
    mid-job gets it retried once elsewhere. ``policy`` is the content policy the worker
    applies (None: the worker's default)."""
    meta = {"owner": owner, "request_id": request_id, "batch_id": batch_id,
            "webhook": webhook, "created_at": utcnow().isoformat(), "policy": policy}
    job = queue.enqueue_call(
        RUN_GENERATION, kwargs={"payload": payload}, job_id=job_id, timeout=timeout_s,
        result_ttl=retention_s, failure_ttl=retention_s, ttl=retention_s, meta=meta,
        retry=Retry(max=1), pipeline=pipeline, at_front=at_front)
    if owner is not None:
        conn = pipeline if pipeline is not None else queue.connection
        conn.sadd(active_key(owner), job_id)
        conn.delete(reserved_key(job_id))  # admission's marker: the job exists now
    return job


def update_meta(conn: redis.Redis, job_id: str, **fields: Any) -> None:
    """Set ``fields`` in a job's meta without clobbering others (optimistic WATCH/MULTI)."""
    from rq.serializers import resolve_serializer

    key = Job.key_for(job_id)
    serializer = resolve_serializer(None)
    with conn.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                if not pipe.exists(key):  # deleted (DELETE /v1/generations): do not recreate
                    pipe.unwatch()
                    return
                raw = pipe.hget(key, "meta")
                meta = serializer.loads(raw) if raw else {}
                meta.update(fields)
                pipe.multi()
                pipe.hset(key, "meta", serializer.dumps(meta))
                pipe.execute()
                return
            except redis.WatchError:
                continue


def request_cancel(conn: redis.Redis, job_id: str, ttl_s: int) -> None:
    """Flag the job for cancellation and announce it (one round trip): a running job's
    worker hears the announcement at once; the flag is what a job not started yet, or a
    worker that missed the announcement, finds (service/runner.py: cancel_watch)."""
    pipe = conn.pipeline(transaction=False)
    pipe.set(cancel_key(job_id), b"1", ex=max(1, ttl_s))
    pipe.publish(cancel_channel(job_id), b"1")
    pipe.execute()


def cancel_requested(conn: redis.Redis, job_id: str) -> bool:
    """Whether the job's cancel flag is set."""
    return bool(conn.exists(cancel_key(job_id)))


def release_owner_slot(conn: redis.Redis, job: Job) -> None:
    """Drop a finished job from its owner's active set (the per-key cap)."""
    owner = (job.meta or {}).get("owner")
    if owner:
        conn.srem(active_key(owner), job.id)


def active_count(conn: redis.Redis, queue: Queue, owner: str) -> int:
    """Queued + running jobs of ``owner``, pruning ids whose jobs ended or expired."""
    ids = [i.decode() if isinstance(i, bytes) else i for i in conn.smembers(active_key(owner))]
    if not ids:
        return 0
    # markers first: the enqueue deletes a marker in the same transaction that writes the job,
    # so a marker gone by now means the job is readable below
    reserved = conn.mget([reserved_key(i) for i in ids])
    jobs = Job.fetch_many(ids, connection=conn)
    live, stale = 0, []
    for job_id, job, held in zip(ids, jobs, reserved, strict=True):
        status = job.get_status(refresh=False) if job is not None else None
        if status in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED,
                      JobStatus.DEFERRED) or (job is None and held is not None):
            live += 1  # (a slot admission reserved for a job being enqueued)
        else:
            stale.append(job_id)
    if stale:
        conn.srem(active_key(owner), *stale)
    return live


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromisoformat(str(value))


def _failure_reason(job: Job) -> str:
    """The last line of a failed job's traceback, or what RQ recorded (abandoned job)."""
    result = job.latest_result()
    text = (result.exc_string if result is not None else None) or ""
    if "AbandonedJobError" in text or "abandoned" in text.lower() or "Moved to" in text:
        return ("the worker running this job stopped responding (it was retried once on "
                "another worker and failed again)")
    if "JobTimeoutException" in text:
        return f"the job exceeded its time limit ({job.timeout} s)"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "the job failed"


def reap_abandoned(queue: Queue) -> None:
    """Requeue (once) or fail the jobs of workers whose heartbeat stopped, so a dead worker's
    job is never shown as "running" (RQ's own cleanup; workers also run it periodically)."""
    StartedJobRegistry(queue=queue).cleanup()


def read_generation(queue: Queue, job_id: str, reap: bool = True) -> GenerationRecord | None:
    """The job's API view, or None when it does not exist (or its retention has passed).
    ``reap=False`` when the caller just ran :func:`reap_abandoned` (reading many jobs)."""
    conn = queue.connection
    if reap:
        reap_abandoned(queue)
    try:
        job = Job.fetch(job_id, connection=conn)
    except NoSuchJobError:
        return None
    meta = job.meta or {}
    rq_status = job.get_status(refresh=False)
    outcome: JobOutcome | None = None
    error: str | None = None
    position: int | None = None
    if rq_status in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
        status = "queued"
        position = queue.get_job_position(job_id)
    elif rq_status == JobStatus.STARTED:
        status = "running"
    elif rq_status == JobStatus.FINISHED:
        value = job.return_value(refresh=False)
        outcome = JobOutcome(**value) if isinstance(value, dict) else None
        status = outcome.status if outcome is not None else "failed"
        error = outcome.error if outcome is not None else "the job returned no result"
    elif rq_status in (JobStatus.CANCELED, JobStatus.STOPPED):
        status = "canceled"
    else:  # FAILED
        status, error = "failed", _failure_reason(job)
    return GenerationRecord(
        id=job_id, status=status, owner=meta.get("owner"), batch_id=meta.get("batch_id"),
        created_at=_parse_time(meta.get("created_at")) or _parse_time(job.created_at) or utcnow(),
        started_at=_parse_time(meta.get("started_at")),
        finished_at=_parse_time(job.ended_at) if status not in ("queued", "running") else None,
        queue_position=position, progress=meta.get("progress"), outcome=outcome, error=error,
        payload=(job.kwargs or {}).get("payload", {}), webhook=meta.get("webhook"))


def save_batch(conn: redis.Redis, batch_id: str, ids: list[str], owner: str | None,
               ttl_s: int, pipeline: redis.client.Pipeline | None = None) -> None:
    """Record a batch's job ids (kept as long as results are)."""
    value = json.dumps({"ids": ids, "owner": owner, "created_at": time.time()})
    (pipeline if pipeline is not None else conn).set(batch_key(batch_id), value, ex=ttl_s)


def load_batch(conn: redis.Redis, batch_id: str) -> dict[str, Any] | None:
    raw = conn.get(batch_key(batch_id))
    return json.loads(raw) if raw else None
