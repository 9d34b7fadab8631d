"""`Prefer: wait` at scale: many requests waiting on one job must not lock other keys out
(each used to hold a pooled Redis connection in a blocking XREAD), a key's concurrent waits
are capped, waiters wake when the job ends, and replays of an Idempotency-Key count towards
the rate limit. A live gateway (uvicorn) with a 20-connection pool, no worker: the job stays
queued until the test cancels it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service import auth
from tests.service.api_support import body
from tests.service.conftest import fast_settings
from tests.service.live_support import serving

POOL = 20
WAITERS = 200


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(tmp_path, redis_url):
    return fast_settings(tmp_path / "data", redis_url, auth_enabled=True,
                         redis_max_connections=POOL, wait_max_per_key=WAITERS,
                         rate_limit_per_minute=10_000, per_key_max_queued=1000)


def test_two_hundred_waiters_leave_other_keys_served_and_wake_when_the_job_ends(settings,
                                                                                conn):
    _, waiter_key = auth.create_key(conn, "waiter")
    _, other_key = auth.create_key(conn, "other")

    async def scenario(base: str) -> tuple[list[httpx.Response], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=WAITERS + 50, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            first = await client.post("/v1/generations", json=body(),
                                      headers={**bearer(waiter_key), "Idempotency-Key": "k1"})
            assert first.status_code == 202
            job = first.json()["id"]
            waits = [asyncio.create_task(client.post(
                "/v1/generations", json=body(),
                headers={**bearer(waiter_key), "Idempotency-Key": "k1", "Prefer": "wait=30"}))
                for _ in range(WAITERS)]
            await asyncio.sleep(3)  # every waiter is parked by now
            assert not any(w.done() for w in waits)
            others = []
            for _ in range(20):
                for path in ("/v1/concepts", "/v1/policy", f"/v1/generations/{job}"):
                    headers = bearer(other_key if "generations" not in path else waiter_key)
                    others.append(await client.get(path, headers=headers))
                others.append(await client.post("/v1/generations", json=body(),
                                                headers=bearer(other_key)))
            cancel = await client.post(f"/v1/generations/{job}/cancel",
                                       headers=bearer(waiter_key))
            assert cancel.status_code == 200, cancel.text
            done = await asyncio.wait_for(asyncio.gather(*waits), timeout=20)
            return others, list(done)

    with serving(settings) as base:
        others, done = asyncio.run(scenario(base))
    bad = [(r.request.url.path, r.status_code, r.text[:200]) for r in others
           if r.status_code not in (200, 202)]
    assert not bad, bad
    # woken by the job's end (canceled while queued writes no result; the status check sees it)
    assert {r.status_code for r in done} == {200}
    assert {r.json()["status"] for r in done} == {"canceled"}


def test_a_key_past_its_concurrent_waits_is_answered_at_once(settings, conn):
    settings = settings.model_copy(update={"wait_max_per_key": 3})
    _, token = auth.create_key(conn, "waiter")

    async def scenario(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            headers = {**bearer(token), "Idempotency-Key": "k2", "Prefer": "wait=4"}
            parked = [asyncio.create_task(client.post("/v1/generations", json=body(),
                                                      headers=headers)) for _ in range(3)]
            await asyncio.sleep(1)
            extra = await client.post("/v1/generations", json=body(), headers=headers)
            assert not any(p.done() for p in parked)  # still waiting when the extra returned
            return [extra, *await asyncio.gather(*parked)]

    with serving(settings) as base:
        extra, *parked = asyncio.run(scenario(base))
    assert extra.status_code == 200  # the replay's answer, given at once
    assert "Preference-Applied" not in extra.headers
    assert all(p.headers.get("Preference-Applied") == "wait=4" for p in parked)


def test_idempotent_replays_count_towards_the_rate_limit(tmp_path, redis_url, conn):
    settings = fast_settings(tmp_path / "data", redis_url, auth_enabled=True,
                             rate_limit_per_minute=5, per_key_max_queued=1000)
    _, token = auth.create_key(conn, "replayer")
    headers = {**bearer(token), "Idempotency-Key": "same"}
    with serving(settings) as base:
        codes = [httpx.post(f"{base}/v1/generations", json=body(), headers=headers,
                            timeout=10).status_code for _ in range(8)]
    assert codes[0] == 202 and codes[1:5] == [200] * 4, codes
    assert codes[5:] == [429] * 3, codes
