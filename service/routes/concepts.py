"""``GET /v1/concepts``: what the loaded steering bundle can steer, with its defaults."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import OwnerDep, RuntimeDep
from service.errors import REDIS_DOWN, documented
from service.schemas import ConceptList, ConceptOut

router = APIRouter(prefix="/v1", tags=["concepts"])


@router.get("/concepts", response_model=ConceptList, summary="Concepts of the bundle",
            responses=documented(401, 503, e503=REDIS_DOWN))
async def list_concepts(rt: RuntimeDep, owner: OwnerDep) -> ConceptList:
    """Every concept in the bundle, in manifest order: kind, default γ and its range (0 turns
    an edit off), default percentile."""
    return ConceptList(
        bundle_sha256=rt.catalog.bundle_sha256,
        concepts=[ConceptOut(name=c.name, kind=c.kind, default_gamma=c.default_gamma,
                             gamma_range=c.gamma_range, default_percentile=c.default_percentile)
                  for c in rt.catalog.concepts.values()])
