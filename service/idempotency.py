"""``Idempotency-Key``: the same key and the same request give the same job; the same key with a
different request is a 409.

A key is claimed with ``SET NX EX`` before anything is enqueued, holding the request's
fingerprint (sha256 of the validated body, canonical JSON) and the id the new job will get.
A repeat finds the claim and gets that id back; a submission refused after claiming (limits,
Redis) releases the claim so that the client's retry goes through. Keys are scoped to the API
key that sent them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import redis
from pydantic import BaseModel

from service.errors import ApiError

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
CLAIM_GRACE_S = 2.0  # how long a repeat waits for the first request's job to appear
TAKE_OVER_TRIES = 3
# KEYS[1] the claim, ARGV[1] the value pointing at the gone job, ARGV[2] the new value,
# ARGV[3] the TTL: replace only an unchanged (or vanished) claim; else return the current one
_TAKE_OVER = """
local raw = redis.call('GET', KEYS[1])
if raw == false or raw == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
  return false
end
return raw
"""

T = TypeVar("T")


def fingerprint(kind: str, body: BaseModel) -> str:
    """sha256 of what was asked (kind + validated body); key order and spacing do not matter."""
    canonical = json.dumps([kind, body.model_dump(mode="json")], sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def claim_key(owner: str | None, key: str) -> str:
    """Redis key of one client key (hashed: clients choose its contents)."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"steer:idem:{owner or '-'}:{digest}"


def check_header(key: str | None) -> str | None:
    """The header value, or a 422 naming it when it is empty or too long."""
    if key is None:
        return None
    if not key.strip() or len(key) > MAX_KEY_CHARS:
        raise ApiError(422, f"{HEADER} must be 1–{MAX_KEY_CHARS} characters (a UUID is a "
                       "good choice)", field=HEADER)
    return key


def claim(conn: redis.Redis, owner: str | None, key: str, fp: str, new_id: str,
          ttl_s: int) -> str | None:
    """Reserve ``key`` for ``new_id``: None when this request now owns it, else the id of the
    job (or batch) an earlier identical request made; 409 when the earlier request differed."""
    rkey = claim_key(owner, key)
    value = json.dumps({"fingerprint": fp, "id": new_id})
    for _ in range(3):  # the earlier claim may expire between SET NX and GET
        if conn.set(rkey, value, nx=True, ex=max(1, ttl_s)):
            return None
        raw = conn.get(rkey)
        if raw is None:
            continue
        earlier: dict[str, Any] = json.loads(raw)
        if earlier.get("fingerprint") != fp:
            raise ApiError(409, f"this {HEADER} was already used with a different request; "
                           "send a new key for a new request", field=HEADER)
        return str(earlier["id"])
    raise ApiError(409, f"this {HEADER} is changing hands; retry", field=HEADER,
                   headers={"Retry-After": "1"})


def take_over(conn: redis.Redis, owner: str | None, key: str, fp: str, gone_id: str,
              new_id: str, ttl_s: int) -> str | None:
    """Point a claim whose job ``gone_id`` is gone (deleted, expired) at ``new_id``, only if
    it still points at ``gone_id`` (compare-and-set: of concurrent retries, one takes it
    over). None when this request now owns it, else the id another retry put there."""
    expected = json.dumps({"fingerprint": fp, "id": gone_id})
    value = json.dumps({"fingerprint": fp, "id": new_id})
    raw = conn.eval(_TAKE_OVER, 1, claim_key(owner, key), expected, value, max(1, ttl_s))
    if raw is None:
        return None
    current: dict[str, Any] = json.loads(raw)
    if current.get("fingerprint") != fp:
        raise ApiError(409, f"this {HEADER} was already used with a different request; "
                       "send a new key for a new request", field=HEADER)
    return str(current["id"])


def release(conn: redis.Redis, owner: str | None, key: str, new_id: str) -> None:
    """Drop our claim (the submission was refused), unless someone else's replaced it."""
    rkey = claim_key(owner, key)
    raw = conn.get(rkey)
    if raw is not None and json.loads(raw).get("id") == new_id:
        conn.delete(rkey)


def earlier_result(conn: redis.Redis, owner: str | None, key: str | None, fp: str, new_id: str,
                   ttl_s: int, find: Callable[[str], T | None]) -> T | None:
    """What an earlier request with this key made (``find(id)``), else None after claiming
    the key for ``new_id``. A claim whose job is gone (deleted, expired) starts a new one, made
    by exactly one of the retries that find it gone (the others get that one's job)."""
    if key is None:
        return None
    earlier = claim(conn, owner, key, fp, new_id, ttl_s)
    for _ in range(TAKE_OVER_TRIES):
        if earlier is None:
            return None
        deadline = time.monotonic() + CLAIM_GRACE_S
        while (found := find(earlier)) is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the first request may still be enqueueing
        if found is not None:
            return found
        earlier = take_over(conn, owner, key, fp, earlier, new_id, ttl_s)
    raise ApiError(409, f"this {HEADER} is changing hands; retry", field=HEADER,
                   headers={"Retry-After": "1"})


@contextlib.contextmanager
def released_on_error(conn: redis.Redis, owner: str | None, key: str | None,
                      new_id: str) -> Iterator[None]:
    """Release our claim if the submission inside fails, so the client's retry goes through."""
    try:
        yield
    except BaseException:
        if key is not None:
            with contextlib.suppress(redis.RedisError):
                release(conn, owner, key, new_id)
        raise
