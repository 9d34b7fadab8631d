"""Which Redis errors mean "come back later" rather than a bug (gateway and worker alike).

- unreachable: the connection fails or times out (Redis restarting, network);
- cannot write: Redis answers but refuses writes — ``MISCONF`` (it could not write its
  append-only file or snapshot, e.g. a full disk; with an AOF error it refuses even PING),
  ``OOM`` (maxmemory reached) or ``READONLY`` (a replica). It recovers by itself once space
  is freed (within about a second for the AOF).
"""

from __future__ import annotations

import re

import redis

UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# the reply starts with the code; redis-py prefixes a pipeline's with "Command # i (...) of
# pipeline caused error: "
_CANNOT_WRITE = re.compile(r"(^|caused error: )(MISCONF|OOM|READONLY)\b")


def cannot_write(exc: BaseException) -> bool:
    """True for a Redis reply refusing writes for now (full disk or memory, a replica)."""
    return isinstance(exc, redis.exceptions.ResponseError) and bool(
        _CANNOT_WRITE.search(str(exc)))


def transient(exc: BaseException) -> bool:
    """True when retrying later may succeed: Redis unreachable or refusing writes."""
    return isinstance(exc, UNREACHABLE) or cannot_write(exc)
