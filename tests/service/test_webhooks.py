"""Completion webhooks: HMAC-SHA256 signatures, and delivery by a worker to a local HTTP server
that fails the first attempt (RQ retries it after the first backoff interval)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from pydantic import SecretStr
from rq.job import Job, JobStatus

from service.images import ImageStore
from service.settings import Settings
from service.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    delivery_job_id,
    sign,
    verify,
    webhook_secret,
)
from tests.service.worker_support import submit, wait_ready

SECRET = b"test-webhook-secret"  # tests/service/conftest.py fast_settings


def test_sign_and_verify():
    body = b'{"event":"generation.finished"}'
    signature = sign(body, SECRET)
    assert signature.startswith("sha256=") and len(signature) == len("sha256=") + 64
    assert verify(body, SECRET, signature)
    assert not verify(body + b" ", SECRET, signature)
    assert not verify(body, b"another secret", signature)
    assert not verify(body, SECRET, None) and not verify(body, SECRET, "")


def test_secret_from_settings_or_one_shared_file(tmp_path):
    configured = Settings(data_dir=tmp_path, redis_url=None,
                          webhook_secret=SecretStr("from-env"))
    assert webhook_secret(configured) == b"from-env"
    unset = Settings(data_dir=tmp_path, redis_url=None)
    first = webhook_secret(unset)
    assert len(first) == 64 and webhook_secret(unset) == first
    assert (tmp_path / ".secrets" / "webhook").read_bytes().strip() == first


class Receiver:
    """A local HTTP server recording POSTs; answers 500 to the first, then 200."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.requests) == 1 else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/steer"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def test_webhook_is_signed_and_retried_after_a_500(conn, settings, spawn, receiver,
                                                   wait_for):
    worker = spawn("w-hooks")
    wait_ready(conn, worker, wait_for)
    job_id = submit(conn, settings, webhook=receiver.url, n_images=2)
    wait_for(lambda: len(receiver.requests) >= 2, timeout=90,
             what="the webhook to be delivered twice (500, then 200)")

    for headers, body in receiver.requests[:2]:
        assert headers["Content-Type"] == "application/json"
        assert verify(body, SECRET, headers[SIGNATURE_HEADER])
        event = json.loads(body)
        assert event["event"] == "generation.finished"
        assert str(event["sent_at"]) == headers[TIMESTAMP_HEADER]  # the signed timestamp
        generation = event["generation"]
        assert generation["id"] == job_id and generation["status"] == "succeeded"
        assert generation["seeds"] == [7, 8] and len(generation["images"]) == 2
        images = ImageStore.from_settings(settings)
        for image in generation["images"]:
            query = parse_qs(urlparse(image["url"]).query)
            assert images.verify(image["id"], query["exp"][0], query["sig"][0])
            assert images.exists(image["id"])

    delivery = Job.fetch(delivery_job_id(job_id), connection=conn)
    wait_for(lambda: delivery.get_status(refresh=True) == JobStatus.FINISHED, timeout=30,
             what="the delivery job to finish")
    assert delivery.return_value() == 200 and len(receiver.requests) == 2


def test_a_job_canceled_while_queued_still_gets_its_webhook(settings, conn, receiver):
    """The job function never runs for it, so the gateway's cancel enqueues the delivery."""
    from service import runner
    from service.webhooks import WebhookDeliveryError
    from tests.service.api_support import api_client, body

    with api_client(settings) as client:  # no worker: the job stays queued
        job = client.post("/v1/generations", json=body(webhook=receiver.url)).json()
        assert client.post(f"/v1/generations/{job['id']}/cancel").json()["status"] == "canceled"
    delivery = Job.fetch(delivery_job_id(job["id"]), connection=conn)
    assert delivery.get_status() == JobStatus.QUEUED  # not waiting on the canceled job
    runner.install(runner.WorkerRuntime(settings, None, ImageStore.from_settings(settings),
                                        "cpu"))  # type: ignore[arg-type] (no pipeline needed)
    try:
        with pytest.raises(WebhookDeliveryError):  # the receiver answers 500 first
            delivery.perform()
        assert delivery.perform() == 200
    finally:
        runner.install(None)  # type: ignore[arg-type]
    headers, sent = receiver.requests[-1]
    assert verify(sent, SECRET, headers[SIGNATURE_HEADER])
    assert json.loads(sent)["generation"]["status"] == "canceled"
