"""The web page: ``/`` serves ``service/web/index.html`` and ``/static/…`` its CSS and JS
modules (plain files, no build step, nothing fetched from elsewhere). Kept out of the OpenAPI
schema; the page itself only calls the public API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
# Scripts, styles and API calls from this origin only; images may come from STEER_PUBLIC_URL.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: http: https:; "
                               "object-src 'none'; base-uri 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


class RevalidatedFiles(StaticFiles):
    """Static files the browser revalidates on each load (a cheap 304 by ETag), so a new
    version of the page never runs with a cached older module."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


@router.get("/")
async def index() -> FileResponse:
    """The page (it loads its scripts from /static and talks to /v1)."""
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


def mount_static(app: FastAPI) -> None:
    """Serve the page's files under ``/static`` (after the API routes)."""
    app.mount("/static", RevalidatedFiles(directory=WEB_DIR), name="static")
