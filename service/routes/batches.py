"""``/v1/batches``: many generation requests in one call, each its own job; polled as one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from service import idempotency, jobstore
from service.deps import OwnerDep, Runtime, RuntimeDep, visible_to
from service.errors import REDIS_DOWN, ApiError, documented
from service.ratelimit import admit
from service.routes.generations import IdempotencyHeader, enqueue_all, log_submission
from service.schemas import Batch, BatchCreate
from service.validation import check_batch
from service.views import batch_view

router = APIRouter(prefix="/v1", tags=["batches"])
POLL_CACHE_S = 1.0  # polls of one batch within this long share one read


def _stored_batch(rt: Runtime, batch_id: str) -> tuple[str, dict[str, Any]] | None:
    batch = jobstore.load_batch(rt.conn, batch_id)
    return None if batch is None else (batch_id, batch)


def _view(rt: Runtime, batch_id: str, batch: dict[str, Any], base: str) -> Batch:
    jobstore.reap_abandoned(rt.queue)  # once for the whole batch, not once per job
    records = [jobstore.read_generation(rt.queue, job_id, reap=False) for job_id in batch["ids"]]
    return batch_view(batch_id, batch["ids"], records, rt.images, base)


class RecentViews:
    """Batch views made in the last ``ttl_s`` seconds, by (batch id, base URL): a batch of
    100 jobs costs hundreds of Redis round trips to read, and clients poll it in a loop, so
    polls within the same second share one read (bounded: the oldest entries go first)."""

    def __init__(self, ttl_s: float = POLL_CACHE_S, size: int = 256) -> None:
        self.ttl_s, self.size = ttl_s, size
        self._views: dict[tuple[str, str], tuple[float, Batch]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], make: Callable[[], Batch]) -> Batch:
        """The view under ``key`` if recent enough, else ``make()`` (kept)."""
        now = time.monotonic()
        with self._lock:
            hit = self._views.get(key)
            if hit is not None and now - hit[0] < self.ttl_s:
                return hit[1]
        view = make()
        with self._lock:
            self._views[key] = (now, view)
            while len(self._views) > self.size:
                del self._views[next(iter(self._views))]
        return view


RECENT = RecentViews()


def submit_batch(rt: Runtime, body: BatchCreate, owner: str | None, idem_key: str | None,
                 base: str) -> tuple[Batch, bool]:
    """Enqueue every request of the batch in one transaction: (batch view, created)."""
    conn, settings = rt.conn, rt.settings
    batch_id = jobstore.new_id()
    fp = idempotency.fingerprint("batch", body) if idem_key is not None else ""
    earlier = idempotency.earlier_result(
        conn, owner, idem_key, fp, batch_id,
        settings.idempotency_ttl_s, lambda i: _stored_batch(rt, i))
    if earlier is not None:
        admit(conn, rt.queue, owner, settings)  # a replay still counts towards the rate limit
        return _view(rt, *earlier, base), False
    ids = [jobstore.new_id() for _ in body.requests]
    with idempotency.released_on_error(conn, owner, idem_key, batch_id):
        records = enqueue_all(rt, body.requests, ids, owner, batch_id,
                              str(body.webhook) if body.webhook else None)
    return batch_view(batch_id, ids, list(records), rt.images, base), True


@router.post("/batches", status_code=202, response_model=Batch, summary="Submit a batch",
             responses={200: {"model": Batch, "description": "The batch of an earlier request "
                              "with the same Idempotency-Key"},
                        **documented(401, 409, 413, 422, 429, 503)})
async def create_batch(body: BatchCreate, request: Request, response: Response,
                       rt: RuntimeDep, owner: OwnerDep,
                       idempotency_key: IdempotencyHeader = None) -> Batch:
    """Queue each request as its own job (never merged: every image stays reproducible from
    its seed). `webhook` applies to each job that names none; it fires per job."""
    check_batch(body, rt.settings, rt.catalog)
    key = idempotency.check_header(idempotency_key)
    base = rt.base_url(request)
    batch, created = await run_in_threadpool(submit_batch, rt, body, owner, key, base)
    if created:
        for gen, req in zip(batch.generations, body.requests, strict=True):
            log_submission(rt, gen.id, req, batch.id)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"{base}/v1/batches/{batch.id}"
    return batch


@router.get("/batches/{id}", response_model=Batch, summary="A batch's state",
            responses=documented(401, 404, 422, 503, e503=REDIS_DOWN))
async def get_batch(id: str, request: Request, rt: RuntimeDep, owner: OwnerDep) -> Batch:
    """Every job of the batch (as GET /v1/generations/{id} shows it) and counts by status.
    Each poll counts towards the key's rate limit; polls within a second share one read."""

    def work() -> Batch:
        batch = jobstore.load_batch(rt.conn, id) if jobstore.valid_id(id) else None
        if batch is None or not visible_to(batch.get("owner"), owner, rt.settings):
            raise ApiError(404, f"no batch {id!r} (it may have expired)", field="id")
        admit(rt.conn, rt.queue, owner, rt.settings)  # batch polls count towards the limit
        base = rt.base_url(request)
        return RECENT.get((id, base), lambda: _view(rt, id, batch, base))

    return await run_in_threadpool(work)
