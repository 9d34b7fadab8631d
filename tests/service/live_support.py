"""A live gateway for browser and fuzzing tests: the app under uvicorn in a thread on a
loopback port, and a wait until a worker has made it ready."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import free_port
from tests.service.worker_support import WorkerProcess


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The gateway for ``settings`` under uvicorn in a thread; its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def wait_http_ready(base: str, worker: WorkerProcess) -> None:
    """Until /readyz says a worker has loaded the bundle (fails fast if the worker died)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert worker.alive(), f"worker exited:\n{worker.log()[-3000:]}"
        if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"no worker ready in 120 s:\n{worker.log()[-3000:]}")
