"""Helpers shared by the worker-side tests: enqueue a generation as the gateway does, start
`steer worker` subprocesses (the ``spawn`` fixture, registered in conftest) and wait for a
worker to register or a job to reach a status or a step."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue, SimpleWorker
from rq.job import Job

from service.jobstore import GenerationRecord, enqueue_generation, new_id, read_generation
from service.schemas import GenerationCreate
from service.settings import REPO_ASSETS, Settings
from service.worker_registry import live_workers
from tests.service.conftest import settings_env

ROOT = Path(__file__).resolve().parents[2]
TOY_BUNDLE_SHA = hashlib.sha256((REPO_ASSETS / "toy-bundle" / "manifest.json").read_bytes()
                                ).hexdigest()
LONG = 500  # steps: over ten seconds on the toy pipeline, for jobs a test stops mid-run


def submit(conn: redis.Redis, settings: Settings, *, owner: str | None = "key-1",
           webhook: str | None = None, request_id: str | None = None,
           timeout_s: int | None = None, **fields: Any) -> str:
    """Enqueue a generation the way the gateway does; its id."""
    values: dict[str, Any] = {"prompt": "a red circle", "seed": 7, "steps": 20, **fields}
    payload = GenerationCreate(**values).model_dump(mode="json")
    job_id = new_id()
    enqueue_generation(Queue(settings.queue_name, connection=conn), payload, job_id=job_id,
                       owner=owner, request_id=request_id, batch_id=None, webhook=webhook,
                       timeout_s=timeout_s or settings.job_timeout_s,
                       retention_s=settings.result_retention_s)
    return job_id


def record(conn: redis.Redis, settings: Settings, job_id: str) -> GenerationRecord:
    found = read_generation(Queue(settings.queue_name, connection=conn), job_id)
    assert found is not None, f"job {job_id} vanished"
    return found


def meta(conn: redis.Redis, job_id: str) -> dict[str, Any]:
    return Job.fetch(job_id, connection=conn).meta


@dataclass
class WorkerProcess:
    """A `steer worker` subprocess and its log file."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_worker(settings: Settings, name: str, log_dir: Path) -> WorkerProcess:
    """A `steer worker` process on ``settings``, logging to ``log_dir/<name>.log``."""
    env = settings_env(settings)
    env["OMP_NUM_THREADS"] = "1"
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli_worker", "--name", name], cwd=ROOT,
            env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return WorkerProcess(name, proc, log_path)


@pytest.fixture
def spawn(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """spawn(name) starts a worker process on ``settings``; all are killed at the end."""
    started: list[WorkerProcess] = []

    def start(name: str, worker_settings: Settings | None = None) -> WorkerProcess:
        worker = start_worker(worker_settings or settings, name, tmp_path)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.alive():
            worker.proc.kill()
            worker.proc.wait(10)


def wait_ready(conn: redis.Redis, worker: WorkerProcess, wait_for: Callable[..., object]
               ) -> dict[str, Any]:
    """The worker's steer:worker record, once it is registered (fails fast if it died)."""

    def registered() -> dict[str, Any] | None:
        if not worker.alive():
            raise AssertionError(f"worker {worker.name} exited:\n{worker.log()[-3000:]}")
        return next((w for w in live_workers(conn) if w["name"] == worker.name), None)

    return wait_for(registered, timeout=90, what=f"worker {worker.name} to register")  # type: ignore[return-value]


def wait_status(conn: redis.Redis, settings: Settings, job_id: str,
                wait_for: Callable[..., object], statuses: set[str],
                timeout: float = 90, worker: WorkerProcess | None = None) -> GenerationRecord:
    """The job's record once its status is one of ``statuses`` (fails at once if
    ``worker`` exits meanwhile)."""

    def reached() -> GenerationRecord | None:
        if worker is not None and not worker.alive():
            raise AssertionError(f"worker {worker.name} exited:\n{worker.log()[-3000:]}")
        rec = record(conn, settings, job_id)
        return rec if rec.status in statuses else None

    return wait_for(reached, timeout=timeout, what=f"job {job_id} to be {statuses}",  # type: ignore[return-value]
                    interval=0.1)


def wait_step(conn: redis.Redis, job_id: str, wait_for: Callable[..., object],
              at_least: int) -> None:
    def stepped() -> bool:
        progress = meta(conn, job_id).get("progress") or {}
        return progress.get("step", 0) >= at_least

    wait_for(stepped, timeout=90, what=f"job {job_id} to reach step {at_least}", interval=0.02)


# -- worker processes ----------------------------------------------------------------------


@contextlib.contextmanager
def rq_signal_handlers_restored() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_queued(conn: redis.Redis, settings: Settings) -> None:
    """Run every queued generation job in this process (RQ's SimpleWorker, burst)."""
    with rq_signal_handlers_restored():
        SimpleWorker([Queue(settings.queue_name, connection=conn)],
                     connection=conn).work(burst=True)
