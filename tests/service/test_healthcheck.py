"""Container health checks: a worker container is healthy while a live worker registration
names its host (the registration expires when the worker's heartbeat stops)."""

from __future__ import annotations

import socket

from service.healthcheck import main, worker_healthy
from service.worker_registry import register_worker


def test_worker_health_follows_this_hosts_registration(redis_url, conn, monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert not worker_healthy()
    register_worker(conn, "elsewhere", {"host": "another-host"}, 30)
    assert not worker_healthy() and main(["healthcheck", "worker"]) == 1
    register_worker(conn, "here", {"host": socket.gethostname()}, 30)
    assert worker_healthy() and main(["healthcheck", "worker"]) == 0
    assert main(["healthcheck", "nonsense"]) == 2
