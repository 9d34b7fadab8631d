"""Leaks: after a run of jobs of every kind and their retention time, no Redis key and
no image file is left behind — only what lives on purpose (API keys, the live worker's
registration, RQ's queue list) and short-lived counters that carry their own expiry."""

from __future__ import annotations

import time

from service import auth
from tests.service.api_support import api_client, body
from tests.service.conftest import fast_settings
from tests.service.worker_support import wait_ready

# The retention is also the longest a job may wait queued (RQ's ttl): short, but long enough
# for the eight jobs below to start on a busy 2-core machine.
RETENTION_S = 8
# Keys that exist on purpose while the service runs, whatever its history: API keys, the live
# worker's registrations and scheduler locks (refreshed while it lives), RQ's queue list, and
# the latency histograms behind /metrics (a fixed set of buckets per histogram).
PERSISTENT = ("steer:apikeys", "steer:apikey-hash:", "rq:workers", "rq:worker:", "rq:queues",
              "steer:worker:", "steer:workers", "rq:scheduler-lock:", "rq:scheduler:",
              "steer:metrics:", "rq:clean_groups")
# Keys that expire on their own within a bounded time after the last request: rate-limit
# counters (two windows) and cancel flags (the job timeout + 60 s).
SELF_EXPIRING = ("steer:rl:", "steer:cancel:")


def test_no_keys_or_images_outlive_their_retention(tmp_path, redis_url, conn, spawn, wait_for):
    settings = fast_settings(tmp_path / "data", redis_url, auth_enabled=True,
                             result_retention_s=RETENTION_S, idempotency_ttl_s=RETENTION_S,
                             maintenance_interval_s=1)
    _, token = auth.create_key(conn, "alice")
    wait_ready(conn, spawn("leaks", settings), wait_for)
    images = settings.images_dir
    with api_client(settings, Authorization=f"Bearer {token}") as client:
        jobs = [client.post("/v1/generations", json=body(n_images=2, seed=i)).json()
                for i in range(3)]
        jobs.append(client.post("/v1/generations", json=body(),
                                headers={"Idempotency-Key": "leak-check"}).json())
        batch = client.post("/v1/batches", json={"requests": [body(seed=9), body(seed=10)]})
        assert batch.status_code == 202
        canceled = client.post("/v1/generations", json=body(steps=150)).json()
        client.post(f"/v1/generations/{canceled['id']}/cancel")
        deleted = client.post("/v1/generations", json=body()).json()
        # Watch every job in one loop: polled one after another, a job finished while an
        # earlier one was awaited could expire (the short retention) before its first poll.
        urls = [job["links"]["self"] for job in jobs]
        urls += [f"/v1/batches/{batch.json()['id']}", canceled["links"]["self"],
                 deleted["links"]["self"]]
        final: dict[str, str] = {}

        def all_final() -> bool:
            for url in urls:
                if url not in final:
                    status = client.get(url).json().get("status")
                    if status in ("succeeded", "failed", "canceled"):
                        final[url] = status
            return len(final) == len(urls)

        wait_for(all_final, timeout=120, what="every job to finish", interval=0.1)
        assert [final[job["links"]["self"]] for job in jobs] == ["succeeded"] * len(jobs)
        assert client.delete(f"/v1/generations/{deleted['id']}").status_code == 204
        assert any(images.iterdir()), "the jobs wrote no images"

    bound = max(2 * 60 + 1, settings.job_timeout_s + 60)

    def leftovers() -> list[str]:
        out = []
        for raw in conn.scan_iter(count=1000):
            key = raw.decode()
            if key.startswith(PERSISTENT):
                continue
            ttl = conn.ttl(key)
            if key.startswith(SELF_EXPIRING) and 0 < ttl <= bound:
                continue
            out.append(f"{key} (ttl {ttl})")
        return sorted(out)

    def clean() -> bool:
        return not leftovers() and not [p for p in images.iterdir() if p.is_file()]

    time.sleep(RETENTION_S)
    try:
        wait_for(clean, timeout=RETENTION_S + 30, what="retention to clear Redis and images",
                 interval=0.5)
    except AssertionError:
        files = sorted(p.name for p in images.iterdir())
        raise AssertionError(f"left behind after retention: keys {leftovers()}, "
                             f"files {files}") from None
