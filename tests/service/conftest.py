"""Service fixtures: a real Redis (the shared server, one test database flushed per test),
Settings pointing at it and a temporary data folder, and private Redis servers for tests
that stop one.

Set STEER_TEST_REDIS_URL to use another database (parallel test runs must not share one).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from service.settings import REPO_ASSETS, Settings

TEST_REDIS_URL = os.environ.get("STEER_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def shared_redis() -> redis.Redis:
    """A client of the shared test Redis (fails the test, saying how to start it, if down)."""
    conn = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        conn.ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis at {TEST_REDIS_URL}: start it with `redis-server --daemonize yes "
                    "--bind 127.0.0.1 --port 6379 --save '' --appendonly no`")
    return conn


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The shared Redis at 127.0.0.1:6379, test database flushed before and after."""
    conn = shared_redis()
    conn.flushdb()
    yield TEST_REDIS_URL
    conn.flushdb()
    conn.close()


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def fast_settings(data_dir: Path, redis_url: str | None, **overrides: object) -> Settings:
    """Settings on the toy pipeline and bundle with heartbeats/TTLs short enough for tests."""
    values: dict[str, object] = dict(
        redis_url=redis_url, data_dir=data_dir, pipeline_dir=REPO_ASSETS / "toy-pipeline",
        bundle_dir=REPO_ASSETS / "toy-bundle", worker_heartbeat_s=0.5,
        worker_heartbeat_ttl_s=3, maintenance_interval_s=1, job_timeout_s=120,
        url_signing_secret="test-url-secret", webhook_secret="test-webhook-secret",
        webhook_allowed=["127.0.0.0/8"], log_json=True,  # the tests' receivers are local
        allowed_hosts=["127.0.0.1", "localhost", "testserver"])  # TestClient's host
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return fast_settings(tmp_path / "data", redis_url)


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that reproduce ``settings`` in a subprocess (steer worker…)."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            env.pop(f"STEER_{name.upper()}", None)
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, list):
            import json
            value = json.dumps(value)
        env[f"STEER_{name.upper()}"] = str(value)
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    else:
        env.pop("REDIS_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of our own on a free port, which a test may stop and start again."""

    def __init__(self, port: int, aof_dir: Path | None = None) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None
        self.aof_dir = aof_dir  # persistence as in compose (AOF), fsync'd on every write

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--dir",
                        str(self.aof_dir)] if self.aof_dir is not None
                       else ["--appendonly", "no"])
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             *persistence], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final flush (a crash, not a restart)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    """A started private Redis server (never the shared one), stopped at the end."""
    server = PrivateRedis(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def wait_for() -> Callable[..., object]:
    """wait_for(fn, timeout=10, what="...") polls fn() until truthy and returns its value."""

    def wait(fn: Callable[[], object], timeout: float = 20.0, what: str = "condition",
             interval: float = 0.05) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = fn()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    return wait


# Imported last: worker_support imports settings_env from here.
from tests.service.worker_support import spawn  # noqa: E402, F401 (a fixture)
