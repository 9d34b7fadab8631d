"""Prometheus metrics of one gateway app: its own registry (never the global one), so several
apps in one process (tests, `steer serve`) never collide.

Request counts and latency are observed in-process; queue depth, jobs by RQ registry, live
workers and the workers' latency histograms (:mod:`service.metrics_store`) are read from Redis
at scrape time by :class:`RedisCollector`. Redis being down never fails a scrape: the Redis
families are left out and ``steer_redis_up`` reads 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from rq import Queue
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from service import metrics_store
from service.redis_errors import UNREACHABLE
from service.worker_registry import fresh_within, live_workers

log = logging.getLogger("service.metrics")

REGISTRIES = {"started": StartedJobRegistry, "finished": FinishedJobRegistry,
              "failed": FailedJobRegistry, "canceled": CanceledJobRegistry,
              "deferred": DeferredJobRegistry, "scheduled": ScheduledJobRegistry}
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)

QueueSource = Callable[[], Queue | None]
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RedisCollector:
    """Families read from Redis when /metrics is scraped (the queue comes from the app)."""

    def __init__(self, queue_source: QueueSource, worker_fresh_s: float | None = None) -> None:
        self.queue_source = queue_source
        self.worker_fresh_s = worker_fresh_s

    def describe(self) -> list[Metric]:
        """Nothing to pre-declare (keeps registration from touching Redis)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield the Redis-backed families, or only ``steer_redis_up 0`` when it is down."""
        up = GaugeMetricFamily("steer_redis_up", "1 when the gateway reaches Redis")
        queue = self.queue_source()
        if queue is None:
            up.add_metric([], 0)
            yield up
            return
        try:
            families = list(self._families(queue, self.worker_fresh_s))
        except UNREACHABLE as exc:
            log.warning("metrics: redis unreachable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    @staticmethod
    def _families(queue: Queue, worker_fresh_s: float | None) -> Iterator[Metric]:
        conn = queue.connection
        with conn.pipeline(transaction=False) as pipe:
            pipe.llen(queue.key)
            for registry in REGISTRIES.values():
                pipe.zcard(registry(queue=queue).key)
            counts = pipe.execute()
        depth = GaugeMetricFamily("steer_queue_depth", "Generation jobs waiting in the queue")
        depth.add_metric([], counts[0])
        yield depth
        jobs = GaugeMetricFamily("steer_jobs", "Generation jobs by RQ state", labels=["status"])
        jobs.add_metric(["queued"], counts[0])
        for name, count in zip(REGISTRIES, counts[1:], strict=True):
            jobs.add_metric([name], count)
        yield jobs
        workers = GaugeMetricFamily("steer_workers", "Workers alive (registered, heartbeat fresh)")
        workers.add_metric([], len(live_workers(conn, worker_fresh_s)))
        yield workers
        for name, text in (("step_latency_seconds", "One denoising step (worker side)"),
                           ("generation_latency_seconds", "One job's generation (worker side)")):
            buckets, _count, total = metrics_store.read_histogram(conn, name)
            family = HistogramMetricFamily(f"steer_{name}", text)
            family.add_metric([], [(le, float(c)) for le, c in buckets], total)
            yield family


class GatewayMetrics:
    """The app's registry: request metrics plus the Redis collector."""

    def __init__(self, queue_source: QueueSource, heartbeat_s: float | None = None,
                 waiting_source: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry()
        if waiting_source is not None:
            Gauge("steer_waiting_requests", "`Prefer: wait` requests parked in this process",
                  registry=self.registry).set_function(waiting_source)
        self.requests = Counter("steer_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("steer_http_request_duration_seconds",
                                 "Time to answer an HTTP request", ["method", "route"],
                                 buckets=REQUEST_BUCKETS, registry=self.registry)
        fresh = None if heartbeat_s is None else fresh_within(heartbeat_s)
        self.registry.register(RedisCollector(queue_source, fresh))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency. Label values are bounded: a method
        outside HTTP's usual ones counts as "other" (clients choose the method, and every new
        label value would be a new series kept for the life of the process)."""
        method = method if method in METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(exposition text, content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
