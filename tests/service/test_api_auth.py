"""API keys (401), per-key rate limit and job cap (429 + Retry-After), global queue depth
(503 + Retry-After), and the `steer keys` commands; real Redis, no worker."""

from __future__ import annotations

import pytest
from rq import Queue
from typer.testing import CliRunner

from service import auth
from service.cli_keys import keys_app
from service.ratelimit import WINDOW_S, seconds_until_allowed
from tests.service.api_support import api_client, body
from tests.service.conftest import fast_settings


@pytest.fixture
def secure(tmp_path, redis_url):
    """Settings with auth on and small limits."""
    return fast_settings(tmp_path / "data", redis_url, auth_enabled=True,
                         rate_limit_per_minute=1000, per_key_max_queued=1000)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_key_or_a_bad_key_is_401_with_www_authenticate(secure, conn):
    _, token = auth.create_key(conn, "alice")
    with api_client(secure) as c:
        for headers in ({}, bearer("steer_nope"), bearer("not-even-prefixed"),
                        {"Authorization": f"Basic {token}"}):
            for method, path in (("post", "/v1/generations"), ("get", "/v1/concepts")):
                r = c.request(method, path, json=body(), headers=headers)
                assert r.status_code == 401, (headers, path)
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert r.json()["detail"]
        assert c.post("/v1/generations", json=body(), headers=bearer(token)).status_code == 202
        assert c.get("/healthz").status_code == 200  # operations endpoints need no key


def test_keys_are_stored_hashed_and_revocation_is_immediate(secure, conn):
    key, token = auth.create_key(conn, "bob")
    stored = b"".join(conn.hvals(auth.KEYS_HASH)) + b"".join(
        conn.get(k) or b"" for k in conn.scan_iter("steer:apikey-hash:*"))
    assert token.encode() not in stored and token[len("steer_"):].encode() not in stored
    assert auth.authenticate(conn, token) == key.id
    with api_client(secure) as c:
        assert c.get("/v1/concepts", headers=bearer(token)).status_code == 200
        assert auth.revoke_key(conn, key.id) is not None
        assert c.get("/v1/concepts", headers=bearer(token)).status_code == 401
    assert auth.revoke_key(conn, key.id) is None


def test_a_key_sees_only_its_own_jobs(secure, conn):
    _, alice = auth.create_key(conn, "alice")
    _, bob = auth.create_key(conn, "bob")
    with api_client(secure) as c:
        gen = c.post("/v1/generations", json=body(), headers=bearer(alice)).json()
        batch = c.post("/v1/batches", json={"requests": [body()]}, headers=bearer(alice)).json()
        assert c.get(f"/v1/generations/{gen['id']}", headers=bearer(alice)).status_code == 200
        assert c.get(f"/v1/generations/{gen['id']}", headers=bearer(bob)).status_code == 404
        assert c.post(f"/v1/generations/{gen['id']}/cancel",
                      headers=bearer(bob)).status_code == 404
        assert c.delete(f"/v1/generations/{gen['id']}", headers=bearer(bob)).status_code == 404
        assert c.get(f"/v1/batches/{batch['id']}", headers=bearer(bob)).status_code == 404


def test_rate_limit_is_per_key_with_retry_after(tmp_path, redis_url, conn):
    settings = fast_settings(tmp_path / "data", redis_url, auth_enabled=True,
                             rate_limit_per_minute=3)
    _, alice = auth.create_key(conn, "alice")
    _, bob = auth.create_key(conn, "bob")
    with api_client(settings) as c:
        codes = [c.post("/v1/generations", json=body(), headers=bearer(alice)).status_code
                 for _ in range(3)]
        assert codes == [202, 202, 202]
        r = c.post("/v1/generations", json=body(), headers=bearer(alice))
        assert r.status_code == 429
        assert 1 <= int(r.headers["Retry-After"]) <= 2 * WINDOW_S
        assert "rate limit" in r.json()["detail"]
        # polling is not rate limited; another key has its own budget
        gen_id = c.get("/v1/concepts", headers=bearer(alice))
        assert gen_id.status_code == 200
        assert c.post("/v1/generations", json=body(), headers=bearer(bob)).status_code == 202


