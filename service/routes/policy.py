"""``GET /v1/policy``: the content policy the caller's requests run under, and how the gateway
picks it (the API key's own policy, else the policy file's default)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from service.auth import key_policy
from service.deps import OwnerDep, Runtime, RuntimeDep
from service.errors import REDIS_DOWN, ApiError, documented
from service.policy import Policy, PolicyError
from service.schemas import PolicyEdit, PolicyOut

router = APIRouter(prefix="/v1", tags=["policy"])


def caller_policy(rt: Runtime, owner: str | None) -> tuple[Policy | None, str]:
    """(policy, source) for a caller: none without a policy file; the key's own policy when
    it names one (``steer keys create --policy``); else the file's default."""
    if rt.policies is None:
        return None, "none"
    name = key_policy(rt.conn, owner) if owner is not None else None
    try:
        return rt.policies.get(name), "api_key" if name is not None else "default"
    except PolicyError as exc:
        raise ApiError(500, f"API key {owner} is assigned a content policy the gateway does "
                       f"not know ({exc}); an operator must add it to the policy file or "
                       "create the key again") from None


@router.get("/policy", response_model=PolicyOut, summary="The caller's content policy",
            responses=documented(401, 503, e503=REDIS_DOWN))
async def get_policy(rt: RuntimeDep, owner: OwnerDep) -> PolicyOut:
    """The content policy applied to your requests: concepts always suppressed (γ and
    percentile filled from the bundle) and detection rules (threshold → mark, steer or
    refuse). `name` is null when the deployment has no policy."""
    policy, source = await run_in_threadpool(caller_policy, rt, owner)
    if policy is None:
        return PolicyOut(name=None, source="none", suppress=[], detect=[])
    return PolicyOut(
        name=policy.name, source=source, description=policy.description,  # type: ignore[arg-type]
        suppress=[PolicyEdit(**e.to_dict()) for e in policy.suppressions(rt.catalog.concepts)],
        detect=list(policy.detect))
