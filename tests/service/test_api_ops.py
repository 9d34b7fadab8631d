"""Request ids and JSON access logs (prompts only when configured), CORS, JSON 500s, health
and metrics endpoints; real Redis, no worker."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from fastapi import APIRouter

from service.app import create_app
from service.logs import JsonFormatter
from tests.service.api_support import api_client, body
from tests.service.conftest import fast_settings


class Lines(logging.Handler):
    """Collects log lines formatted as the service writes them (JSON, at emit time)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def log_lines() -> Iterator[list[dict]]:
    handler, root = Lines(), logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(old_level)


@pytest.mark.parametrize("log_prompts", [False, True])
def test_logs_are_json_with_the_request_id_and_prompts_only_when_asked(
        tmp_path, redis_url, log_lines, log_prompts):
    settings = fast_settings(tmp_path / "data", redis_url, log_prompts=log_prompts)
    with api_client(settings) as c:
        r = c.post("/v1/generations", json=body(prompt="secret unicorn"),
                   headers={"X-Request-ID": "trace-1"})
    assert r.status_code == 202
    ours = [line for line in log_lines if line.get("request_id") == "trace-1"]
    access = next(line for line in ours if line["logger"] == "service.access")
    assert access["status"] == 202 and access["route"] == "/v1/generations"
    assert access["duration_ms"] >= 0
    queued = next(line for line in ours if line["message"] == "generation queued")
    assert queued["job_id"] == r.json()["id"]
    assert ("secret unicorn" in json.dumps(log_lines)) is log_prompts


def test_cors_origins_are_configurable(tmp_path, redis_url):
    settings = fast_settings(tmp_path / "data", redis_url, cors_origins=["https://ui.example"])
    with api_client(settings) as c:
        pre = c.options("/v1/generations", headers={
            "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Idempotency-Key, Content-Type"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://ui.example"
        r = c.post("/v1/generations", json=body(), headers={"Origin": "https://ui.example"})
        assert r.headers["access-control-allow-origin"] == "https://ui.example"
        assert "Retry-After" in r.headers["access-control-expose-headers"]
        other = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with api_client(fast_settings(tmp_path / "d2", redis_url)) as c:
        r = c.get("/healthz", headers={"Origin": "https://ui.example"})
        assert "access-control-allow-origin" not in r.headers


def test_an_unexpected_error_is_a_json_500_with_the_request_id(settings, log_lines):
    app = create_app(settings)
    router = APIRouter()

    @router.get("/boom")
    def boom() -> None:
        raise RuntimeError("kaput")

    app.include_router(router)
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        r = c.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500 and r.headers["X-Request-ID"] == "boom-1"
    assert "X-Request-ID" in r.json()["detail"]
    assert any(line.get("request_id") == "boom-1" and "kaput" in line.get("exc", "")
               for line in log_lines)


def test_healthz_and_metrics(settings):
    with api_client(settings) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        c.post("/v1/generations", json=body())
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        for name in ("steer_redis_up 1.0", "steer_queue_depth 1.0",
                     'steer_jobs{status="queued"} 1.0', "steer_workers 0.0",
                     "steer_step_latency_seconds_bucket", "steer_generation_latency_seconds_sum",
                     "steer_http_request_duration_seconds_bucket"):
            assert name in text, name


def test_two_apps_in_one_process_keep_separate_metrics(settings):
    with api_client(settings) as a, api_client(settings) as b:
        a.get("/healthz")
        assert 'route="/healthz"' in a.get("/metrics").text
        assert 'route="/healthz"' not in b.get("/metrics").text


def test_metrics_labels_stay_bounded_whatever_the_methods(settings):
    """Clients choose the HTTP method: 200 made-up ones must not become 200 label values
    (each a series kept for the life of the process)."""
    with api_client(settings) as c:
        for i in range(200):
            c.request(f"X{i:03d}", "/v1/concepts")
        text = c.get("/metrics").text
    series = [line for line in text.splitlines()
              if line.startswith("steer_http_requests_total{")]
    assert 'method="other"' in text and "X007" not in text
    assert len(series) < 10, series
