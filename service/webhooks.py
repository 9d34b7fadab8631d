"""Completion webhooks: the finished job POSTed as JSON, signed, retried with backoff.

Delivery is an RQ job on ``settings.webhook_queue_name`` that depends on the generation job,
so it runs only once the job's result is stored (a client that fetches the job on receipt
sees it finished) and also after a job that failed because its workers died. A non-2xx
answer or a network error raises, and RQ retries after 1, 5, 25, 125 and 625 s.

Body: ``{"event": "generation.finished", "sent_at": <unix s>, "generation": <Generation>}``.
Headers: ``X-Steer-Signature: sha256=<hex HMAC-SHA256(secret, body)>`` and
``X-Steer-Timestamp: <sent_at>`` (the timestamp is inside the signed body too, so a receiver
can refuse replays). The secret is ``STEER_WEBHOOK_SECRET`` or ``<data_dir>/.secrets/webhook``.
URLs aimed at private or loopback addresses are refused (service.webhook_guard); redirects are
not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time

import httpx
import redis
from rq import Queue, Retry, get_current_job
from rq.job import Dependency, Job

from service.images import ImageStore
from service.jobstore import read_generation
from service.secretfile import load_or_create_secret
from service.settings import Settings
from service.webhook_guard import WebhookRefused, check_delivery

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Steer-Signature"
TIMESTAMP_HEADER = "X-Steer-Timestamp"
EVENT = "generation.finished"
RETRY_INTERVALS_S = [1, 5, 25, 125, 625]
DELIVER = "service.webhooks.deliver_generation"


class WebhookDeliveryError(RuntimeError):
    """The receiver did not answer 2xx (RQ retries the delivery)."""


def webhook_secret(settings: Settings) -> bytes:
    """The signing key: STEER_WEBHOOK_SECRET, else the data dir's shared random key."""
    return load_or_create_secret(settings.webhook_secret, settings.data_dir, "webhook")


def sign(body: bytes, secret: bytes) -> str:
    """``sha256=<hex>``: the X-Steer-Signature header value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: bytes, signature: str | None) -> bool:
    """True when ``signature`` (the header value) signs ``body`` (constant-time compare)."""
    return bool(signature) and hmac.compare_digest(sign(body, secret), str(signature))


def delivery_job_id(generation_id: str) -> str:
    """One delivery job per generation (enqueueing again on a retried job replaces it)."""
    return f"webhook-{generation_id}"


def enqueue_webhook(conn: redis.Redis, settings: Settings, generation_id: str,
                    url: str, after_job: bool = True) -> Job:
    """Schedule the delivery of ``generation_id``'s outcome to ``url`` once the job ends
    (``after_job=False``: now, for a job that ended without running, e.g. canceled queued)."""
    queue = Queue(settings.webhook_queue_name, connection=conn)
    return queue.enqueue_call(
        DELIVER, kwargs={"generation_id": generation_id, "url": url},
        job_id=delivery_job_id(generation_id),
        depends_on=Dependency([generation_id], allow_failure=True) if after_job else None,
        retry=Retry(max=settings.webhook_retries, interval=RETRY_INTERVALS_S),
        timeout=int(settings.webhook_timeout_s) + 30, result_ttl=settings.result_retention_s,
        failure_ttl=settings.result_retention_s, ttl=settings.result_retention_s)


def deliver_generation(generation_id: str, url: str) -> int:
    """RQ job: POST the job's current view to ``url``, signed; raise unless 2xx."""
    from service.runner import current_settings
    from service.views import generation_view

    settings = current_settings()
    try:
        check_delivery(url, settings.webhook_allowed)
    except WebhookRefused as exc:  # not retried: the address will not become public
        log.warning("webhook refused", extra={"generation_id": generation_id,
                                              "reason": str(exc)})
        return 0
    job = get_current_job()
    conn = job.connection if job is not None else redis.Redis.from_url(settings.redis_url or "")
    record = read_generation(Queue(settings.queue_name, connection=conn), generation_id)
    if record is None:
        log.warning("webhook not sent: the generation no longer exists",
                    extra={"generation_id": generation_id})
        return 0
    sent_at = int(time.time())
    view = generation_view(record, ImageStore.from_settings(settings), settings.public_url)
    body = json.dumps({"event": EVENT, "sent_at": sent_at,
                       "generation": view.model_dump(mode="json")},
                      separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "sae-steering-webhook/1",
               SIGNATURE_HEADER: sign(body, webhook_secret(settings)),
               TIMESTAMP_HEADER: str(sent_at)}
    try:
        response = httpx.post(url, content=body, headers=headers, follow_redirects=False,
                              timeout=settings.webhook_timeout_s)
    except httpx.HTTPError as exc:
        raise WebhookDeliveryError(f"webhook {url} for {generation_id} failed: {exc}") from exc
    if not 200 <= response.status_code < 300:
        raise WebhookDeliveryError(f"webhook {url} for {generation_id} answered "
                                   f"{response.status_code}; it will be retried")
    log.info("webhook delivered", extra={"generation_id": generation_id,
                                         "status_code": response.status_code})
    return response.status_code
