"""Waiting for jobs to end (``Prefer: wait=N``) at a cost that does not grow with the waiters.

A waiting request used to hold a connection of the gateway's Redis pool in a blocking XREAD
on its job's result stream, so about a hundred waiters on one slow job took every pooled
connection and the API-key lookups of every other client failed. Here one listener task per
gateway process does the blocking for all of them, on a connection of its own:

- each waiting request registers its job and awaits an :class:`asyncio.Event`;
- the listener blocks in one ``XREAD`` over the result streams of every watched job (RQ
  writes a job's result there when it ends) and wakes the waiters of the streams that moved;
- every ``status_every_s`` it also reads the RQ status of every watched job in pipelines
  (a job canceled while queued, or deleted, writes no result) and wakes the ended ones;
- a waiter that is woken, or whose time is up, re-reads its job once.

A key may hold at most ``per_key`` waits at once: past that, the request is answered at once
(the ``Prefer: wait`` preference is not applied), so one client cannot fill the gateway with
parked requests. The listener stops when nobody waits and starts again with the next waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import redis.asyncio
from rq.job import Job
from rq.results import Result

log = logging.getLogger(__name__)

ENDED = frozenset({b"finished", b"failed", b"canceled", b"stopped"})
MAX_STREAMS = 1000  # one XREAD watches at most this many streams (the rest: status checks)
STATUS_CHUNK = 250  # statuses read per pipeline


def later(a: str, b: str) -> str:
    """The later of two stream entry ids (``<ms>-<seq>``)."""

    def key(entry: str) -> tuple[int, int]:
        ms, _, seq = entry.partition("-")
        return int(ms), int(seq or 0)

    return a if key(a) >= key(b) else b


class ResultWaiter:
    """One listener per process for the ends of the jobs that requests wait on."""

    def __init__(self, conn: redis.asyncio.Redis, per_key: int, block_s: float = 0.5,
                 status_every_s: float = 5.0) -> None:
        self.conn = conn  # a client of its own: the listener never takes a pooled connection
        self.per_key = per_key
        self.block_s, self.status_every_s = block_s, status_every_s
        self._events: dict[str, set[asyncio.Event]] = {}
        self._last: dict[str, str] = {}  # job id -> last stream entry seen
        self._per_owner: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def waiting(self, owner: str | None = None) -> int:
        """How many requests wait (of ``owner``, when given)."""
        if owner is not None:
            return self._per_owner.get(owner, 0)
        return sum(len(e) for e in self._events.values())

    @contextlib.asynccontextmanager
    async def slot(self, owner: str | None) -> AsyncIterator[bool]:
        """Yield True when ``owner`` may wait now (under its limit of concurrent waits),
        holding the slot until the block ends; False (nothing held) otherwise."""
        if owner is not None and self._per_owner.get(owner, 0) >= self.per_key:
            yield False
            return
        if owner is not None:
            self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
        try:
            yield True
        finally:
            if owner is not None:
                left = self._per_owner[owner] - 1
                if left:
                    self._per_owner[owner] = left
                else:
                    del self._per_owner[owner]

    async def wait(self, job_id: str, seconds: float, after: str = "0-0") -> str:
        """Until a result newer than stream entry ``after`` is written or the job's RQ
        status ends, or ``seconds`` pass. Returns the newest entry seen (pass it back as
        ``after`` when waiting again, so an old result does not wake the waiter at once)."""
        event = asyncio.Event()
        self._events.setdefault(job_id, set()).add(event)
        self._last[job_id] = later(self._last.get(job_id, "0-0"), after)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name="result-waiter")
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=max(0.0, seconds))
            return self._last.get(job_id, after)
        finally:
            events = self._events.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[job_id]
                    self._last.pop(job_id, None)

    async def close(self) -> None:
        """Stop the listener (the app's shutdown); waiters then run out their time."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.conn.aclose()

    def _wake(self, job_id: str) -> None:
        for event in self._events.get(job_id, ()):
            event.set()

    async def _listen(self) -> None:
        """Block on every watched stream at once; check statuses now and then; stop when
        nobody waits. A Redis error is logged and retried after a pause (the waiters then
        end by their own deadline, re-reading their job)."""
        next_status = 0.0
        while self._events:
            try:
                if time.monotonic() >= next_status:
                    await self._check_statuses()
                    next_status = time.monotonic() + self.status_every_s
                await self._read_streams()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("result waiter: Redis error, retrying", exc_info=True)
                await asyncio.sleep(self.block_s)

    async def _read_streams(self) -> None:
        jobs = list(self._events)[:MAX_STREAMS]
        streams = {Result.get_key(j): self._last.get(j, "0-0") for j in jobs}
        entries = await self.conn.xread(streams, block=max(1, int(self.block_s * 1000)))
        prefix = len(Result.get_key(""))
        for stream, items in entries or ():
            name = stream.decode() if isinstance(stream, bytes) else stream
            job_id = name[prefix:]
            if items and job_id in self._last:
                last = items[-1][0]
                self._last[job_id] = last.decode() if isinstance(last, bytes) else last
            self._wake(job_id)

    async def _check_statuses(self) -> None:
        jobs = list(self._events)
        for start in range(0, len(jobs), STATUS_CHUNK):  # the loop serves requests between
            chunk = jobs[start:start + STATUS_CHUNK]
            async with self.conn.pipeline(transaction=False) as pipe:
                for job_id in chunk:
                    pipe.hget(Job.key_for(job_id), "status")
                statuses = await pipe.execute()
            for job_id, status in zip(chunk, statuses, strict=True):
                if status is None or status in ENDED:
                    self._wake(job_id)
