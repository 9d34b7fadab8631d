"""The worker side on a real Redis: `steer worker` processes (python -m service.cli_worker)
running jobs on the toy pipeline, and the job function run in-process for the cases that need
no separate process (timeouts, bad edits, cancel timing, abandoned jobs)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
from rq import Queue, SimpleWorker
from rq.job import Job

from service import runner
from service.images import ImageStore, read_png_text
from service.jobstore import (
    active_key,
    request_cancel,
)
from service.metrics_store import read_histogram
from service.schemas import ConceptEditIn
from service.settings import Settings
from service.worker_registry import live_workers
from tests.service.worker_support import (
    LONG,
    TOY_BUNDLE_SHA,
    meta,
    record,
    run_queued,
    submit,
    wait_ready,
    wait_status,
    wait_step,
)


def test_job_writes_pngs_with_provenance_progress_and_metrics(conn, settings, spawn, wait_for):
    images = ImageStore.from_settings(settings)
    expired, kept = str(uuid.uuid4()), str(uuid.uuid4())
    settings.images_dir.mkdir(parents=True)
    for image_id in (expired, kept):
        (settings.images_dir / f"{image_id}.png").write_bytes(b"png")
    old = time.time() - settings.result_retention_s - 60
    os.utime(images.path(expired), (old, old))

    worker = spawn("w-e2e")
    info = wait_ready(conn, worker, wait_for)
    assert info["bundle_sha256"] == TOY_BUNDLE_SHA and info["device"] == "cpu"
    assert info["pid"] == worker.proc.pid and info["fingerprint"] and info["started_at"]

    job_id = submit(conn, settings, request_id="req-e2e", n_images=2,
                    concepts=[ConceptEditIn(name="red")])
    rec = wait_status(conn, settings, job_id, wait_for, {"succeeded", "failed", "canceled"})
    assert rec.status == "succeeded", rec.error
    out = rec.outcome
    assert out is not None and out.seeds == [7, 8] and len(out.images) == 2
    assert [im["seed"] for im in out.images] == [7, 8]
    assert rec.progress == {"step": 20, "total": 20}
    assert meta(conn, job_id)["worker"] == "w-e2e" and rec.started_at is not None
    # The parameters actually used: every default filled in.
    red = out.parameters["concepts"][0]
    assert red["name"] == "red" and red["direction"] == "suppress"
    assert red["gamma"] > 0 and 0 < red["percentile"] < 100
    assert (out.parameters["width"], out.parameters["height"]) == (32, 32)
    assert out.provenance["bundle_sha256"] == TOY_BUNDLE_SHA
    assert out.provenance["steering_recipe"] == {"name": "translate", "gate": True, "latch": True}
    assert out.provenance["steering_swaps"]["red"] == "green"  # what red is replaced with
    assert out.provenance["pipeline_fingerprint"] == info["fingerprint"]
    assert out.provenance["scheduler"]["class_name"] == "DDIMScheduler"
    assert len(out.detection) == 2 and "red" in out.detection[0]
    assert {"generate_s", "run_s", "queued_s"} <= set(out.timings)

    for im in out.images:
        chunks = read_png_text(images.path(im["id"]))
        assert chunks["parameters"].startswith("a red circle\nSteps: 20, Sampler: DDIM, ")
        assert f"Seed: {im['seed']}, Size: 32x32" in chunks["parameters"]
        assert 'Steering: "-red:' in chunks["parameters"]
        stored = json.loads(chunks["sae-steering"])
        assert stored["generation_id"] == job_id and stored["seed"] == im["seed"]
        assert stored["provenance"]["bundle_sha256"] == TOY_BUNDLE_SHA
        assert stored["parameters"] == out.parameters

    assert read_histogram(conn, "step_latency_seconds")[1] == 20
    assert read_histogram(conn, "generation_latency_seconds")[1] == 1
    assert not conn.smembers(active_key("key-1"))  # the owner's slot is free again
    # The request id of the submitting API call is on the worker's log lines for the job.
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert any(line.get("request_id") == "req-e2e" and line.get("job_id") == job_id
               and line["message"] == "generation finished" for line in lines)
    # Retention: the maintenance sweep removed the expired image and kept the fresh one.
    wait_for(lambda: not images.path(expired).exists(), timeout=30, what="the sweep")
    assert images.path(kept).exists()


def test_cancel_frees_the_worker_and_sigterm_finishes_the_current_job(conn, settings, spawn,
                                                                      wait_for):
    worker = spawn("w-cancel")
    wait_ready(conn, worker, wait_for)
    first = submit(conn, settings, steps=LONG)
    second = submit(conn, settings, steps=200)
    wait_step(conn, first, wait_for, 3)
    request_cancel(conn, first, 60)
    rec = wait_status(conn, settings, first, wait_for, {"succeeded", "failed", "canceled"})
    assert rec.status == "canceled"
    assert rec.progress is not None and 3 <= rec.progress["step"] < LONG
    assert rec.error == f"canceled after step {rec.progress['step']} of {LONG}"
    assert not (rec.outcome and rec.outcome.images)

    # The same worker takes the next job at once; SIGTERM mid-job lets it finish, then exit.
    wait_step(conn, second, wait_for, 2)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(90) == 0, worker.log()[-3000:]
    rec = record(conn, settings, second)
    assert rec.status == "succeeded" and rec.progress == {"step": 200, "total": 200}
    assert rec.outcome is not None and len(rec.outcome.images) == 1
    # Heartbeats kept the running job's entry alive (polling cleans the registry): never
    # taken for abandoned, its retry unused.
    assert Job.fetch(second, connection=conn).retries_left == 1
    assert not any(w["name"] == "w-cancel" for w in live_workers(conn))


def test_sigkill_mid_job_is_finished_by_another_worker(conn, settings, spawn, wait_for):
    workers = {name: spawn(name) for name in ("w-a", "w-b")}
    for worker in workers.values():
        wait_ready(conn, worker, wait_for)
    job_id = submit(conn, settings, steps=150)
    wait_step(conn, job_id, wait_for, 2)
    holder = meta(conn, job_id)["worker"]
    other = next(name for name in workers if name != holder)
    workers[holder].proc.send_signal(signal.SIGKILL)
    workers[holder].proc.wait(10)

    rec = wait_status(conn, settings, job_id, wait_for, {"succeeded", "failed", "canceled"})
    assert rec.status == "succeeded", rec.error
    assert meta(conn, job_id)["worker"] == other
    assert rec.outcome is not None and rec.outcome.provenance["worker"] == other
    assert rec.progress == {"step": 150, "total": 150}
    assert Job.fetch(job_id, connection=conn).retries_left == 0  # its one retry is used
    # The dead worker's record expires with its heartbeat; the survivor's stays.
    wait_for(lambda: {w["name"] for w in live_workers(conn)} == {other}, timeout=30,
             what="the killed worker's record to expire")


# -- the job function in this process ------------------------------------------------------

@pytest.fixture
def in_process(settings: Settings) -> runner.WorkerRuntime:
    """The toy pipeline loaded in this process (once per session) for ``settings``."""
    return runner.configure(settings)


def test_cancel_stops_within_one_step(conn, settings, in_process, monkeypatch):
    job_id = submit(conn, settings, steps=50)
    step_and_report = runner._Progress.__call__

    def cancel_at_step_5(self, step: int, total: int) -> None:
        step_and_report(self, step, total)
        if step == 5:
            request_cancel(self.conn, self.job_id, 60)

    monkeypatch.setattr(runner._Progress, "__call__", cancel_at_step_5)
    run_queued(conn, settings)
    rec = record(conn, settings, job_id)
    assert rec.status == "canceled" and rec.progress == {"step": 5, "total": 50}
    assert read_histogram(conn, "step_latency_seconds")[1] == 5  # step 6 never ran


def test_cancel_before_start_bad_edit_and_timeout_end_as_outcomes(conn, settings, in_process):
    canceled = submit(conn, settings)
    request_cancel(conn, canceled, 60)
    unknown = submit(conn, settings, concepts=[ConceptEditIn(name="purple")])
    out_of_range = submit(conn, settings, concepts=[ConceptEditIn(name="red", gamma=1e9)])
    too_slow = submit(conn, settings, steps=LONG, timeout_s=1)
    run_queued(conn, settings)

    rec = record(conn, settings, canceled)
    assert rec.status == "canceled" and rec.error == "canceled before it started"
    rec = record(conn, settings, unknown)
    assert rec.status == "failed" and rec.error is not None
    assert rec.error.startswith("concept: unknown concept 'purple'; known: ")
    assert "red" in rec.error
    rec = record(conn, settings, out_of_range)
    assert rec.status == "failed" and rec.error is not None and rec.error.startswith("gamma: ")
    rec = record(conn, settings, too_slow)
    assert rec.status == "failed" and rec.error == "the job exceeded its time limit (1 s)"
    # The job function ended each one itself: RQ kept its single retry for a dead worker.
    assert all(Job.fetch(i, connection=conn).retries_left == 1
               for i in (canceled, unknown, out_of_range, too_slow))
    assert not conn.smembers(active_key("key-1"))
    assert not list(settings.images_dir.glob("*.png"))


class _DyingWorker(SimpleWorker):
    """Takes a job and "dies" at once: its heartbeat lapses after one second."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return 1

    def take_and_die(self, queue: Queue) -> None:
        result = queue.dequeue_any([queue], None, connection=self.connection)
        assert result is not None, "no job to take"
        job, _ = result
        self.prepare_execution(job)
        self.prepare_job_execution(job)


def test_job_of_workers_that_died_twice_is_failed_with_the_reason(conn, settings, wait_for):
    queue = Queue(settings.queue_name, connection=conn)
    job_id = submit(conn, settings)
    for attempt in (1, 2):
        _DyingWorker([queue], connection=conn, name=f"dying-{attempt}").take_and_die(queue)
        assert record(conn, settings, job_id).status == "running"
        expected = "queued" if attempt == 1 else "failed"
        rec = wait_status(conn, settings, job_id, wait_for, {expected}, timeout=30)
    assert rec.error is not None and "stopped responding" in rec.error
