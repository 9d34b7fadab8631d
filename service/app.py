"""The gateway: ``create_app(settings)`` builds the FastAPI app (routes, error handlers,
middleware); its lifespan opens the Redis clients, reads the bundle's concepts and opens the
image store.

Redis being down is never cached: redis-py reconnects on the next command, every request that
needs Redis answers 503 + Retry-After until then (service.errors), and nothing is built from a
failed connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import redis
import redis.asyncio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from rq import Queue

from service.catalog import load_catalog
from service.deps import Runtime
from service.errors import install_error_handlers
from service.images import ImageStore
from service.metrics import GatewayMetrics
from service.middleware import (
    REQUEST_ID_HEADER,
    BodyLimitMiddleware,
    RequestContextMiddleware,
)
from service.policy import load_checked
from service.result_waiter import ResultWaiter
from service.routes import batches, concepts, generations, health, images, policy, web
from service.settings import Settings

DESCRIPTION = """\
Generate images with a Stable-Diffusion-1.x model steered by a sparse autoencoder: suppress
or amplify named concepts (GET /v1/concepts) while denoising.

Jobs are queued (202) and polled (`links.self`), or awaited with `Prefer: wait=N`. Every error
is an `ErrorDetail` with the `field` at fault. With STEER_AUTH_ENABLED, send
`Authorization: Bearer <key>`; 429 and 503 answers carry `Retry-After`.
"""

# Fail fast while Redis is down (a 503 in well under a second), recover on the next request.
REDIS_OPTIONS = dict(socket_connect_timeout=2.0, socket_timeout=10.0, health_check_interval=30)
RETRIES, BACKOFF = 2, dict(base=0.01, cap=0.1)
POOL_WAIT_S = 5.0


def _version() -> str:
    try:
        return version("sae-steering")
    except PackageNotFoundError:
        return "0.0.0"


def open_runtime(settings: Settings) -> Runtime:
    """Connect (lazily: no Redis command is sent) and load what the routes share."""
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set: `steer serve` starts an embedded server "
                           "for you; to run the API alone, point REDIS_URL at Redis")
    # blocking pools: a request waits for a free connection (up to POOL_WAIT_S) rather than
    # failing at once when the pool is busy
    pool = dict(max_connections=settings.redis_max_connections, timeout=POOL_WAIT_S)
    conn = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        settings.redis_url, **pool, **REDIS_OPTIONS),
        retry=Retry(ExponentialWithJitterBackoff(**BACKOFF), RETRIES))
    aconn = redis.asyncio.Redis(connection_pool=redis.asyncio.BlockingConnectionPool.from_url(
        settings.redis_url, **pool, **REDIS_OPTIONS),
        retry=AsyncRetry(ExponentialWithJitterBackoff(**BACKOFF), RETRIES))
    listener = redis.asyncio.Redis.from_url(settings.redis_url, max_connections=1,
                                            **REDIS_OPTIONS)
    catalog = load_catalog(settings.bundle_dir)
    return Runtime(settings=settings, conn=conn, aconn=aconn,
                   queue=Queue(settings.queue_name, connection=conn), catalog=catalog,
                   images=ImageStore.from_settings(settings),
                   waiter=ResultWaiter(listener, settings.wait_max_per_key),
                   policies=load_checked(settings.policy_file, catalog.concepts))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway app for ``settings`` (default: from the environment)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = open_runtime(settings)
        app.state.runtime = runtime
        try:
            yield
        finally:
            app.state.runtime = None
            await runtime.waiter.close()
            await runtime.aconn.aclose()
            runtime.conn.close()

    app = FastAPI(title="sae-steering", version=_version(), description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.runtime = None
    app.state.metrics = GatewayMetrics(
        lambda: app.state.runtime.queue if app.state.runtime is not None else None,
        settings.worker_heartbeat_s,
        lambda: app.state.runtime.waiter.waiting() if app.state.runtime is not None else 0)
    install_error_handlers(app)
    for module in (generations, batches, images, concepts, policy, health, web):
        app.include_router(module.router)
    web.mount_static(app)
    # add_middleware wraps: the last added runs first (request context, CORS, body limit).
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Prefer",
                           REQUEST_ID_HEADER],
            expose_headers=["Location", "Retry-After", "Preference-Applied", REQUEST_ID_HEADER])
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    return app
