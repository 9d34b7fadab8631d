"""Container health checks: ``python -m service.healthcheck api|worker`` (exit 0 = healthy).

api: ``GET /healthz`` on the local port answers 200. worker: a worker of this host is
registered in Redis (its registration expires when its heartbeat stops).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request


def api_healthy(port: int) -> bool:
    """The local API answers /healthz with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as r:
            return r.status == 200
    except OSError:
        return False


def worker_healthy() -> bool:
    """A live worker registration in Redis names this host."""
    import redis

    from service.settings import Settings
    from service.worker_registry import fresh_within, live_workers

    settings = Settings()
    if not settings.redis_url:
        return False
    try:
        conn = redis.Redis.from_url(settings.redis_url, socket_timeout=4)
        host = socket.gethostname()
        return any(w.get("host") == host
                   for w in live_workers(conn, fresh_within(settings.worker_heartbeat_s)))
    except redis.RedisError:
        return False


def main(argv: list[str]) -> int:
    role = argv[1] if len(argv) > 1 else "api"
    if role == "api":
        return 0 if api_healthy(int(os.environ.get("PORT", "8000"))) else 1
    if role == "worker":
        return 0 if worker_healthy() else 1
    print(f"usage: python -m service.healthcheck api|worker (got {role!r})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
