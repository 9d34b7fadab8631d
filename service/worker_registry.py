"""Which workers are alive and what they serve: ``steer:worker:<name>`` keys in Redis.

Each worker writes a JSON record (bundle sha256, pipeline fingerprint, device, pid, host,
start time, the Redis server time of its last beat) with a TTL of ``worker_heartbeat_ttl_s``
and refreshes it every heartbeat, so a dead worker's record disappears by itself. A Redis
restarted from its append-only file brings records back with their old TTL, so readers that
must not count a dead worker (``/readyz``) also ask for a recent beat (``max_age_s``, judged
by Redis's clock, which every process shares). This module imports neither torch nor the
pipeline, so the gateway can use it.
"""

from __future__ import annotations

import json
from typing import Any

import redis

PREFIX = "steer:worker:"


def worker_key(name: str) -> str:
    """Redis key of worker ``name``'s record."""
    return f"{PREFIX}{name}"


def server_time(conn: redis.Redis) -> float:
    """Redis's clock in seconds (one clock for workers and gateways on different hosts)."""
    seconds, micros = conn.time()
    return seconds + micros / 1e6


def register_worker(conn: redis.Redis, name: str, record: dict[str, Any], ttl_s: int) -> None:
    """Write (or refresh) a worker's record for ``ttl_s`` seconds, stamped with the beat's
    server time (``beat_at``)."""
    record = {**record, "beat_at": server_time(conn)}
    conn.set(worker_key(name), json.dumps(record, sort_keys=True), ex=max(1, int(ttl_s)))


def fresh_within(heartbeat_s: float) -> float:
    """How old a worker's last beat may be for it to count as alive: three beats (at least
    2 s, for a busy host)."""
    return max(3 * heartbeat_s, 2.0)


def unregister_worker(conn: redis.Redis, name: str) -> None:
    """Remove a worker's record (on a clean shutdown)."""
    conn.delete(worker_key(name))


def live_workers(conn: redis.Redis, max_age_s: float | None = None) -> list[dict[str, Any]]:
    """Records of the workers whose heartbeat is current (name included), sorted by name;
    with ``max_age_s``, only those that beat within that many seconds."""
    keys = sorted(conn.scan_iter(match=f"{PREFIX}*", count=500))
    if not keys:
        return []
    oldest = None if max_age_s is None else server_time(conn) - max_age_s
    records = []
    for key, raw in zip(keys, conn.mget(keys), strict=True):
        if raw is None:
            continue  # expired between SCAN and MGET
        name = (key.decode() if isinstance(key, bytes) else key)[len(PREFIX):]
        try:
            record = {"name": name, **json.loads(raw)}
        except ValueError:
            continue
        if oldest is not None and float(record.get("beat_at", 0.0)) < oldest:
            continue  # restored from the AOF after the worker stopped beating
        records.append(record)
    return records
