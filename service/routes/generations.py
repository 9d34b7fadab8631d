"""``/v1/generations``: submit (202, or the finished job with ``Prefer: wait=N``), read, cancel,
delete.

Submitting costs one threadpool hop and a few Redis round trips: the API key (async client),
the Idempotency-Key claim, admission (rate limit, per-key cap and queue depth in one pipeline)
and the enqueue (job, owner slot and queue position in one transaction). A waiting request
holds neither a thread nor a Redis connection: the process's result waiter
(service/result_waiter.py) wakes it when its job ends; a key may hold
``STEER_WAIT_MAX_PER_KEY`` waits at once (past that, the answer comes at once, as without
``Prefer: wait``). Every submission counts towards the key's rate limit, replays of an
Idempotency-Key included.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Header, Request, Response
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from starlette.concurrency import run_in_threadpool

from service import idempotency, jobstore
from service.deps import OwnerDep, Runtime, RuntimeDep, visible_to
from service.errors import REDIS_DOWN, ApiError, documented, retry_after
from service.jobstore import GenerationRecord
from service.logs import request_id as request_id_var
from service.ratelimit import admit, release_slots
from service.routes.policy import caller_policy
from service.schemas import Generation, GenerationCreate
from service.validation import check_generation
from service.views import TERMINAL, generation_view
from service.webhooks import enqueue_webhook

log = logging.getLogger("service.api")
router = APIRouter(prefix="/v1", tags=["generations"])

SEED_RANGE = 2**32
DELETE_WAIT_S = 10.0         # how long DELETE waits for a running job to stop

PreferHeader = Annotated[str | None, Header(
    description="`wait=N`: hold the response up to N seconds (capped by STEER_WAIT_MAX_S) "
    "and answer 200 with the finished job; otherwise 202 with the queued job")]
IdempotencyHeader = Annotated[str | None, Header(
    alias=idempotency.HEADER, description="Same key + same body → the same job (200); "
    "same key + another body → 409. Keys live STEER_IDEMPOTENCY_TTL_S.")]


def prefer_wait(prefer: str | None, cap: float) -> float | None:
    """Seconds asked for by ``Prefer: wait=N`` (RFC 7240), capped; None when not asked."""
    for token in re.split(r"[,;]", prefer or ""):
        name, _, value = token.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                continue  # an unparseable preference is ignored (RFC 7240 §2)
            return min(max(0.0, seconds), cap)
    return None


def job_payload(req: GenerationCreate) -> dict[str, Any]:
    """What the worker gets: the validated request, with a random seed filled in when none was
    given (so the seeds are known while queued and a retried job draws the same images)."""
    payload = req.model_dump(mode="json")
    if payload.get("seed") is None:
        payload["seed"] = secrets.randbelow(SEED_RANGE)
    return payload


def queued_record(job: Job, payload: dict[str, Any], position: int | None) -> GenerationRecord:
    """The record of a job just enqueued (no read-back needed)."""
    meta = job.meta
    return GenerationRecord(
        id=job.id, status="queued", owner=meta.get("owner"), batch_id=meta.get("batch_id"),
        created_at=datetime.fromisoformat(meta["created_at"]),
        started_at=None, finished_at=None, queue_position=position, progress=None,
        outcome=None, error=None, payload=payload, webhook=meta.get("webhook"))


@contextlib.contextmanager
def release_on_error(conn: redis.Redis, owner: str | None, ids: list[str]) -> Iterator[None]:
    """Give back the per-key slots admission reserved if the enqueue inside fails."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(redis.RedisError):
            release_slots(conn, owner, ids)
        raise


def enqueue_all(rt: Runtime, requests: list[GenerationCreate], ids: list[str],
                owner: str | None, batch_id: str | None = None,
                webhook: str | None = None) -> list[GenerationRecord]:
    """Admit, then enqueue one job per request in one transaction (with the batch record when
    ``batch_id`` is given); ``webhook`` applies to requests that name none. Each job carries
    the caller's content policy (its workers apply it)."""
    conn, settings = rt.conn, rt.settings
    policy, _ = caller_policy(rt, owner)
    active_before = admit(conn, rt.queue, owner, settings, job_ids=ids)
    # fairness: the first job of a key with nothing queued or running goes to the front, so
    # another key's backlog never holds it back; the rest of its jobs queue at the back
    jump = active_before == 0
    with release_on_error(conn, owner, ids), conn.pipeline() as pipe:
        enqueued = []
        for i, (job_id, req) in enumerate(zip(ids, requests, strict=True)):
            payload = job_payload(req)
            hook = str(req.webhook) if req.webhook else webhook
            enqueued.append((jobstore.enqueue_generation(
                rt.queue, payload, job_id=job_id, owner=owner, request_id=request_id_var.get(),
                batch_id=batch_id, webhook=hook, timeout_s=settings.job_timeout_s,
                retention_s=settings.result_retention_s, pipeline=pipe,
                policy=policy.name if policy is not None else None,
                at_front=jump and i == 0), payload))
        if batch_id is not None:
            jobstore.save_batch(conn, batch_id, ids, owner, settings.result_retention_s,
                                pipeline=pipe)
        pipe.llen(rt.queue.key)  # in the same MULTI: the others are the last (LPOS is O(queue))
        length = pipe.execute()[-1]
    return [queued_record(job, payload, 0 if jump and i == 0 else length - len(ids) + i)
            for i, (job, payload) in enumerate(enqueued)]


