"""Idempotency-Key: same key + same body → the same job (200); another body → 409; scoped
per API key; a refused submission frees the key; real Redis, no worker."""

from __future__ import annotations

import pytest
from rq import Queue

from service import auth
from tests.service.api_support import api_client, body
from tests.service.conftest import fast_settings


@pytest.fixture
def client(settings):
    with api_client(settings) as c:
        yield c


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def test_same_key_and_body_return_the_same_job(client, conn, settings):
    first = client.post("/v1/generations", json=body(seed=1), headers=key("k1"))
    assert first.status_code == 202
    # the same request, fields in another order and spacing: still the same job
    again = client.post("/v1/generations", headers={**key("k1"),
                                                     "Content-Type": "application/json"},
                        content=b'{"steps": 2,  "seed": 1, "prompt": '
                                b'"a red circle on a striped background"}')
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert Queue(settings.queue_name, connection=conn).count == 1


def test_same_key_with_another_body_is_409(client):
    client.post("/v1/generations", json=body(seed=1), headers=key("k2"))
    r = client.post("/v1/generations", json=body(seed=2), headers=key("k2"))
    assert r.status_code == 409 and r.json()["field"] == "Idempotency-Key"
    # a key used for a generation cannot be reused for a batch either
    r = client.post("/v1/batches", json={"requests": [body(seed=1)]}, headers=key("k2"))
    assert r.status_code == 409


def test_a_repeat_after_the_job_ran_still_returns_it(client, conn, settings):
    gen = client.post("/v1/generations", json=body(), headers=key("k3")).json()
    client.post(f"/v1/generations/{gen['id']}/cancel")
    again = client.post("/v1/generations", json=body(), headers=key("k3"))
    assert again.status_code == 200 and again.json()["status"] == "canceled"
    assert again.json()["id"] == gen["id"]


def test_a_deleted_job_frees_its_key_for_a_new_job(client):
    gen = client.post("/v1/generations", json=body(), headers=key("k4")).json()
    assert client.delete(f"/v1/generations/{gen['id']}").status_code == 204
    again = client.post("/v1/generations", json=body(), headers=key("k4"))
    assert again.status_code == 202 and again.json()["id"] != gen["id"]


def test_keys_are_scoped_per_api_key(tmp_path, redis_url, conn):
    settings = fast_settings(tmp_path / "data", redis_url, auth_enabled=True)
    _, alice = auth.create_key(conn, "alice")
    _, bob = auth.create_key(conn, "bob")
    with api_client(settings) as c:
        a = c.post("/v1/generations", json=body(seed=1),
                   headers={**key("same"), "Authorization": f"Bearer {alice}"})
        b = c.post("/v1/generations", json=body(seed=2),
                   headers={**key("same"), "Authorization": f"Bearer {bob}"})
        assert a.status_code == 202 and b.status_code == 202
        assert a.json()["id"] != b.json()["id"]


def test_a_refused_submission_releases_the_key(tmp_path, redis_url, conn):
    settings = fast_settings(tmp_path / "data", redis_url, max_queue_depth=1)
    with api_client(settings) as c:
        blocker = c.post("/v1/generations", json=body()).json()
        assert c.post("/v1/generations", json=body(seed=5),
                      headers=key("k5")).status_code == 503
        c.post(f"/v1/generations/{blocker['id']}/cancel")
        r = c.post("/v1/generations", json=body(seed=5), headers=key("k5"))
        assert r.status_code == 202


def test_batches_are_idempotent_too(client, conn, settings):
    batch = {"requests": [body(seed=1), body(seed=2)]}
    first = client.post("/v1/batches", json=batch, headers=key("b1"))
    again = client.post("/v1/batches", json=batch, headers=key("b1"))
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert [g["id"] for g in again.json()["generations"]] == \
        [g["id"] for g in first.json()["generations"]]
    assert Queue(settings.queue_name, connection=conn).count == 2
    other = client.post("/v1/batches", json={"requests": [body(seed=3)]}, headers=key("b1"))
    assert other.status_code == 409


@pytest.mark.parametrize("value", ["", "   ", "x" * 256])
def test_an_unusable_key_is_422(client, value):
    r = client.post("/v1/generations", json=body(), headers=key(value))
    assert r.status_code == 422 and r.json()["field"] == "Idempotency-Key"