def test_sliding_window_retry_after():
    # 3 per minute, all three used in the previous window, 30 s into this one: the previous
    # window still weighs 1.5; one more fits once its weight falls to 2 → already true.
    assert seconds_until_allowed(prev=3, cur=0, limit=3, elapsed=30) == 0
    # cur already at the limit: wait for the next window, then for this one to decay.
    assert seconds_until_allowed(prev=0, cur=3, limit=3, elapsed=10) == pytest.approx(50 + 20)
    # previous window weight must fall from 3 * 50/60 = 2.5 + cur 1 to ≤ 2 → 2 more... seconds
    wait = seconds_until_allowed(prev=3, cur=1, limit=3, elapsed=10)
    assert wait == pytest.approx(30)  # at 40 s: 3 * 20/60 = 1 + 1 = 2, room for one


def test_per_key_cap_on_queued_jobs_is_429_and_frees_as_jobs_end(tmp_path, redis_url, conn):
    settings = fast_settings(tmp_path / "data", redis_url, auth_enabled=True,
                             per_key_max_queued=2)
    _, alice = auth.create_key(conn, "alice")
    _, bob = auth.create_key(conn, "bob")
    with api_client(settings) as c:
        first = c.post("/v1/generations", json=body(), headers=bearer(alice)).json()
        c.post("/v1/generations", json=body(), headers=bearer(alice))
        r = c.post("/v1/generations", json=body(), headers=bearer(alice))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert "at most 2" in r.json()["detail"]
        r = c.post("/v1/batches", json={"requests": [body()]}, headers=bearer(alice))
        assert r.status_code == 429
        assert c.post("/v1/generations", json=body(), headers=bearer(bob)).status_code == 202
        c.post(f"/v1/generations/{first['id']}/cancel", headers=bearer(alice))
        assert c.post("/v1/generations", json=body(), headers=bearer(alice)).status_code == 202


def test_global_queue_depth_is_503_with_retry_after(tmp_path, redis_url, conn):
    settings = fast_settings(tmp_path / "data", redis_url, max_queue_depth=3)
    with api_client(settings) as c:
        for _ in range(3):
            assert c.post("/v1/generations", json=body()).status_code == 202
        r = c.post("/v1/generations", json=body())
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "queue is full" in r.json()["detail"]
        r = c.post("/v1/batches", json={"requests": [body()]})
        assert r.status_code == 503
    assert Queue(settings.queue_name, connection=conn).count == 3


def test_keys_cli_create_list_revoke(redis_url, conn):
    runner = CliRunner()
    made = runner.invoke(keys_app, ["create", "--name", "ci", "--redis-url", redis_url])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[0]
    assert token.startswith("steer_")
    key_id = auth.authenticate(conn, token)
    assert key_id is not None
    listed = runner.invoke(keys_app, ["list"], env={"REDIS_URL": redis_url})
    assert listed.exit_code == 0 and key_id in listed.stdout and "ci" in listed.stdout
    assert token not in listed.stdout
    revoked = runner.invoke(keys_app, ["revoke", key_id, "--redis-url", redis_url])
    assert revoked.exit_code == 0 and auth.authenticate(conn, token) is None
    again = runner.invoke(keys_app, ["revoke", key_id, "--redis-url", redis_url])
    assert again.exit_code != 0 and "no key" in again.output


def test_keys_cli_without_redis_says_what_to_set():
    result = CliRunner().invoke(keys_app, ["list"], env={"REDIS_URL": "", "STEER_REDIS_URL": ""})
    assert result.exit_code != 0 and "REDIS_URL" in result.output
