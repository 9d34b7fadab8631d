"""Pure ASGI middleware (no BaseHTTPMiddleware):

- :class:`RequestContextMiddleware`: the request id (``X-Request-ID`` in and out), one JSON
  access-log line, request metrics, and a JSON 500 for anything unexpected. It sets
  :data:`service.logs.request_id` before the app runs, so every log line of the request, and
  the job it enqueues, carry the same id.
- :class:`BodyLimitMiddleware`: 413 for a body over the limit, announced (Content-Length) or
  streamed, as ErrorDetail JSON like every other error.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs
from service.errors import error_response
from service.metrics import GatewayMetrics

access_log = logging.getLogger("service.access")
REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from(headers: Headers) -> str:
    """The client's X-Request-ID when it is a sane token, else a fresh one."""
    given = headers.get(REQUEST_ID_HEADER)
    if given and _VALID_REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The matched route's path template (bounded label values), or "unmatched"."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestContextMiddleware:
    """Request id in/out, access log, request count/latency metrics, JSON 500s."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(Headers(scope=scope))
        token = logs.request_id.set(rid)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started = False
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            status = 500
            access_log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise  # a half-sent response: let the server drop the connection
            response = error_response(
                500, "internal error; quote the X-Request-ID header when reporting it",
                headers={REQUEST_ID_HEADER: rid})
            await response(scope, receive, send)
        finally:
            elapsed = time.perf_counter() - t0
            route = route_template(scope)
            self.metrics.observe_request(scope["method"], route, status, elapsed)
            state = scope.get("state", {})
            access_log.info(
                "%s %s %s", scope["method"], scope["path"], status,
                extra={"method": scope["method"], "path": scope["path"], "route": route,
                       "status": status, "duration_ms": round(elapsed * 1000, 2),
                       "client": (scope.get("client") or ("-",))[0],
                       "api_key": state.get("api_key_id")})
            logs.request_id.reset(token)


class BodyTooLarge(HTTPException):
    """Raised while the body streams in past the limit (answered as a JSON 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes; send fewer or "
                         "smaller items (the limit is STEER_MAX_BODY_BYTES)")


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes``: at once when Content-Length says so, else as they
    stream in (chunked uploads have no Content-Length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            error = BodyTooLarge(self.max_bytes)
            await error_response(413, error.detail)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)
