"""Every error the gateway answers is JSON :class:`~service.schemas.ErrorDetail`.

Routes and helpers raise :class:`ApiError` (status, message, the field at fault, headers such
as ``Retry-After``); :func:`install_error_handlers` maps it, FastAPI's validation errors,
Starlette's HTTP errors (404 route, 405) and a Redis that is unreachable or refuses writes
(a full disk: 503 + Retry-After) onto that one shape. :func:`documented` writes the matching
``responses=`` entries for the OpenAPI.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.redis_errors import UNREACHABLE, cannot_write
from service.schemas import ErrorDetail

log = logging.getLogger("service.errors")

REDIS_RETRY_AFTER_S = 5
RETRY_AFTER_HEADER = {"Retry-After": {"description": "Seconds to wait before retrying",
                                     "schema": {"type": "integer"}}}
ERROR_DESCRIPTIONS = {
    401: "Missing, invalid or revoked API key (when STEER_AUTH_ENABLED); WWW-Authenticate: Bearer",
    403: "The image link's signature is wrong or it has expired",
    404: "No such job, batch or image (or it belongs to another API key, or was deleted)",
    409: "The Idempotency-Key was used with a different request",
    413: "The body is larger than STEER_MAX_BODY_BYTES",
    422: "A field is invalid; `field` names it (e.g. `concepts[0].name`)",
    429: "Rate limit, or this API key's cap on queued + running jobs, reached",
    503: "The queue is full, or Redis is unreachable",
}
REDIS_DOWN = "Redis is unreachable; retry after Retry-After seconds"


def documented(*codes: int, **notes: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries (ErrorDetail, description, Retry-After) for these status codes;
    ``notes`` (``e409="..."``) replace a description."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorDetail,
                                 "description": notes.get(f"e{code}", ERROR_DESCRIPTIONS[code])}
        if code in (429, 503) or "Retry-After" in notes.get(f"e{code}", ""):
            entry["headers"] = RETRY_AFTER_HEADER
        out[code] = entry
    return out


class ApiError(Exception):
    """An error answered as ``ErrorDetail`` with ``status`` (and headers such as Retry-After)."""

    def __init__(self, status: int, detail: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.headers = headers or {}


def retry_after(status: int, detail: str, seconds: float) -> ApiError:
    """A 429/503 telling the client when to come back (``Retry-After``, whole seconds ≥ 1)."""
    return ApiError(status, detail, headers={"Retry-After": str(max(1, int(seconds + 0.999)))})


def field_path(loc: Sequence[Any]) -> str:
    """``("body", "requests", 0, "prompt")`` → ``"requests[0].prompt"``; the body → "body"."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "header", "path") else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or (str(loc[0]) if loc else "body")


def error_response(status: int, detail: str | list[dict], field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response every error path ends in."""
    body = ErrorDetail(detail=detail, field=field).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line per failed field, and the first field at fault."""
    lines, first = [], None
    for err in errors:
        loc = err.get("loc", ())
        name, msg = field_path(loc), err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            name = "body"
            reason = err.get("ctx", {}).get("error", msg)
            msg = f"not valid JSON ({reason}, at character {loc[-1] if loc else '?'})"
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field; remove it (see the request schema in openapi.json)"
        first = first or name
        lines.append(f"{name}: {msg}")
    return "; ".join(lines) or "invalid request", first


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.detail, exc.field, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, field = _validation_message(exc.errors())
    return error_response(422, message, field)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    if exc.status_code == 404 and detail == "Not Found":
        detail = "no such endpoint; see /docs or openapi/openapi.json"
    elif exc.status_code == 405:
        detail = f"method {request.method} is not allowed here; see /docs"
    elif exc.status_code == 400 and detail == "There was an error parsing the body":
        # FastAPI's answer to a body that is not UTF-8: a malformed body like invalid JSON
        return error_response(422, "body: not valid JSON (it must be UTF-8 text)", "body")
    return error_response(exc.status_code, str(detail), None, dict(exc.headers or {}))


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unreachable: %s", exc)
    return error_response(
        503, "the job store (Redis) is unreachable; retry shortly",
        headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})


async def _redis_refused(request: Request, exc: Exception) -> JSONResponse:
    if not cannot_write(exc):
        return await _unexpected(request, exc)
    log.error("redis refuses writes: %s", exc)
    return error_response(
        503, "the job store (Redis) cannot write right now (its disk or memory is full); "
        "retry later", headers={"Retry-After": str(REDIS_RETRY_AFTER_S)})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error; the request id in X-Request-ID helps find it "
                          "in the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every error into ``ErrorDetail`` JSON."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for exc_type in UNREACHABLE:
        app.add_exception_handler(exc_type, _redis_down)
    app.add_exception_handler(redis.exceptions.ResponseError, _redis_refused)
    app.add_exception_handler(Exception, _unexpected)
