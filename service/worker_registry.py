"""Which workers are alive and what they serve: ``steer:worker:<name>`` keys in Redis.

Each worker writes a JSON record (bundle sha256, pipeline fingerprint, device, pid, host,
start time) with a TTL of ``worker_heartbeat_ttl_s`` and refreshes it every heartbeat, so a
dead worker's record disappears by itself. The gateway's ``/readyz`` reads them; this module
imports neither torch nor the pipeline, so the gateway can use it.
"""

from __future__ import annotations

import json
from typing import Any

import redis

PREFIX = "steer:worker:"


def worker_key(name: str) -> str:
    """Redis key of worker ``name``'s record."""
    return f"{PREFIX}{name}"


def register_worker(conn: redis.Redis, name: str, record: dict[str, Any], ttl_s: int) -> None:
    """Write (or refresh) a worker's record for ``ttl_s`` seconds."""
    conn.set(worker_key(name), json.dumps(record, sort_keys=True), ex=max(1, int(ttl_s)))


def unregister_worker(conn: redis.Redis, name: str) -> None:
    """Remove a worker's record (on a clean shutdown)."""
    conn.delete(worker_key(name))


def live_workers(conn: redis.Redis) -> list[dict[str, Any]]:
    """Records of the workers whose heartbeat is current (name included), sorted by name."""
    keys = sorted(conn.scan_iter(match=f"{PREFIX}*", count=500))
    if not keys:
        return []
    records = []
    for key, raw in zip(keys, conn.mget(keys), strict=True):
        if raw is None:
            continue  # expired between SCAN and MGET
        name = (key.decode() if isinstance(key, bytes) else key)[len(PREFIX):]
        try:
            records.append({"name": name, **json.loads(raw)})
        except ValueError:
            continue
    return records
