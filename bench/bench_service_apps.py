"""The apps bench/service_submit.py serves with uvicorn: our gateway, a minimal endpoint and a
bare one that does nothing."""

from __future__ import annotations

import redis
from fastapi import FastAPI
from rq import Queue

from service.jobstore import enqueue_generation, new_id
from service.schemas import GenerationCreate
from service.settings import Settings


def ours() -> FastAPI:
    """The real gateway as `steer serve` runs it: JSON logs on, configured from the
    environment (auth, limits, idempotency on)."""
    from service.app import create_app
    from service.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_json)
    return create_app(settings)


def minimal() -> FastAPI:
    """Validate the body with the same model and enqueue it; nothing else."""
    settings = Settings()
    queue = Queue(settings.queue_name, connection=redis.Redis.from_url(settings.redis_url))
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/generations", status_code=202)
    def create(body: GenerationCreate) -> dict[str, str]:
        job_id = new_id()
        enqueue_generation(queue, body.model_dump(mode="json"), job_id=job_id, owner=None,
                           request_id=None, batch_id=None, webhook=None,
                           timeout_s=settings.job_timeout_s,
                           retention_s=settings.result_retention_s)
        return {"id": job_id, "status": "queued"}

    return app


def bare() -> FastAPI:
    """An endpoint that reads the body and answers 202: the floor of uvicorn + FastAPI."""
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/generations", status_code=202)
    async def create() -> dict[str, str]:
        return {"status": "queued"}

    return app


def create_bench_key(conn: redis.Redis) -> str:
    """A fresh API key for the bench (the gateway stores only its hash)."""
    from service.auth import create_key

    _, token = create_key(conn, name="bench")
    return token
