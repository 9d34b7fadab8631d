"""FastAPI dependencies: the app's runtime (settings, Redis, queue, concepts, images) and the
caller's API key.

The lifespan (service.app) builds one :class:`Runtime` per app; these dependencies only look
it up (``async def``, no I/O, so they cost no threadpool hop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import redis
import redis.asyncio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from rq import Queue

from service.auth import authenticate_async
from service.catalog import Catalog
from service.errors import ApiError
from service.images import ImageStore
from service.policy import PolicyFile
from service.result_waiter import ResultWaiter
from service.settings import Settings


@dataclass
class Runtime:
    """What the routes share: built by the lifespan, closed when the app stops."""

    settings: Settings
    conn: redis.Redis                 # sync client (RQ, admission), used in the threadpool
    aconn: redis.asyncio.Redis        # async client (API keys, waits for results)
    queue: Queue
    catalog: Catalog
    images: ImageStore
    waiter: ResultWaiter              # wakes `Prefer: wait` requests (its own connection)
    policies: PolicyFile | None = None  # the content-safety policy file (None: no policy)

    def base_url(self, request: Request) -> str:
        """Where links point: ``settings.public_url``, else the request's own base URL when
        its host is one of ``settings.allowed_hosts`` (else 400: the Host header is the
        client's to choose, and would be reflected into Location and every link)."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        allowed = self.settings.allowed_hosts
        if "*" not in allowed and (request.url.hostname or "").strip("[]") not in allowed:
            raise ApiError(400, "this request's Host header is not one the service answers "
                           "for; the operator sets STEER_PUBLIC_URL to the URL clients use "
                           "(links are built from it) or adds the host to "
                           "STEER_ALLOWED_HOSTS", field="Host")
        return str(request.base_url).rstrip("/")


async def get_runtime(request: Request) -> Runtime:
    """The app's Runtime (exists once the lifespan has started)."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise RuntimeError("the app's lifespan has not run: serve it with uvicorn, or use "
                           "`with TestClient(app) as client:` in tests")
    return runtime


bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                    description="An API key from `steer keys create`, sent as "
                    "`Authorization: Bearer steer_…`; required when STEER_AUTH_ENABLED is true.")


async def current_key(
    request: Request,
    runtime: Annotated[Runtime, Depends(get_runtime)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str | None:
    """The caller's key id (job owner); None when auth is off; 401 when missing or invalid."""
    if not runtime.settings.auth_enabled:
        return None
    if credentials is None:
        raise ApiError(401, "missing API key: send `Authorization: Bearer <key>` (an operator "
                       "creates keys with `steer keys create`)",
                       headers={"WWW-Authenticate": "Bearer"})
    key_id = await authenticate_async(runtime.aconn, credentials.credentials)
    if key_id is None:
        raise ApiError(401, "invalid or revoked API key; ask the operator for a new one",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    request.state.api_key_id = key_id
    return key_id


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
OwnerDep = Annotated[str | None, Depends(current_key)]


def visible_to(job_owner: str | None, owner: str | None, settings: Settings) -> bool:
    """Whether a job (or batch) of ``job_owner`` may be seen by ``owner``."""
    return not settings.auth_enabled or job_owner == owner
