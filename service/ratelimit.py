"""Admission control, one Redis round trip per request: the per-key rate limit (429), the
per-key cap on queued + running jobs (429: one key cannot starve the others) and the global
queue depth (503), each answered with ``Retry-After``.

The per-key cap is checked and taken in one Lua script (SCARD, then SADD of the new job ids
only if they fit), so concurrent submissions of one key cannot all pass it.

The rate limit is a sliding-window counter: two fixed one-minute windows, the previous one
weighted by how much of it still overlaps the last minute. It counts the requests that change
state (submit, cancel, delete), not polling.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis
from rq import Queue

from service import jobstore, metrics_store
from service.errors import retry_after
from service.settings import Settings

WINDOW_S = 60.0
DEFAULT_JOB_S = 5.0
RESERVATION_S = 60  # a reserved id whose job is not enqueued yet counts this long
# KEYS[1] the owner's active set, ARGV[1] the cap, ARGV[2] the reservation marker prefix,
# ARGV[3] its TTL, ARGV[4..] the new job ids
_RESERVE = """
local size = redis.call('SCARD', KEYS[1])
if size + #ARGV - 3 > tonumber(ARGV[1]) then return {0, size} end
for i = 4, #ARGV do
  redis.call('SADD', KEYS[1], ARGV[i])
  redis.call('SET', ARGV[2] .. ARGV[i], 1, 'EX', tonumber(ARGV[3]))
end
return {1, size}
"""


def rate_key(owner: str, window: int) -> str:
    """Counter of ``owner``'s requests in fixed window number ``window``."""
    return f"steer:rl:{owner}:{window}"


def seconds_until_allowed(prev: int, cur: int, limit: int, elapsed: float,
                          window: float = WINDOW_S) -> float:
    """How long until one more request fits the sliding window (``cur`` excludes it)."""
    room = limit - 1 - cur
    if room >= 0 and prev > 0:  # the previous window's weight decays enough in this window
        wait = (window - elapsed) - window * room / prev
        if wait <= window - elapsed:
            return max(0.0, wait)
    # In the next window this window becomes "previous" and decays from cur.
    wait_next = window * (1 - (limit - 1) / cur) if cur > limit - 1 else 0.0
    return (window - elapsed) + max(0.0, wait_next)


def typical_job_s(conn: redis.Redis) -> float:
    """Mean generation time the workers report (a Retry-After estimate), 1–60 s."""
    _, count, total = metrics_store.read_histogram(conn, "generation_latency_seconds")
    mean = total / count if count else DEFAULT_JOB_S
    return min(60.0, max(1.0, mean))


def reserve_slots(conn: redis.Redis, owner: str, job_ids: Sequence[str], cap: int
                  ) -> tuple[bool, int]:
    """Add ``job_ids`` to ``owner``'s active set only if it then holds at most ``cap`` ids,
    atomically (concurrent submissions cannot both pass the check): (added, the set's size
    before)."""
    added, size = conn.eval(_RESERVE, 1, jobstore.active_key(owner), cap,
                            jobstore.RESERVED_PREFIX, RESERVATION_S, *job_ids)
    return bool(added), int(size)


def admit(conn: redis.Redis, queue: Queue, owner: str | None, settings: Settings,
          job_ids: Sequence[str] = (), now: float | None = None) -> int | None:
    """Raise a 429/503 ApiError unless ``owner`` may make this request adding the jobs
    ``job_ids``, whose slots under the per-key cap it then holds (release them with
    :func:`release_slots` if the enqueue fails). Returns how many queued or running jobs
    the key had before them (None without an owner or jobs).

    No ids: a state-changing request that enqueues nothing (rate limit only). ``owner`` None
    (auth off): no per-key limits, only the global queue depth.
    """
    jobs = len(job_ids)
    now = time.time() if now is None else now
    window = int(now // WINDOW_S)
    with conn.pipeline(transaction=False) as pipe:
        if owner is not None:
            pipe.incr(rate_key(owner, window))
            pipe.expire(rate_key(owner, window), int(2 * WINDOW_S) + 1)
            pipe.get(rate_key(owner, window - 1))
        if jobs:
            pipe.llen(queue.key)
        results = pipe.execute()
    if owner is not None:
        cur, _, prev_raw = results[:3]
        prev, elapsed = int(prev_raw or 0), now - window * WINDOW_S
        limit = settings.rate_limit_per_minute
        if prev * (WINDOW_S - elapsed) / WINDOW_S + cur > limit:
            conn.decr(rate_key(owner, window))  # a refused request does not use up the quota
            wait = seconds_until_allowed(prev, cur - 1, limit, elapsed)
            raise retry_after(429, f"rate limit of {limit} requests per minute for this API "
                              "key reached; retry after the Retry-After seconds", wait)
    if jobs:
        depth = results[-1]
        if depth + jobs > settings.max_queue_depth:
            raise retry_after(503, f"the queue is full ({depth} jobs waiting, limit "
                              f"{settings.max_queue_depth}); retry later", typical_job_s(conn))
    if owner is None or not jobs:
        return None
    # the set may hold ids whose jobs ended: prune and retry once when it looks full
    cap = settings.per_key_max_queued
    added, active = reserve_slots(conn, owner, job_ids, cap)
    if not added:
        jobstore.active_count(conn, queue, owner)
        added, active = reserve_slots(conn, owner, job_ids, cap)
        if not added:
            raise retry_after(
                429, f"this API key has {active} queued or running jobs and may have at "
                f"most {cap}; wait for some to finish (or cancel them)", typical_job_s(conn))
    return active


def release_slots(conn: redis.Redis, owner: str | None, job_ids: Sequence[str]) -> None:
    """Give back the per-key slots :func:`admit` reserved for jobs that were not enqueued."""
    if owner is not None and job_ids:
        conn.srem(jobstore.active_key(owner), *job_ids)
