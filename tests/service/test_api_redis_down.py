"""Redis down → 503 + Retry-After from every endpoint that needs it, the rest keeps answering,
and the same app recovers once Redis is back (a private redis-server, never the shared one)."""

from __future__ import annotations

import pytest
import redis

from service import auth
from tests.service.api_support import api_client, body
from tests.service.conftest import fast_settings


@pytest.mark.parametrize("auth_enabled", [False, True])
def test_redis_down_is_503_with_retry_after_and_the_app_recovers(tmp_path, private_redis,
                                                                  auth_enabled):
    settings = fast_settings(tmp_path / "data", private_redis.url, auth_enabled=auth_enabled)
    headers = {}
    if auth_enabled:
        _, token = auth.create_key(redis.Redis.from_url(private_redis.url), "ops")
        headers["Authorization"] = f"Bearer {token}"
    with api_client(settings, **headers) as c:
        gen = c.post("/v1/generations", json=body())
        assert gen.status_code == 202
        gen_id = gen.json()["id"]

        private_redis.stop()
        needs_redis = [("post", "/v1/generations", body()),
                       ("get", f"/v1/generations/{gen_id}", None),
                       ("post", f"/v1/generations/{gen_id}/cancel", None),
                       ("delete", f"/v1/generations/{gen_id}", None),
                       ("post", "/v1/batches", {"requests": [body()]}),
                       ("get", f"/v1/batches/{gen_id}", None),
                       ("get", "/readyz", None)]
        for method, path, payload in needs_redis:
            r = c.request(method, path, json=payload)
            assert r.status_code == 503, (method, path, r.text)
            assert int(r.headers["Retry-After"]) >= 1
            assert "Redis" in r.json()["detail"] or "worker" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200
        if not auth_enabled:  # served from the bundle manifest (the key lookup needs Redis)
            assert c.get("/v1/concepts").status_code == 200
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and "steer_redis_up 0.0" in metrics.text

        private_redis.start()  # same port, empty: the app reconnects by itself
        if auth_enabled:
            assert c.get("/v1/concepts").status_code == 401  # the new server has no keys
            _, token = auth.create_key(redis.Redis.from_url(private_redis.url), "ops")
            c.headers["Authorization"] = f"Bearer {token}"
        again = c.post("/v1/generations", json=body())
        assert again.status_code == 202, again.text
        assert c.get(f"/v1/generations/{again.json()['id']}").json()["status"] == "queued"
        assert "steer_redis_up 1.0" in c.get("/metrics").text