def log_submission(rt: Runtime, job_id: str, req: GenerationCreate,
                   batch_id: str | None = None) -> None:
    """One log line per queued job; the prompts only when STEER_LOG_PROMPTS is on."""
    extra: dict[str, Any] = {"job_id": job_id, "batch_id": batch_id, "steps": req.steps,
                             "n_images": req.n_images,
                             "concepts": [c.name for c in req.concepts]}
    if rt.settings.log_prompts:
        extra.update(prompt=req.prompt, negative_prompt=req.negative_prompt)
    log.info("generation queued", extra=extra)


def submit(rt: Runtime, req: GenerationCreate, owner: str | None,
           idem_key: str | None) -> tuple[GenerationRecord, bool]:
    """Enqueue ``req`` (or find the job of an earlier identical request): (record, created)."""
    conn, settings = rt.conn, rt.settings
    job_id = jobstore.new_id()
    fp = idempotency.fingerprint("generation", req) if idem_key is not None else ""
    earlier = idempotency.earlier_result(
        conn, owner, idem_key, fp, job_id,
        settings.idempotency_ttl_s, lambda i: jobstore.read_generation(rt.queue, i))
    if earlier is not None:
        admit(conn, rt.queue, owner, settings)  # a replay still counts towards the rate limit
        return earlier, False
    with idempotency.released_on_error(conn, owner, idem_key, job_id):
        return enqueue_all(rt, [req], [job_id], owner)[0], True


def read_visible(rt: Runtime, job_id: str, owner: str | None) -> GenerationRecord:
    """The job if it exists and ``owner`` may see it, else 404 (ids are UUIDs only)."""
    record = jobstore.read_generation(rt.queue, job_id) if jobstore.valid_id(job_id) else None
    if record is None or not visible_to(record.owner, owner, rt.settings):
        raise ApiError(404, f"no generation {job_id!r} (it may have expired or been deleted)",
                       field="id")
    return record


async def wait_for(rt: Runtime, job_id: str, seconds: float) -> GenerationRecord | None:
    """Re-read the job until it ends or ``seconds`` pass, woken by the process's result
    waiter (no pooled connection is held while waiting)."""
    deadline = time.monotonic() + seconds
    seen = "0-0"
    while True:
        record = await run_in_threadpool(jobstore.read_generation, rt.queue, job_id)
        remaining = deadline - time.monotonic()
        if record is None or record.status in TERMINAL or remaining <= 0:
            return record
        seen = await rt.waiter.wait(job_id, remaining, seen)


def cancel(rt: Runtime, record: GenerationRecord) -> GenerationRecord:
    """Stop a job: a queued one at once, a running one at its next step (a flag the worker
    checks); a finished one is left as it is."""
    if record.status in TERMINAL:
        return record
    conn = rt.conn
    jobstore.request_cancel(conn, record.id, rt.settings.job_timeout_s + 60)
    if record.status == "queued":
        try:
            job = Job.fetch(record.id, connection=conn)
            job.cancel()
            jobstore.release_owner_slot(conn, job)
            if record.webhook:  # the job function never runs, so it cannot enqueue it
                enqueue_webhook(conn, rt.settings, record.id, record.webhook, after_job=False)
        except (NoSuchJobError, InvalidJobOperation):
            pass  # it just ended, or a worker took it (the flag stops it)
    return jobstore.read_generation(rt.queue, record.id) or record


def remove(rt: Runtime, record: GenerationRecord) -> None:
    """Delete a finished job: its images, its RQ job and result, its flags."""
    conn = rt.conn
    if record.outcome is not None:
        rt.images.delete(im["id"] for im in record.outcome.images)
    try:
        job = Job.fetch(record.id, connection=conn)
    except NoSuchJobError:
        return
    jobstore.release_owner_slot(conn, job)
    job.delete(remove_from_queue=True)
    conn.delete(jobstore.cancel_key(record.id))


