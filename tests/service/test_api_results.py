"""Finished jobs through the gateway: a real SteerWorker runs in this process (burst mode, toy
pipeline, 2 steps), then the API shows the result, serves the PNG by its signed link, waits
with ``Prefer: wait``, deletes job and images, and /metrics and /readyz see the worker."""

from __future__ import annotations

import json
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
from rq import Queue

from service.images import PARAMETERS_CHUNK, PROVENANCE_CHUNK, read_png_text
from service.worker import SteerWorker
from service.worker_registry import register_worker, server_time, worker_key
from tests.service.api_support import api_client, body


@pytest.fixture
def client(settings):
    with api_client(settings) as c:
        yield c


def run_worker(settings, conn) -> None:
    """Run every queued job in this process (the pipeline loads once per process)."""
    SteerWorker.create(settings, connection=conn).work(burst=True)


def test_a_finished_job_shows_images_seeds_timings_and_provenance(client, settings, conn):
    gen = client.post("/v1/generations", json=body(
        seed=5, n_images=2, concepts=[{"name": "red"}], width=32, height=32)).json()
    run_worker(settings, conn)
    done = client.get(f"/v1/generations/{gen['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["seeds"] == [5, 6] and [im["seed"] for im in done["images"]] == [5, 6]
    assert done["queue_position"] is None and done["error"] is None
    assert done["progress"] == {"step": 2, "total": 2}
    red = done["parameters"]["concepts"][0]
    assert red["name"] == "red" and red["gamma"] > 0  # defaults filled by the worker
    assert done["provenance"]["bundle_sha256"] == client.get("/v1/concepts").json()[
        "bundle_sha256"]
    timings = done["timings"]
    assert timings["started_at"] and timings["finished_at"]
    assert timings["generate_s"] > 0 and timings["run_s"] >= timings["generate_s"] * 0.5

    url = done["images"][0]["url"]
    png = client.get(url)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG")
    assert "private" in png.headers["cache-control"]
    image_path = settings.images_dir / f"{done['images'][0]['id']}.png"
    text = read_png_text(image_path)
    assert "Seed: 5" in text[PARAMETERS_CHUNK] and PROVENANCE_CHUNK in text


def test_image_links_are_signed_expiring_and_uuid_only(client, settings, conn):
    gen = client.post("/v1/generations", json=body()).json()
    run_worker(settings, conn)
    image = client.get(f"/v1/generations/{gen['id']}").json()["images"][0]
    parts = urlsplit(image["url"])
    query = parse_qs(parts.query)
    exp, sig = query["exp"][0], query["sig"][0]
    path = parts.path
    assert client.get(f"{path}?exp={exp}&sig={sig}").status_code == 200
    forged = ("0" if sig[0] != "0" else "1") + sig[1:]
    assert client.get(f"{path}?exp={exp}&sig={forged}").status_code == 403
    assert client.get(f"{path}?exp={int(exp) + 60}&sig={sig}").status_code == 403
    assert client.get(path).status_code == 403
    from service.images import ImageStore

    expired = ImageStore.from_settings(settings).signed_url(image["id"], "", ttl_s=-3600)
    r = client.get(expired)
    assert r.status_code == 403 and "expired" in r.json()["detail"]
    for bad in ("not-a-uuid", "..", str(uuid.uuid4()).upper()):
        assert client.get(f"/v1/images/{bad}.png?exp={exp}&sig={sig}").status_code == 404
    missing = ImageStore.from_settings(settings).signed_url(str(uuid.uuid4()), "")
    assert client.get(missing).status_code == 404


def test_prefer_wait_answers_200_with_the_finished_job(client, settings, conn):
    answer: dict = {}

    def submit() -> None:
        answer["r"] = client.post("/v1/generations", json=body(),
                                  headers={"Prefer": "wait=60"})

    thread = threading.Thread(target=submit)
    thread.start()
    queue = Queue(settings.queue_name, connection=conn)
    deadline = time.monotonic() + 30
    while queue.count == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    run_worker(settings, conn)
    thread.join(60)
    r = answer["r"]
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded" and len(r.json()["images"]) == 1
    assert r.headers["Preference-Applied"] == "wait=60"


def test_delete_removes_a_finished_job_and_its_images(client, settings, conn):
    gen = client.post("/v1/generations", json=body(n_images=2)).json()
    run_worker(settings, conn)
    images = client.get(f"/v1/generations/{gen['id']}").json()["images"]
    paths = [settings.images_dir / f"{im['id']}.png" for im in images]
    assert all(p.is_file() for p in paths)
    assert client.delete(f"/v1/generations/{gen['id']}").status_code == 204
    assert not any(p.exists() for p in paths)
    assert client.get(f"/v1/generations/{gen['id']}").status_code == 404
    assert client.get(images[0]["url"]).status_code == 404


def test_batch_of_finished_jobs_succeeds_as_a_whole(client, settings, conn):
    batch = client.post("/v1/batches", json={"requests": [body(seed=i) for i in range(3)]})
    run_worker(settings, conn)
    polled = client.get(f"/v1/batches/{batch.json()['id']}").json()
    assert polled["status"] == "succeeded" and polled["counts"] == {"succeeded": 3}
    assert [g["seeds"] for g in polled["generations"]] == [[0], [1], [2]]


def test_metrics_and_readiness_see_jobs_and_workers(client, settings, conn):
    client.post("/v1/generations", json=body())
    run_worker(settings, conn)
    text = client.get("/metrics").text
    assert 'steer_jobs{status="finished"} 1.0' in text
    assert "steer_step_latency_seconds_count 2.0" in text
    assert "steer_generation_latency_seconds_count 1.0" in text
    assert 'steer_http_requests_total{method="POST",route="/v1/generations",status="202"}' in text

    assert client.get("/readyz").status_code == 503  # the burst worker has unregistered
    sha = client.get("/v1/concepts").json()["bundle_sha256"]
    register_worker(conn, "other", {"bundle_sha256": "0" * 64}, 30)
    r = client.get("/readyz")
    assert r.status_code == 503 and "1 other worker" in r.json()["detail"]
    register_worker(conn, "other-policy", {"bundle_sha256": sha, "policy_sha256": "1" * 64}, 30)
    r = client.get("/readyz")  # same bundle, but it enforces another policy file
    assert r.status_code == 503 and "2 other worker" in r.json()["detail"]
    register_worker(conn, "ours", {"bundle_sha256": sha, "policy_sha256": None}, 30)
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "bundle_sha256": sha, "policy_sha256": None,
                        "workers": 1, "workers_other_bundle": 2}


