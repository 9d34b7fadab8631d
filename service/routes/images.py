"""``GET /v1/images/{id}.png``: an image by its signed, expiring link (no API key needed, so an
``<img>`` tag works). Only a canonical UUID ever becomes a path."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from service.deps import RuntimeDep
from service.errors import ApiError, documented
from service.jobstore import valid_id

router = APIRouter(prefix="/v1", tags=["images"])


@router.get("/images/{id}.png", response_class=FileResponse, summary="An image (signed link)",
            responses={200: {"content": {"image/png": {}}, "description": "The PNG, with its "
                             "provenance in the `parameters` and `sae-steering` text chunks"},
                       **documented(403, 404, 422)})
async def get_image(id: str, rt: RuntimeDep,
                    exp: Annotated[int | None, Query(description="Expiry (unix time)")] = None,
                    sig: Annotated[str | None, Query(description="HMAC-SHA256 signature")] = None,
                    ) -> FileResponse:
    """The PNG behind a link from a generation's `images[].url`."""
    if not valid_id(id):
        raise ApiError(404, f"no image {id!r}: image ids are UUIDs", field="id")
    if not rt.images.verify(id, exp, sig):
        raise ApiError(403, "this image link is invalid or has expired; fetch the generation "
                       "again for a fresh link", field="sig")
    path = rt.images.path(id)
    if not path.is_file():
        raise ApiError(404, f"image {id} no longer exists (deleted, or its retention passed)",
                       field="id")
    max_age = max(0, int(exp or 0) - int(time.time()))
    return FileResponse(path, media_type="image/png",
                        headers={"Cache-Control": f"private, max-age={max_age}"})