@router.post(
    "/generations", status_code=202, response_model=Generation,
    summary="Submit a generation",
    responses={200: {"model": Generation, "description": "The finished job (`Prefer: wait=N` "
                     "and it ended in time), or the job of an earlier request with the same "
                     "Idempotency-Key"},
               202: {"description": "Queued; poll `links.self`", "headers": {
                   "Location": {"description": "The job's URL", "schema": {"type": "string"}}}},
               **documented(401, 409, 413, 422, 429, 503)})
async def create_generation(req: GenerationCreate, request: Request, response: Response,
                            rt: RuntimeDep, owner: OwnerDep, prefer: PreferHeader = None,
                            idempotency_key: IdempotencyHeader = None) -> Generation:
    """Queue one generation: one UNet batch of `n_images` images, image *i* with seed + *i*.
    Concepts are validated against the loaded bundle (GET /v1/concepts)."""
    wait_s = prefer_wait(prefer, rt.settings.wait_max_s)
    check_generation(req, rt.settings, rt.catalog)
    key = idempotency.check_header(idempotency_key)
    base = rt.base_url(request)  # before enqueueing: a refused Host must not leave a job
    record, created = await run_in_threadpool(submit, rt, req, owner, key)
    if created:
        log_submission(rt, record.id, req)
    if wait_s is not None:
        async with rt.waiter.slot(owner) as allowed:
            if allowed:  # past the key's concurrent waits: answered now, preference unapplied
                response.headers["Preference-Applied"] = f"wait={wait_s:g}"
                if record.status not in TERMINAL and wait_s > 0:
                    record = await wait_for(rt, record.id, wait_s) or record
    response.status_code = 200 if (not created or record.status in TERMINAL) else 202
    view = generation_view(record, rt.images, base)
    response.headers["Location"] = view.links.self
    return view


@router.get("/generations/{id}", response_model=Generation, summary="A generation's state",
            responses=documented(401, 404, 422, 503, e503=REDIS_DOWN))
async def get_generation(id: str, request: Request, rt: RuntimeDep,
                         owner: OwnerDep) -> Generation:
    """Status, queue position (0 = next), progress (step/total), timings, seeds, detection
    scores and signed image links."""
    record = await run_in_threadpool(read_visible, rt, id, owner)
    return generation_view(record, rt.images, rt.base_url(request))


@router.post("/generations/{id}/cancel", response_model=Generation,
             summary="Cancel a generation",
             responses={200: {"description": "Canceled (it was queued), or already finished "
                              "(unchanged)"},
                        202: {"model": Generation, "description": "Running: it stops at its "
                              "next denoising step; poll `links.self`"},
                        **documented(401, 404, 422, 429, 503, e503=REDIS_DOWN)})
async def cancel_generation(id: str, request: Request, response: Response, rt: RuntimeDep,
                            owner: OwnerDep) -> Generation:
    """Stop the job between denoising steps; the worker is free for the next job at once."""

    def work() -> GenerationRecord:
        record = read_visible(rt, id, owner)
        admit(rt.conn, rt.queue, owner, rt.settings)
        return cancel(rt, record)

    record = await run_in_threadpool(work)
    response.status_code = 202 if record.status not in TERMINAL else 200
    return generation_view(record, rt.images, rt.base_url(request))


@router.delete("/generations/{id}", status_code=204, response_class=Response,
               summary="Delete a generation and its images",
               responses={204: {"description": "Deleted"},
                          **documented(401, 404, 422, 429, 503, e503=REDIS_DOWN, e409=(
                              "The job is still stopping after the cancel; retry after "
                              "Retry-After seconds"))})
async def delete_generation(id: str, rt: RuntimeDep, owner: OwnerDep) -> Response:
    """Cancel the job if it is queued or running, then remove it, its result and its images."""

    def start() -> GenerationRecord:
        record = read_visible(rt, id, owner)
        admit(rt.conn, rt.queue, owner, rt.settings)
        return cancel(rt, record)

    record: GenerationRecord | None = await run_in_threadpool(start)
    if record is not None and record.status not in TERMINAL:
        record = await wait_for(rt, id, DELETE_WAIT_S)
    if record is not None:
        if record.status not in TERMINAL:
            raise retry_after(409, "the job was asked to stop and is still running; retry "
                              "DELETE shortly", 2)
        await run_in_threadpool(remove, rt, record)
    return Response(status_code=204)
