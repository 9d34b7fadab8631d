"""Faults (beyond the serving tests): every worker gone, Redis killed and restarted
(AOF, a private server), the API restarted mid-job, a full disk for images, a corrupt bundle
at worker start. Acknowledged jobs are never lost; each fault says what happened."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import PIL.Image
import pytest
import redis

from service import runner
from service.settings import REPO_ASSETS
from tests.service.api_support import api_client, body, poll
from tests.service.conftest import PrivateRedis, fast_settings, free_port
from tests.service.worker_support import (
    LONG,
    ROOT,
    record,
    run_queued,
    start_worker,
    submit,
    wait_ready,
    wait_status,
)


def test_jobs_wait_while_no_worker_is_alive_and_run_when_one_comes_back(settings, conn, spawn,
                                                                         wait_for):
    with api_client(settings) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and int(ready.headers["Retry-After"]) >= 1
        job = client.post("/v1/generations", json=body()).json()
        assert client.get(job["links"]["self"]).json()["status"] == "queued"
        worker = spawn("late")
        wait_ready(conn, worker, wait_for)
        assert client.get("/readyz").status_code == 200
        assert poll(client, job["links"]["self"], wait_for)["status"] == "succeeded"
        worker.proc.kill()
        worker.proc.wait(10)
        # the dead worker's heartbeat runs out: not ready again, new jobs wait
        wait_for(lambda: client.get("/readyz").status_code == 503, timeout=30,
                 what="readyz to notice the worker is gone", interval=0.5)
        waiting = client.post("/v1/generations", json=body()).json()
        assert client.get(waiting["links"]["self"]).json()["status"] == "queued"


def test_polling_resumes_on_a_restarted_api_while_the_job_keeps_running(settings, conn, spawn,
                                                                         wait_for):
    wait_ready(conn, spawn("steady"), wait_for)
    with api_client(settings) as first:
        job = first.post("/v1/generations", json=body(steps=LONG // 5)).json()
        wait_for(lambda: first.get(job["links"]["self"]).json()["status"] == "running",
                 timeout=60, what="the job to start")
    with api_client(settings) as second:  # a new gateway process, same Redis
        done = poll(second, job["links"]["self"], wait_for)
        assert done["status"] == "succeeded" and done["progress"]["step"] == LONG // 5


def test_acknowledged_jobs_survive_a_redis_crash_with_aof(tmp_path, wait_for):
    server = PrivateRedis(free_port(), aof_dir=tmp_path / "redis")
    server.aof_dir.mkdir()
    server.start()
    settings = fast_settings(tmp_path / "data", server.url)
    worker = None
    try:
        with api_client(settings) as client:
            accepted = [client.post("/v1/generations", json=body(seed=i)) for i in range(4)]
            assert [r.status_code for r in accepted] == [202] * 4
            server.kill()  # a crash: whatever was acknowledged must be on disk already
            down = client.post("/v1/generations", json=body())
            assert down.status_code == 503 and int(down.headers["Retry-After"]) >= 1
            assert client.get(accepted[0].json()["links"]["self"]).status_code == 503
            server.start()  # replays the AOF
            worker = start_worker(settings, "after-crash", tmp_path)
            conn = redis.Redis.from_url(server.url)
            wait_ready(conn, worker, wait_for)
            for r in accepted:
                assert poll(client, r.json()["links"]["self"], wait_for)["status"] == "succeeded"
            assert client.post("/v1/generations", json=body()).status_code == 202
    finally:
        if worker is not None and worker.alive():
            worker.proc.kill()
            worker.proc.wait(10)
        server.stop()


@contextlib.contextmanager
def worker_on_aof_redis(tmp_path: Path, name: str, wait_for) -> Iterator[tuple]:
    """A private Redis with AOF and a registered worker on it: (server, settings, conn,
    worker); both are stopped afterwards."""
    server = PrivateRedis(free_port(), aof_dir=tmp_path / "redis")
    server.aof_dir.mkdir()
    server.start()
    settings = fast_settings(tmp_path / "data", server.url)
    conn = redis.Redis.from_url(server.url)
    worker = start_worker(settings, name, tmp_path)
    try:
        wait_ready(conn, worker, wait_for)
        yield server, settings, conn, worker
    finally:
        if worker.alive():
            worker.proc.kill()
            worker.proc.wait(10)
        server.stop()


def finish_and_go_on(conn, settings, job_id, worker, wait_for) -> None:
    """The job succeeds after the fault, and the worker takes the next one."""
    done = wait_status(conn, settings, job_id, wait_for,
                       {"succeeded", "failed", "canceled"}, timeout=120, worker=worker)
    assert done.status == "succeeded", (done.error, worker.log()[-3000:])
    follow_up = submit(conn, settings, steps=2)
    assert wait_status(conn, settings, follow_up, wait_for, {"succeeded", "failed"},
                       worker=worker).status == "succeeded"


def test_a_worker_rides_out_a_redis_restart_mid_job(tmp_path, wait_for):
    with worker_on_aof_redis(tmp_path, "restart", wait_for) as (server, settings, conn, worker):
        job_id = submit(conn, settings, steps=LONG // 5)
        wait_status(conn, settings, job_id, wait_for, {"running"})
        server.stop()  # a restart: SIGTERM, AOF flushed
        server.start()
        finish_and_go_on(conn, settings, job_id, worker, wait_for)


def test_a_worker_survives_a_redis_outage_that_outlasts_its_job(tmp_path, wait_for):
    """Redis stays down until RQ's loop gives up (the job cannot report) and cannot record
    the worker's death, so the AOF brings back the worker's RQ record as alive. The worker
    must take over its own record (RQ refuses a second birth under the same name) and run
    the job again."""
    with worker_on_aof_redis(tmp_path, "outage", wait_for) as (server, settings, conn, worker):
        job_id = submit(conn, settings, steps=LONG // 10)
        wait_status(conn, settings, job_id, wait_for, {"running"})
        server.stop()
        wait_for(lambda: "quitting" in worker.log(), timeout=60,
                 what="RQ's loop to quit while Redis is down")
        server.start()
        finish_and_go_on(conn, settings, job_id, worker, wait_for)


def test_a_full_disk_fails_the_job_with_the_reason_and_the_worker_keeps_serving(
        conn, settings, monkeypatch):
    runner.configure(settings)
    full = submit(conn, settings, steps=2, n_images=2)
    real_save = PIL.Image.Image.save

    def no_space(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", no_space)
    run_queued(conn, settings)
    failed = record(conn, settings, full)
    assert failed.status == "failed"
    assert "No space left on device" in failed.error and "free space" in failed.error
    assert str(settings.data_dir) not in failed.error  # no server path in the client's error
    assert not [p for p in settings.images_dir.iterdir()], "a half-written image was left"

    monkeypatch.setattr(PIL.Image.Image, "save", real_save)
    fine = submit(conn, settings, steps=2)
    run_queued(conn, settings)
    assert record(conn, settings, fine).status == "succeeded"


@pytest.mark.parametrize("damage", ["sae.safetensors", "manifest.json", "detectors.safetensors"])
def test_a_worker_refuses_to_start_on_a_corrupt_bundle_and_names_the_file(settings, tmp_path,
                                                                          damage):
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO_ASSETS / "toy-bundle", bundle)
    path = bundle / damage
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    worker = start_worker(settings.model_copy(update={"bundle_dir": bundle}), "corrupt",
                          tmp_path)
    assert worker.proc.wait(120) != 0
    log = worker.log()
    assert damage in log, log[-2000:]


def test_the_embedded_server_and_compose_persist_with_aof(tmp_path, wait_for):
    import yaml

    from service.embedded import EmbeddedRedis

    with EmbeddedRedis(tmp_path / "valkey") as url:
        conn = redis.Redis.from_url(url)
        assert conn.config_get("appendonly") == {"appendonly": "yes"}
        job_id = submit(conn, fast_settings(tmp_path / "data", url))
    with EmbeddedRedis(tmp_path / "valkey") as url:  # `steer serve` again, same data folder
        conn = redis.Redis.from_url(url)
        assert record(conn, fast_settings(tmp_path / "data", url), job_id).status == "queued"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert "--appendonly" in compose["services"]["redis"]["command"]
    assert compose["services"]["redis"]["command"][
        compose["services"]["redis"]["command"].index("--appendonly") + 1] == "yes"


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs (CI runs as root; elsewhere the test is skipped with the reason)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8); CI runs as root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the disk is full."""
    with open(path, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def test_a_full_disk_in_embedded_mode_is_503_until_space_is_back(small_disk, tmp_path,
                                                                wait_for):
    """Images and the embedded server's append-only file share the data folder. When the
    disk fills, the server refuses writes (MISCONF, even PING): the gateway answers 503 with
    Retry-After (it answered 500), /readyz too, the worker waits instead of dying on the
    error, and once space is freed everything acknowledged runs."""
    from service.embedded import EmbeddedRedis

    with EmbeddedRedis(small_disk / "valkey") as url:
        settings = fast_settings(small_disk / "data", url, image_reserve_mb=1)
        conn = redis.Redis.from_url(url)
        worker = start_worker(settings, "disk", tmp_path)  # its log is off the small disk
        try:
            wait_ready(conn, worker, wait_for)
            with api_client(settings) as c:
                acknowledged: list[str] = []

                def submit_until(status: int) -> object:
                    r = c.post("/v1/generations", json=body())
                    if r.status_code == 202:
                        acknowledged.append(r.json()["links"]["self"])
                    return r.status_code == status and r

                first = c.post("/v1/generations", json=body()).json()
                assert poll(c, first["links"]["self"], wait_for)["status"] == "succeeded"
                fill(small_disk / "filler")
                refused = wait_for(lambda: submit_until(503), timeout=15,
                                   what="the gateway to see the full disk")
                assert refused.headers["Retry-After"]
                assert "cannot write" in refused.json()["detail"]
                assert c.get("/readyz").status_code == 503
                (small_disk / "filler").unlink()
                wait_for(lambda: submit_until(202), timeout=30,
                         what="the gateway to accept jobs again")
                # every acknowledged job ends: run, or failed by name while the disk was full
                for link in acknowledged:
                    done = poll(c, link, wait_for)
                    assert done["status"] == "succeeded" or (
                        done["status"] == "failed" and "No space" in done["error"]), done
                assert done["status"] == "succeeded", (done, worker.log()[-3000:])
            assert worker.alive(), worker.log()[-3000:]
        finally:
            if worker.alive():
                worker.proc.kill()
                worker.proc.wait(10)
