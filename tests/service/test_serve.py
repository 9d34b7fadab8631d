"""`steer serve` without REDIS_URL: embedded Valkey + API + one worker from one command.

Runs the real program as a subprocess (as `make serve` does), submits a steered toy
generation over HTTP, fetches its PNG through the signed link, and stops everything with
SIGTERM (the worker and the embedded server go too; the data folder keeps the queue data).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.service.conftest import free_port


def test_steer_serve_runs_everything_without_redis_url(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("STEER_") and k != "REDIS_URL"}
    env.update(PYTHONUNBUFFERED="1", STEER_WORKER_HEARTBEAT_S="0.5")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "steering.cli", "serve", "--port", str(port), "--data-dir",
         str(tmp_path / "data")], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("not ready in 90 s:\n" + (tmp_path / "serve.log").read_text())
        body = {"prompt": "a red circle on a striped background", "seed": 3, "steps": 10,
                "concepts": [{"name": "red"}]}
        r = httpx.post(f"{base}/v1/generations", json=body, headers={"Prefer": "wait=60"},
                       timeout=90)
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["status"] == "succeeded" and job["seeds"] == [3]
        image = httpx.get(job["images"][0]["url"] if job["images"][0]["url"].startswith("http")
                          else base + job["images"][0]["url"], timeout=10)
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2  # the embedded server and the worker
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(c.pid, c.cmdline()) for c in alive]
    assert (tmp_path / "data" / "valkey").is_dir()
    assert (tmp_path / "serve.log").read_text().count("serving on http://") == 1
