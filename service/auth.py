"""API keys: ``steer_<random>`` bearer tokens of which only the sha256 is stored.

Redis layout: the hash ``steer:apikeys`` maps key id → JSON record (id, name, sha256, a short
prefix to recognise the token by, created_at, and the content policy its requests use when it
is not the default); ``steer:apikey-hash:<sha256>`` → key id is the lookup a request makes.
The key id (never the token) is the job owner and the rate-limit unit.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass

import redis
import redis.asyncio

KEYS_HASH = "steer:apikeys"
TOKEN_PREFIX = "steer_"
SHOWN_PREFIX_CHARS = len(TOKEN_PREFIX) + 6


def hash_key(token: str) -> str:
    """The sha256 hex under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def lookup_key(sha256: str) -> str:
    """Redis key mapping a token's sha256 to its key id."""
    return f"steer:apikey-hash:{sha256}"


@dataclass(frozen=True)
class ApiKey:
    """A stored key (the token itself is never stored)."""

    id: str
    name: str
    prefix: str
    sha256: str
    created_at: float
    policy: str | None = None  # content policy for this key's requests (None: the default)


def create_key(conn: redis.Redis, name: str, policy: str | None = None
               ) -> tuple[ApiKey, str]:
    """Make a new key; returns (record, token). The token is shown once and never again.
    ``policy`` names the content policy its requests use instead of the default."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=secrets.token_hex(8), name=name, prefix=token[:SHOWN_PREFIX_CHARS],
                 sha256=hash_key(token), created_at=time.time(), policy=policy)
    with conn.pipeline() as pipe:
        pipe.hset(KEYS_HASH, key.id, json.dumps(asdict(key)))
        pipe.set(lookup_key(key.sha256), key.id)
        pipe.execute()
    return key, token


def key_policy(conn: redis.Redis, key_id: str) -> str | None:
    """The content policy a key was created with (None: the default, or an unknown key)."""
    raw = conn.hget(KEYS_HASH, key_id)
    return ApiKey(**json.loads(raw)).policy if raw is not None else None


def list_keys(conn: redis.Redis) -> list[ApiKey]:
    """Every stored key, oldest first."""
    keys = [ApiKey(**json.loads(raw)) for raw in conn.hvals(KEYS_HASH)]
    return sorted(keys, key=lambda k: (k.created_at, k.id))


def revoke_key(conn: redis.Redis, key_id: str) -> ApiKey | None:
    """Delete a key by id (requests with its token get 401 at once); None when unknown."""
    raw = conn.hget(KEYS_HASH, key_id)
    if raw is None:
        return None
    key = ApiKey(**json.loads(raw))
    with conn.pipeline() as pipe:
        pipe.hdel(KEYS_HASH, key_id)
        pipe.delete(lookup_key(key.sha256))
        pipe.execute()
    return key


def token_lookup_key(token: str) -> str | None:
    """The Redis key that names ``token``'s key id, or None for a token that is not ours."""
    return lookup_key(hash_key(token)) if token.startswith(TOKEN_PREFIX) else None


def _key_id(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


def authenticate(conn: redis.Redis, token: str) -> str | None:
    """The key id of a valid token, else None (one GET; unknown and revoked look the same)."""
    rkey = token_lookup_key(token)
    return _key_id(conn.get(rkey)) if rkey is not None else None


async def authenticate_async(aconn: redis.asyncio.Redis, token: str) -> str | None:
    """:func:`authenticate` on the async client (the gateway's, no threadpool hop)."""
    rkey = token_lookup_key(token)
    return _key_id(await aconn.get(rkey)) if rkey is not None else None
