"""SteerWorker: an RQ worker that loads the pipeline once and runs every job in its own process.

RQ's default worker forks a child per job; CUDA does not survive fork and reloading the model
per job would dominate latency, so this is a :class:`rq.SimpleWorker` (jobs run in the
worker's main thread) with what that needs to be safe:

- a heartbeat thread: while a job runs, its started-registry entry is refreshed every
  ``worker_heartbeat_s`` and lives ``worker_heartbeat_ttl_s`` and no longer, so a worker
  that dies (SIGKILL, lost host) has its job noticed within that time; registry cleanup
  then requeues it once (the job's ``Retry(max=1)``) for another worker, then fails it.
  The same thread refreshes the worker's ``steer:worker:<name>`` record (see
  :mod:`service.worker_registry`), which the gateway's /readyz reads;
- maintenance every ``maintenance_interval_s`` (RQ's registry cleanup, then the image
  retention sweep): the idle wait for jobs is cut to that interval so it really runs;
- RQ's scheduler (which runs retry intervals, e.g. webhook backoff) in a thread, not a
  forked process;
- warm shutdown on SIGTERM/SIGINT (RQ's): the current job finishes, then the worker exits;
  a second signal stops at once (the job is then retried elsewhere).

It listens to the generation queue first, then the webhook queue.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import redis
import torch
from rq import SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.registry import CanceledJobRegistry
from rq.scheduler import RQScheduler
from rq.scheduler import run as run_scheduler
from rq.worker import WorkerStatus

from service.jobstore import utcnow
from service.redis_errors import transient
from service.runner import WorkerRuntime, configure
from service.settings import Settings
from service.worker_registry import register_worker, unregister_worker

log = logging.getLogger(__name__)


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS after a job (glibc's ``malloc_trim``).

    A job allocates and frees many large tensors of varying sizes (the UNet's activations,
    plan rows the bounded plan cache lets go: steering/plan.py ``RowCache``); glibc keeps the
    freed pages, so without this a worker's unique memory crept up by ~13 % over its first
    300 toy jobs (bench/worker_rss.py). The trim is a no-op without glibc; the collection
    takes a few ms, next to seconds of generation."""
    gc.collect()  # tensors held only by reference cycles (hooks, tracebacks) go first
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


class ThreadScheduler(RQScheduler):
    """RQ's scheduler loop in a daemon thread of the worker (RQ forks a process for it)."""

    def _install_signal_handlers(self) -> None:
        """The worker's main thread owns the signals; the worker stops this loop."""

    def start(self) -> threading.Thread:  # type: ignore[override]
        """Run the scheduling loop in a thread (RQ: a forked process)."""
        self._status = self.Status.STARTED
        self._stop_requested = False
        thread = threading.Thread(target=run_scheduler, args=(self,), name="rq-scheduler",
                                  daemon=True)
        self._process = thread  # RQ's maintenance restarts it when not is_alive()
        thread.start()
        return thread


def default_worker_name(device: str) -> str:
    """``<host>-<device>-<random>``: unique even when a container restarts with the same pid."""
    return f"{socket.gethostname()}-{device.replace(':', '')}-{uuid.uuid4().hex[:8]}"


