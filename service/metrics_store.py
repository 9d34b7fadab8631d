"""Latency histograms that workers record in Redis and the gateway's /metrics exposes.

Workers run in other processes (other hosts), so they cannot be scraped through the
gateway's in-process registry; each observation is one pipelined HINCRBY into a Redis hash
per histogram, and the gateway's collector reads the hashes (``read_histogram``).
"""

from __future__ import annotations

import math

import redis

PREFIX = "steer:metrics:"
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GENERATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
HISTOGRAMS = {"step_latency_seconds": STEP_BUCKETS,
              "generation_latency_seconds": GENERATION_BUCKETS}


def _bucket_field(le: float) -> str:
    return "+Inf" if math.isinf(le) else repr(float(le))


def observe(conn: redis.Redis, name: str, seconds: float) -> None:
    """Count one observation of histogram ``name`` (one of HISTOGRAMS)."""
    buckets = HISTOGRAMS[name]
    le = next((b for b in buckets if seconds <= b), math.inf)
    with conn.pipeline(transaction=False) as pipe:
        pipe.hincrby(PREFIX + name, _bucket_field(le), 1)
        pipe.hincrby(PREFIX + name, "count", 1)
        pipe.hincrbyfloat(PREFIX + name, "sum", seconds)
        pipe.execute()


def read_histogram(conn: redis.Redis, name: str) -> tuple[list[tuple[str, int]], int, float]:
    """([(le, cumulative count)...] ending with +Inf, count, sum) of histogram ``name``."""
    raw = {k.decode() if isinstance(k, bytes) else k: v
           for k, v in conn.hgetall(PREFIX + name).items()}
    cumulative, buckets = 0, []
    for le in (*HISTOGRAMS[name], math.inf):
        cumulative += int(raw.get(_bucket_field(le), 0))
        buckets.append((_bucket_field(le), cumulative))
    return buckets, int(raw.get("count", 0)), float(raw.get("sum", 0.0))