def test_readiness_ignores_a_worker_record_that_stopped_beating(client, conn):
    """A Redis restarted from its AOF restores a dead worker's record with its old TTL:
    /readyz and /metrics count only records whose last beat (Redis's clock) is recent."""
    sha = client.get("/v1/concepts").json()["bundle_sha256"]
    stale = {"bundle_sha256": sha, "policy_sha256": None,
             "beat_at": server_time(conn) - 600}
    conn.set(worker_key("restored"), json.dumps(stale), ex=60)
    assert client.get("/readyz").status_code == 503
    assert "steer_workers 0.0" in client.get("/metrics").text
    register_worker(conn, "beating", {"bundle_sha256": sha, "policy_sha256": None}, 30)
    assert client.get("/readyz").json()["workers"] == 1
    assert "steer_workers 1.0" in client.get("/metrics").text


def test_delete_while_running_cancels_then_removes(client, settings, conn):
    gen = client.post("/v1/generations", json=body(steps=150)).json()
    answer: dict = {}

    def delete_once_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            view = client.get(f"/v1/generations/{gen['id']}").json()
            if view["status"] == "running" and (view["progress"] or {}).get("step", 0) >= 1:
                answer["status"] = view["status"]
                answer["r"] = client.delete(f"/v1/generations/{gen['id']}")
                return
            time.sleep(0.02)

    thread = threading.Thread(target=delete_once_running)
    thread.start()
    run_worker(settings, conn)  # returns once the canceled job has ended
    thread.join(60)
    assert answer["status"] == "running"
    assert answer["r"].status_code == 204, answer["r"].text
    assert client.get(f"/v1/generations/{gen['id']}").status_code == 404
    assert not list(settings.images_dir.glob("*.png"))
