"""Concurrent requests of one key against a live gateway (no worker: jobs stay queued): the
per-key cap holds under 50 simultaneous submissions, and retries of an Idempotency-Key whose
job was deleted make exactly one new job."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from rq import Queue

from service import auth
from service.jobstore import active_key
from tests.service.api_support import body
from tests.service.conftest import fast_settings
from tests.service.live_support import serving


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def settings(tmp_path, redis_url):
    return fast_settings(tmp_path / "data", redis_url, auth_enabled=True,
                         rate_limit_per_minute=10_000, per_key_max_queued=5)


async def burst(base: str, n: int, headers: dict[str, str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=60,
                                 limits=httpx.Limits(max_connections=n)) as client:
        return list(await asyncio.gather(*(
            client.post("/v1/generations", json=body(seed=i), headers=headers)
            for i in range(n))))


def test_fifty_simultaneous_submissions_never_pass_the_per_key_cap(settings, conn):
    key, token = auth.create_key(conn, "racer")
    with serving(settings) as base:
        answers = asyncio.run(burst(base, 50, bearer(token)))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {202, 429}, codes
    assert codes.count(202) == 5, codes
    assert len(Queue(settings.queue_name, connection=conn)) == 5
    assert conn.scard(active_key(key.id)) == 5  # refused submissions hold no slot


def test_retries_after_delete_make_exactly_one_new_job(settings, conn):
    settings = settings.model_copy(update={"per_key_max_queued": 100})
    _, token = auth.create_key(conn, "retrier")
    headers = {**bearer(token), "Idempotency-Key": "after-delete"}

    async def scenario(base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60,
                                     limits=httpx.Limits(max_connections=30)) as client:
            first = await client.post("/v1/generations", json=body(), headers=headers)
            gone = first.json()["id"]
            deleted = await client.delete(f"/v1/generations/{gone}", headers=bearer(token))
            assert deleted.status_code == 204, deleted.text
            return list(await asyncio.gather(*(
                client.post("/v1/generations", json=body(), headers=headers)
                for _ in range(20))))

    with serving(settings) as base:
        retries = asyncio.run(scenario(base))
    assert {r.status_code for r in retries} <= {200, 202}, [r.text for r in retries]
    assert len({r.json()["id"] for r in retries}) == 1
    assert len(Queue(settings.queue_name, connection=conn)) == 1


def test_one_keys_backlog_never_holds_back_another_keys_first_job(settings, conn):
    """A key with nothing queued or running has its job taken next; its further jobs queue
    behind everyone's."""
    from tests.service.api_support import api_client

    settings = settings.model_copy(update={"per_key_max_queued": 100})
    _, busy = auth.create_key(conn, "busy")
    _, fresh = auth.create_key(conn, "fresh")
    queue = Queue(settings.queue_name, connection=conn)
    with api_client(settings) as c:
        backlog = [c.post("/v1/generations", json=body(seed=i), headers=bearer(busy)).json()
                   for i in range(5)]
        assert [g["queue_position"] for g in backlog] == [0, 1, 2, 3, 4]  # busy was idle
        first = c.post("/v1/generations", json=body(), headers=bearer(fresh)).json()
        second = c.post("/v1/generations", json=body(seed=9), headers=bearer(fresh)).json()
    assert first["queue_position"] == 0 and second["queue_position"] == 6
    assert queue.job_ids[0] == first["id"] and queue.job_ids[-1] == second["id"]
    assert queue.job_ids[1:6] == [g["id"] for g in backlog]