class SteerWorker(SimpleWorker):
    """An RQ worker holding one loaded SteeredPipeline; see the module docstring."""

    def __init__(self, queues: Any, *args: Any, settings: Settings | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32,
                 **kwargs: Any) -> None:
        self.settings = settings if settings is not None else Settings()
        self.device, self.dtype = device, dtype
        self.runtime: WorkerRuntime | None = None
        self._burst = False
        self._quit = False  # a stop was asked for (signal or RQ's shutdown command)
        self._running: tuple[Job, Execution] | None = None
        self._beat_lock = threading.Lock()
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._started_at = utcnow().isoformat()
        kwargs.setdefault("maintenance_interval", self.settings.maintenance_interval_s)
        kwargs.setdefault("default_result_ttl", self.settings.result_retention_s)
        # RQ's job log lines quote the call (the prompt): only when prompts may be logged.
        kwargs.setdefault("log_job_description", self.settings.log_prompts)
        super().__init__(queues, *args, **kwargs)

    @classmethod
    def create(cls, settings: Settings, device: str = "cpu",
               dtype: torch.dtype = torch.float32, name: str | None = None,
               connection: redis.Redis | None = None) -> SteerWorker:
        """A worker on ``settings``' Redis, listening to the generation then webhook queues."""
        if connection is None:
            if not settings.redis_url:
                raise ValueError("REDIS_URL is not set: point it at the Redis server the API "
                                 "uses (or run `steer serve`, which starts one and a worker)")
            connection = redis.Redis.from_url(settings.redis_url)
        return cls([settings.queue_name, settings.webhook_queue_name], connection=connection,
                   name=name or default_worker_name(device), settings=settings,
                   device=device, dtype=dtype)

    # -- timing ----------------------------------------------------------------------------

    @property
    def dequeue_timeout(self) -> int:
        """Wake up from the idle wait at least every maintenance interval."""
        return max(1, min(int(self.settings.maintenance_interval_s), self.worker_ttl - 15))

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """A running job's registry entry outlives its last heartbeat by this much only."""
        return max(1, int(self.settings.worker_heartbeat_ttl_s))

    # -- life cycle ------------------------------------------------------------------------

    def work(self, burst: bool = False, **kwargs: Any) -> bool:
        """RQ's work loop; the scheduler runs in a thread started by :meth:`bootstrap`.

        RQ's loop quits on a Redis error outside its idle wait (e.g. writing a result while
        Redis restarts): either the error escapes (when RQ cannot record the worker's death
        either) or the loop returns. Unless a stop was asked for, the worker then waits for
        Redis and starts the loop again with the model still loaded; a job caught in the gap
        is requeued by the registry cleanup."""
        self._burst = burst
        kwargs["with_scheduler"] = False
        pause = 0.5
        while True:
            try:
                worked = super().work(burst=burst, **kwargs)
            except redis.RedisError as exc:
                if burst or self._stopping() or not transient(exc):
                    raise
                log.warning("Redis unreachable or refusing writes: waiting for it, then "
                            "taking jobs again", exc_info=True)
            else:
                if (burst or self._stopping() or kwargs.get("max_jobs") is not None
                        or kwargs.get("max_idle_time") is not None):
                    return worked
                log.warning("RQ's work loop quit on an error (logged above): waiting for "
                            "Redis, then taking jobs again")
                time.sleep(pause)  # a loop that keeps failing does not spin
                pause = min(2 * pause, 30.0)
            self._wait_for_redis()

    def _stopping(self) -> bool:
        return self._quit or self._stop_requested

    def request_stop(self, signum: Any, frame: Any) -> None:
        """RQ's warm shutdown, remembered so that :meth:`work` does not start RQ's loop
        again (RQ's own flag is set only when a job is running)."""
        self._quit = True
        super().request_stop(signum, frame)

    def register_birth(self) -> None:
        """RQ's, taking over this process's own RQ record when a Redis restarted from its
        append-only file brought it back alive (RQ could not record the death while Redis
        was down, and would refuse the name as taken). Another live process under the
        same name is still refused."""
        death, pid, host = (v.decode() if isinstance(v, bytes) else v for v in
                            self.connection.hmget(self.key, ["death", "pid", "hostname"]))
        if death is None and pid == str(os.getpid()) and host == self.hostname:
            log.warning("taking over this worker's own record, restored by a Redis restart",
                        extra={"worker": self.name})
            self.connection.hset(self.key, "death", utcnow().isoformat())
        super().register_birth()

    def _wait_for_redis(self, first_wait_s: float = 0.5, max_wait_s: float = 10.0) -> None:
        """Block until Redis takes a write (a full disk refuses writes, and PING, until space
        is freed), backing off; a signal still stops the worker."""
        wait = first_wait_s
        while not self._stopping():
            try:
                self.connection.set(f"steer:probe:{self.name}", "1", ex=60)
                return
            except redis.RedisError as exc:
                if not transient(exc):
                    raise
                time.sleep(wait)
                wait = min(2 * wait, max_wait_s)
        raise SystemExit(0)

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        """Load and warm up the pipeline (once), register with RQ and as a steer worker,
        start the heartbeat and scheduler threads."""
        if self.runtime is None:
            self.runtime = configure(self.settings, self.device, self.dtype, self.name)
            self.runtime.warm_up()
        self._beat_stop.clear()
        super().bootstrap(*args, **kwargs)
        self._register()
        self._beat_thread = threading.Thread(target=self._beat, name="steer-heartbeat",
                                             daemon=True)
        self._beat_thread.start()
        if not self._burst:
            self.scheduler = ThreadScheduler(self.queues, connection=self.connection,
                                             serializer=self.serializer)
            self.scheduler.acquire_locks(auto_start=True)
        log.info("worker ready", extra={"worker": self.name, "device": self.device,
                                        "queues": self.queue_names()})

    def teardown(self) -> None:
        """Stop the heartbeat, drop the steer:worker record, then RQ's teardown."""
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)
        try:
            unregister_worker(self.connection, self.name)
        except redis.RedisError:
            log.warning("could not remove the worker record", exc_info=True)
        super().teardown()

    def stop_scheduler(self) -> None:
        """Ask the scheduler thread to stop and wait for it (idempotent)."""
        scheduler = self.scheduler
        if scheduler is not None and scheduler._process is not None:
            scheduler.request_stop()
            scheduler._process.join(timeout=scheduler.interval + 5)

    # -- jobs ------------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job in this process while the heartbeat thread keeps its entry alive."""
        execution = self.prepare_execution(job)
        with self._beat_lock:
            self._running = (job, execution)
        try:
            self.perform_job(job, queue, execution)
        finally:
            self._job_ended()
            release_free_memory()
        self.set_state(WorkerStatus.IDLE)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        """Stop heartbeating before RQ removes the execution (no stale entry is recreated)."""
        self._job_ended()
        super().handle_execution_ended(job, queue, heartbeat_ttl)

    def _job_ended(self) -> None:
        with self._beat_lock:
            self._running = None

    def run_maintenance_tasks(self) -> None:
        """RQ's (registry cleanup: abandoned jobs retried once, then failed), the canceled
        registries, then images."""
        super().run_maintenance_tasks()
        # RQ never cleans CanceledJobRegistry (its entries are scored with the cancel time):
        # without this, every job canceled while queued stays listed forever.
        cutoff = time.time() - self.settings.result_retention_s
        for queue in self.queues:
            registry = CanceledJobRegistry(queue.name, connection=self.connection)
            self.connection.zremrangebyscore(registry.key, 0, cutoff)
        if self.runtime is not None:
            removed = self.runtime.images.sweep(self.settings.result_retention_s)
            if removed:
                log.info("expired images removed", extra={"count": removed})

    # -- heartbeat -------------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        pipeline = self.runtime.pipeline if self.runtime is not None else None
        bundle = pipeline.bundle if pipeline is not None else None
        policies = self.runtime.policies if self.runtime is not None else None
        return {"bundle_sha256": bundle.sha256 if bundle is not None else None,
                "policy_sha256": policies.sha256 if policies is not None else None,
                "fingerprint": pipeline.fingerprint if pipeline is not None else None,
                "device": self.device, "pid": os.getpid(), "host": socket.gethostname(),
                "started_at": self._started_at, "queues": self.queue_names()}

    def _register(self) -> None:
        register_worker(self.connection, self.name, self._record(),
                        self.settings.worker_heartbeat_ttl_s)

    def _beat(self) -> None:
        """Every ``worker_heartbeat_s``: refresh the record and the running job's entry."""
        while not self._beat_stop.wait(self.settings.worker_heartbeat_s):
            try:
                self._register()
                with self._beat_lock:
                    if self._running is not None:
                        self.maintain_heartbeats(*self._running)
            except Exception:  # the thread must survive a Redis hiccup
                log.warning("worker heartbeat failed", exc_info=True)
