"""The generation job function, and the worker runtime it runs with (pipeline loaded once).

``run_generation(payload)`` is what RQ calls for every generation job. It uses the runtime the
worker installed at start (:func:`configure` / :func:`install`): the settings, the loaded
SteeredPipeline and the image store, so no job ever loads a model. One job is one UNet batch
of ``n_images``; it is never merged with other jobs (image i uses seed + i on its own
generator, so each image is reproducible alone).

The job function catches its own errors and returns a :class:`JobOutcome` (status
succeeded / canceled / failed with the reason), so RQ's retry only fires when the worker
itself died mid-job.

Cancel reaches a running generation through an in-process flag (:func:`cancel_watch`): a
thread of the job waits for the cancel's announcement on Redis and sets the flag, which the
steering hooks read at every UNet call, so no step makes a Redis call to learn of it.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import redis
import torch
from rq import get_current_job
from rq.job import Job
from rq.timeouts import JobTimeoutException

from service import enforce, logs
from service.enforce import CONTENT_POLICY_VIOLATION, EditPlan, Enforced, plan_edits
from service.images import ImageStore, a1111_parameters
from service.jobstore import (
    JobOutcome,
    cancel_channel,
    cancel_requested,
    new_id,
    release_owner_slot,
    update_meta,
    utcnow,
)
from service.metrics_store import observe
from service.policy import Policy, PolicyError, PolicyFile, check_policies, load_policies
from service.schemas import GenerationCreate
from service.settings import Settings
from service.webhooks import enqueue_webhook
from steering.bundle import scheduler_description
from steering.edits import ConceptEdit, EditError, ResolvedEdit, resolve_edits
from steering.pipeline import GenerationCanceled, GenerationRequest, SteeredPipeline

log = logging.getLogger(__name__)

# Progress is written at most this often (the last step always): a Redis transaction per
# step would cost a noticeable share of a 5 ms GPU step.
PROGRESS_MIN_INTERVAL_S = 0.05
# The cancel watcher also reads the job's cancel flag this often (a cancel announced while it
# was not subscribed, e.g. during a Redis blip); the announcement itself arrives at once.
CANCEL_POLL_S = 0.5
CANCEL_WAKE_S = 0.05  # how long the watcher blocks for an announcement before looking again
SEED_RANGE = 2**32  # random seeds are drawn below this (the range A1111 users share)


def _package_version() -> str:
    try:
        return version("sae-steering")
    except PackageNotFoundError:
        return "dev"


@dataclass
class WorkerRuntime:
    """What jobs run with: settings, the pipeline (loaded once), the image store, the
    content-safety policies (None: no policy file)."""

    settings: Settings
    pipeline: SteeredPipeline
    images: ImageStore
    device: str
    worker_name: str = ""
    policies: PolicyFile | None = None

    def policy(self, name: str | None) -> Policy | None:
        """The policy a job names (None: the file's default); None without a policy file."""
        if self.policies is None:
            if name is not None:
                raise PolicyError(f"the job asks for content policy {name!r}, but this worker "
                                  "has no policy file: give the workers the gateway's "
                                  "STEER_POLICY_FILE")
            return None
        return self.policies.get(name)

    @cached_property
    def provenance(self) -> dict[str, Any]:
        """Pipeline fingerprint, bundle sha256, recipe and learned swaps (concept → the anchor
        it is replaced with), and scheduler of every job this runtime runs."""
        bundle = self.pipeline.bundle
        swaps = bundle.translations if bundle is not None else None
        return {"pipeline_fingerprint": self.pipeline.fingerprint,
                "bundle_sha256": bundle.sha256 if bundle is not None else None,
                "steering_recipe": (bundle.manifest.recipe.to_dict() if bundle is not None
                                    else None),
                "steering_swaps": ({c: t.anchor for c, t in swaps.concepts.items()}
                                   if swaps is not None else {}),
                "scheduler": scheduler_description(self.pipeline.pipe.scheduler),
                "version": _package_version()}

    def warm_up(self) -> None:
        """One tiny steered generation, so the first job does not pay for kernel set-up."""
        concepts = list(self.pipeline.concepts)
        self.pipeline.generate(GenerationRequest(
            prompt="warm-up", steps=2, edits=[ConceptEdit(concepts[0])] if concepts else ()))


_pipelines: dict[tuple[str, str | None, str, str], SteeredPipeline] = {}
_runtime: WorkerRuntime | None = None


def load_pipeline(pipeline_dir: Path, bundle_dir: Path | None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> SteeredPipeline:
    """Load the pipeline + bundle once per process (later calls return the same object)."""
    key = (str(Path(pipeline_dir).resolve()),
           str(Path(bundle_dir).resolve()) if bundle_dir is not None else None,
           device, str(dtype))
    if key not in _pipelines:
        _pipelines[key] = SteeredPipeline.from_pretrained(pipeline_dir, bundle_dir,
                                                          device=device, dtype=dtype)
    return _pipelines[key]


def install(runtime: WorkerRuntime) -> WorkerRuntime:
    """Make ``runtime`` the one jobs in this process run with."""
    global _runtime
    _runtime = runtime
    return runtime


def configure(settings: Settings, device: str = "cpu", dtype: torch.dtype = torch.float32,
              worker_name: str = "") -> WorkerRuntime:
    """Load (or reuse) the pipeline for ``settings`` and install the runtime jobs use; a bad
    policy file (STEER_POLICY_FILE) stops it with a PolicyError naming what to fix."""
    policies = load_policies(settings.policy_file) if settings.policy_file else None
    pipeline = load_pipeline(settings.pipeline_dir, settings.bundle_dir, device, dtype)
    if policies is not None:
        check_policies(policies, pipeline.concepts)
    return install(WorkerRuntime(settings, pipeline, ImageStore.from_settings(settings), device,
                                 worker_name, policies))


def current() -> WorkerRuntime:
    """The installed runtime; a job run outside ``steer worker`` without one is an error."""
    if _runtime is None:
        raise RuntimeError("no worker runtime in this process: run generation jobs with "
                           "`steer worker` (or call service.runner.configure(settings) first)")
    return _runtime


def current_settings() -> Settings:
    """The runtime's settings, or the environment's when no runtime is installed."""
    return _runtime.settings if _runtime is not None else Settings()


@contextlib.contextmanager
def _log_context(meta: dict[str, Any], job_id: str) -> Iterator[None]:
    """Log lines of this job carry the request id of the API call that submitted it."""
    tokens = (logs.request_id.set(meta.get("request_id")), logs.job_id.set(job_id))
    try:
        yield
    finally:
        logs.request_id.reset(tokens[0])
        logs.job_id.reset(tokens[1])


class _Progress:
    """Per-step callback: progress into the job's meta (throttled), step latency histogram."""

    def __init__(self, conn: redis.Redis, job_id: str) -> None:
        self.conn, self.job_id = conn, job_id
        self.last_step_at = time.perf_counter()
        self.last_write_at = 0.0

    def __call__(self, step: int, total: int) -> None:
        now = time.perf_counter()
        try:
            observe(self.conn, "step_latency_seconds", now - self.last_step_at)
            if step == total or now - self.last_write_at >= PROGRESS_MIN_INTERVAL_S:
                update_meta(self.conn, self.job_id, progress={"step": step, "total": total})
                self.last_write_at = now
        except redis.RedisError:  # progress is best effort: a Redis blip must not cost the job
            log.warning("progress not recorded: Redis unreachable", exc_info=True)
        self.last_step_at = now


def _watch_cancel(conn: redis.Redis, job_id: str, flag: threading.Event,
                  done: threading.Event, poll_s: float) -> None:
    """Set ``flag`` when the job's cancel is announced or its cancel flag is found; until
    ``done``. Redis errors only delay it: it subscribes again after ``poll_s``."""
    while not done.is_set():
        pubsub = conn.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(cancel_channel(job_id))
            checked = 0.0  # the flag first: a cancel announced before subscribing is not heard
            while not done.is_set():
                now = time.monotonic()
                if now - checked >= poll_s:
                    checked = now
                    if cancel_requested(conn, job_id):
                        flag.set()
                        return
                # short waits, so the thread notices ``done`` promptly
                if pubsub.get_message(timeout=CANCEL_WAKE_S) is not None:
                    flag.set()
                    return
        except Exception:  # Redis down, or its client closed: never the end of the job
            log.debug("cancel watch: Redis unreachable, retrying", exc_info=True)
            done.wait(poll_s)
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()


@contextlib.contextmanager
def cancel_watch(conn: redis.Redis, job_id: str, poll_s: float = CANCEL_POLL_S
                 ) -> Iterator[threading.Event]:
    """An Event set soon after the job's cancel is requested, for the generation to read in
    process (``GenerationRequest.cancel``): a daemon thread subscribes to the job's cancel
    channel (:func:`service.jobstore.request_cancel` announces there) and reads the cancel
    flag every ``poll_s``, so the steps themselves make no Redis call. Best effort, as
    before: while Redis is unreachable the job keeps generating."""
    flag, done = threading.Event(), threading.Event()
    thread = threading.Thread(target=_watch_cancel, args=(conn, job_id, flag, done, poll_s),
                              name=f"steer-cancel-{job_id}", daemon=True)
    thread.start()
    try:
        yield flag
    finally:
        done.set()
        thread.join(timeout=1.0)  # it wakes every CANCEL_WAKE_S; a hung socket is left behind


def _concepts(edits: list[ResolvedEdit]) -> list[dict[str, Any]]:
    """Edits in the request's own shape, so `parameters` can be submitted again as is."""
    return [{"name": e.spec.name, "direction": str(e.direction), "gamma": e.gamma,
             "percentile": e.percentile} for e in edits]


def _request(form: GenerationCreate, size: int, rt: WorkerRuntime, policy: Policy | None
             ) -> tuple[GenerationRequest, EditPlan, dict[str, Any]]:
    """The pipeline request, its edits under ``policy`` (always-on suppressions first) and
    the parameters actually used (every default filled, the policy's suppressions included)."""
    seed = form.seed if form.seed is not None else secrets.randbelow(SEED_RANGE)
    edits = [c.to_edit() for c in form.concepts]
    concepts = rt.pipeline.concepts
    plan = plan_edits(resolve_edits(edits, concepts),
                      policy.suppressions(concepts) if policy is not None else [])
    request = GenerationRequest(  # its edits: the plan's (enforce.generate puts them in)
        prompt=form.prompt, negative_prompt=form.negative_prompt, seed=seed,
        steps=form.steps, guidance=form.guidance, width=form.width or size,
        height=form.height or size, n_images=form.n_images)
    parameters = {"prompt": form.prompt, "negative_prompt": form.negative_prompt,
                  "seed": seed, "steps": form.steps, "guidance": form.guidance,
                  "width": request.width, "height": request.height,
                  "n_images": form.n_images, "scheduler": form.scheduler,
                  "concepts": _concepts(plan.applied)}
    return request, plan, parameters


def _queued_s(meta: dict[str, Any], started: float) -> float | None:
    created = meta.get("created_at")
    if not created:
        return None
    return max(0.0, started - datetime.fromisoformat(created).timestamp())


class ImageStoreError(RuntimeError):
    """The job's images could not be written (the job fails; the worker keeps serving)."""


def _save_images(result: Enforced, parameters: dict[str, Any], provenance: dict[str, Any],
                 job_id: str, rt: WorkerRuntime) -> list[dict[str, Any]]:
    """Write each image as ``<new uuid>.png`` with its provenance (the edits that image was
    made with: a policy may have steered it); [{"id", "seed"}]."""
    images: list[dict[str, Any]] = []
    for seed, image, edits in zip(result.seeds, result.images, result.edits, strict=True):
        image_id = new_id()
        used = {**parameters, "concepts": _concepts(edits)}
        try:
            rt.images.save(image, image_id, a1111_parameters(used, seed, provenance),
                           {"generation_id": job_id, "seed": seed, "parameters": used,
                            "provenance": provenance})
        except OSError as exc:  # disk full, read-only, gone: fail this job, keep serving
            rt.images.delete(i["id"] for i in images)
            # the operator's log names the folder; the client's error does not (a server path
            # tells an outsider about the host)
            log.error("could not write an image", extra={
                "job_id": job_id, "directory": str(rt.images.directory),
                "error": exc.strerror or str(exc)})
            raise ImageStoreError(
                f"could not write image {len(images) + 1} of {len(result.images)}: "
                f"{exc.strerror or 'storage error'} in the service's image store (the "
                "operator must free space in STEER_DATA_DIR or point it elsewhere); "
                "resubmit later") from exc
        images.append({"id": image_id, "seed": seed})
    return images


def _generate(job: Job, payload: dict[str, Any], rt: WorkerRuntime) -> JobOutcome:
    """Run the job's generation under its content policy; every expected way to stop
    becomes an outcome."""
    conn, job_id = job.connection, job.id
    parameters: dict[str, Any] = dict(payload)
    provenance = {**rt.provenance, "worker": job.worker_name or rt.worker_name,
                  "device": rt.device}
    try:
        policy = rt.policy((job.meta or {}).get("policy"))
        if policy is not None and rt.policies is not None:
            provenance["policy"] = {"name": policy.name, "file_sha256": rt.policies.sha256}
        form = GenerationCreate.model_validate(payload)
        request, plan, parameters = _request(form, rt.pipeline.default_size(), rt, policy)
        if cancel_requested(conn, job_id):
            return JobOutcome("canceled", parameters=parameters, provenance=provenance,
                              error="canceled before it started")
        update_meta(conn, job_id, progress={"step": 0, "total": form.steps})
        with cancel_watch(conn, job_id) as canceled:
            result = enforce.generate(rt.pipeline, replace(request, cancel=canceled), plan,
                                      policy, progress=_Progress(conn, job_id))
        # A refused generation has no image to write (nothing reaches the disk).
        images = (_save_images(result, parameters, provenance, job_id, rt)
                  if result.refusal is None else [])
    except GenerationCanceled as exc:
        update_meta(conn, job_id, progress={"step": exc.step, "total": exc.total})
        log.info("generation canceled", extra={"step": exc.step, "total": exc.total})
        return JobOutcome("canceled", parameters=parameters, provenance=provenance,
                          error=f"canceled after step {exc.step} of {exc.total}")
    except EditError as exc:
        return JobOutcome("failed", parameters=parameters, provenance=provenance,
                          error=f"{exc.field}: {exc}")
    except (PolicyError, ImageStoreError) as exc:
        return JobOutcome("failed", parameters=parameters, provenance=provenance,
                          error=str(exc))
    except JobTimeoutException:
        return JobOutcome("failed", parameters=parameters, provenance=provenance,
                          error=f"the job exceeded its time limit ({job.timeout} s)")
    except Exception as exc:
        log.exception("generation failed")
        return JobOutcome("failed", parameters=parameters, provenance=provenance,
                          error=f"{type(exc).__name__}: {exc}")
    observe(conn, "generation_latency_seconds", result.timings["generate_s"])
    if result.refusal is not None:
        log.info("generation refused by the content policy",
                 extra={"policy": policy.name if policy else None})
        return JobOutcome("failed", seeds=result.seeds, detection=result.detection,
                          parameters=parameters, provenance=provenance,
                          timings=dict(result.timings), error=result.refusal,
                          error_code=CONTENT_POLICY_VIOLATION, policy=result.report,
                          detection_after=result.detection_after)
    return JobOutcome("succeeded", images=images, seeds=result.seeds,
                      detection=result.detection, parameters=parameters,
                      provenance=provenance, timings=dict(result.timings),
                      policy=result.report, detection_after=result.detection_after)


def run_generation(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job function: generate, save the PNGs, return the JobOutcome as a dict."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("run_generation runs inside an RQ worker (`steer worker`)")
    rt = current()
    meta = job.meta or {}
    started = time.time()
    with _log_context(meta, job.id):
        update_meta(job.connection, job.id, started_at=utcnow().isoformat(),
                    worker=job.worker_name or rt.worker_name, progress=None)
        if meta.get("webhook"):
            # Deferred until this job ends (also when it fails because its workers died).
            enqueue_webhook(job.connection, rt.settings, job.id, meta["webhook"])
        outcome = _generate(job, payload, rt)
        outcome.timings["run_s"] = time.time() - started
        queued_s = _queued_s(meta, started)
        if queued_s is not None:
            outcome.timings["queued_s"] = queued_s
        release_owner_slot(job.connection, job)
        log.info("generation finished", extra={"status": outcome.status,
                                               "error": outcome.error,
                                               "run_s": round(outcome.timings["run_s"], 3)})
    return outcome.to_dict()
