"""Operations endpoints: ``/healthz`` (the process answers), ``/readyz`` (Redis reachable and a
worker has loaded this bundle) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.deps import Runtime, RuntimeDep
from service.errors import documented, retry_after
from service.worker_registry import fresh_within, live_workers

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    status: str = "ready"
    bundle_sha256: str | None = Field(None, description="The bundle this gateway validates for")
    policy_sha256: str | None = Field(None, description="The content-policy file it enforces")
    workers: int = Field(..., description="Workers alive with this bundle and policy file")
    workers_other_bundle: int = Field(0, description="Workers alive with another bundle or "
                                      "policy file (their jobs would not match this gateway)")


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """200 while the process serves requests (touches nothing else)."""
    return Health()


def readiness(rt: Runtime) -> Readiness:
    """Redis answers and ≥ 1 worker that beat recently runs this gateway's bundle and policy
    file, else a 503 (a worker with another policy file would enforce another policy)."""
    conn = rt.conn
    conn.ping()
    workers = live_workers(conn, fresh_within(rt.settings.worker_heartbeat_s))
    policy = rt.policies.sha256 if rt.policies is not None else None
    ours = sum(1 for w in workers if w.get("bundle_sha256") == rt.catalog.bundle_sha256
               and w.get("policy_sha256") == policy)
    if not ours:
        raise retry_after(503, f"no worker has loaded this gateway's bundle "
                          f"({rt.catalog.bundle_sha256}) and policy file ({policy}); "
                          f"{len(workers)} other worker(s) alive. Start one with `steer worker` "
                          "on the same bundle and STEER_POLICY_FILE", 5)
    return Readiness(bundle_sha256=rt.catalog.bundle_sha256, policy_sha256=policy,
                     workers=ours, workers_other_bundle=len(workers) - ours)


@router.get("/readyz", response_model=Readiness, summary="Readiness",
            responses=documented(503, e503="Redis is unreachable, or no worker has loaded "
                                 "the bundle; see Retry-After"))
async def readyz(rt: RuntimeDep) -> Readiness:
    """Ready to take jobs: Redis reachable and a live worker with the same bundle."""
    return await run_in_threadpool(readiness, rt)


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {"text/plain": {}},
                             "description": "Prometheus text exposition"}})
async def metrics(request: Request) -> Response:
    """Requests, queue depth, jobs by state, live workers, step and generation latency."""
    body, content_type = await run_in_threadpool(request.app.state.metrics.render)
    return Response(body, media_type=content_type)
