"""Worker throughput on the toy pipeline: images/s with and without steering, 1 vs 2 workers.

Starts an embedded Valkey and ``--workers-max`` `steer worker` processes (the toy pipeline and
bundle), then, in rounds interleaved in one run (this machine is noisy), enqueues ``--jobs``
generations of ``--n-images`` images each — unsteered, or suppressing red at the bundle's
default — with 1 worker and then with 2 taking them, and times from the first enqueue until
the last job ended. Each worker
runs torch with ``--threads`` threads. Prints one JSON line (images/s per configuration, the
steered ÷ unsteered and 2 ÷ 1 worker ratios) and writes bench/results/worker_throughput.json.

On a 2-core machine two workers share the same two cores: the 2 ÷ 1 figure measures the
service's overhead of running them side by side (queueing, Redis, heartbeats), not GPU
scaling; docs/performance.md has the model for GPUs.

Run: ``.venv/bin/python bench/worker_throughput.py`` (smoke: ``--jobs 4 --rounds 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from rq import Queue

RESULTS = Path(__file__).resolve().parent / "results" / "worker_throughput.json"


def enqueue(queue: Queue, seed: int, steps: int, n_images: int, steered: bool) -> str:
    """One generation job as the gateway enqueues it; its id."""
    from service.jobstore import enqueue_generation, new_id
    from service.schemas import ConceptEditIn, GenerationCreate

    payload = GenerationCreate(prompt="a red circle on a striped background", seed=seed,
                               steps=steps, n_images=n_images,
                               concepts=[ConceptEditIn(name="red")] if steered else [])
    job_id = new_id()
    enqueue_generation(queue, payload.model_dump(mode="json"), job_id=job_id, owner=None,
                       request_id=None, batch_id=None, webhook=None, timeout_s=600,
                       retention_s=600)
    return job_id


def run_round(queue: Queue, jobs: int, steps: int, n_images: int, steered: bool) -> float:
    """Images per second for ``jobs`` jobs, enqueued at once, until the last one ended."""
    from service.jobstore import read_generation

    start = time.perf_counter()
    ids = [enqueue(queue, i, steps, n_images, steered) for i in range(jobs)]
    pending = set(ids)
    while pending:
        for job_id in list(pending):
            record = read_generation(queue, job_id)
            if record is not None and record.status not in ("queued", "running"):
                if record.status != "succeeded":
                    raise RuntimeError(f"job ended {record.status}: {record.error}")
                pending.discard(job_id)
        time.sleep(0.02)
    return jobs * n_images / (time.perf_counter() - start)


def wait_workers(conn: redis.Redis, n: int, procs: list[subprocess.Popen]) -> None:
    from service.worker_registry import live_workers

    deadline = time.monotonic() + 180
    while len([w for w in live_workers(conn)
               if w.get("pid") in {p.pid for p in procs}]) < n:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError("the workers did not start")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=24, help="per configuration per round")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n-images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from service.embedded import EmbeddedRedis

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "valkey") as url:
        env = dict(os.environ, REDIS_URL=url, STEER_DATA_DIR=str(Path(tmp) / "data"),
                   OMP_NUM_THREADS=str(args.threads), STEER_LOG_JSON="true")
        conn = redis.Redis.from_url(url)
        queue = Queue("steer-generations", connection=conn)
        procs: list[subprocess.Popen] = []

        def scale_to(n: int) -> None:
            """Exactly n idle workers (an extra one is stopped, not paused: a paused worker
            would still hold its blocking dequeue and take a job)."""
            while len(procs) > n:
                extra = procs.pop()
                extra.terminate()
                extra.wait(60)
            while len(procs) < n:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "steering.cli", "worker", "--name",
                     f"bench-{len(procs)}-{time.monotonic_ns()}"], env=env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_workers(conn, n, procs)

        try:
            for _ in range(args.rounds):
                for workers in (1, 2):
                    scale_to(workers)
                    run_round(queue, workers, args.steps, 1, True)  # warm up each worker
                    for steered in (False, True):
                        name = f"{workers}w_{'steered' if steered else 'plain'}"
                        results.setdefault(name, []).append(
                            run_round(queue, args.jobs, args.steps, args.n_images, steered))
        finally:
            scale_to(0)
    med = {k: statistics.median(v) for k, v in results.items()}
    result = {"bench": "worker_throughput", "jobs": args.jobs, "steps": args.steps,
              "n_images": args.n_images, "threads_per_worker": args.threads,
              "rounds": args.rounds, "cpus": os.cpu_count(),
              "images_per_s": {k: round(v, 2) for k, v in med.items()},
              "all_rounds": {k: [round(x, 2) for x in v] for k, v in results.items()},
              "steered_over_plain_1w": round(med["1w_steered"] / med["1w_plain"], 3),
              "two_over_one_worker_plain": round(med["2w_plain"] / med["1w_plain"], 3),
              "two_over_one_worker_steered": round(med["2w_steered"] / med["1w_steered"], 3)}
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
