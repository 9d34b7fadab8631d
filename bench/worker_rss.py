"""Worker memory after 300 jobs ÷ after 10 jobs (USS and RSS of the `steer worker` process).

Starts an embedded Valkey and one ``steer worker`` on the toy pipeline and bundle, enqueues
steered toy generations one after another (each waits for the previous, so the worker is
idle when measured) and reads the worker's USS (memory only it holds, what a leak grows) and
RSS with psutil after job 10 and after job ``--jobs``. Target: USS ratio ≤ 1.05.

Run: ``.venv/bin/python bench/worker_rss.py`` (prints one JSON line and writes
bench/results/worker_rss.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import redis
from rq import Queue

RESULTS = Path(__file__).resolve().parent / "results" / "worker_rss.json"


def run_job(queue: Queue, i: int, steps: int) -> None:
    """Enqueue one steered generation and wait until the worker finished it."""
    from service.jobstore import enqueue_generation, new_id, read_generation
    from service.schemas import ConceptEditIn, GenerationCreate

    payload = GenerationCreate(prompt="a red circle on a striped background", seed=i,
                               steps=steps, concepts=[ConceptEditIn(name="red")])
    job_id = new_id()
    enqueue_generation(queue, payload.model_dump(mode="json"), job_id=job_id, owner=None,
                       request_id=None, batch_id=None, webhook=None, timeout_s=600,
                       retention_s=600)
    while True:
        record = read_generation(queue, job_id)
        if record is not None and record.status not in ("queued", "running"):
            if record.status != "succeeded":
                raise RuntimeError(f"job {i} ended {record.status}: {record.error}")
            return
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from service.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "valkey") as url:
        env = dict(os.environ, REDIS_URL=url, STEER_DATA_DIR=str(Path(tmp) / "data"))
        worker = subprocess.Popen([sys.executable, "-m", "steering.cli", "worker"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            queue = Queue("steer-generations", connection=redis.Redis.from_url(url))
            rss: dict[int, float] = {}
            uss: dict[int, float] = {}
            for i in range(1, args.jobs + 1):
                run_job(queue, i, args.steps)
                if i in (10, args.jobs) or i % 50 == 0:
                    info = psutil.Process(worker.pid).memory_full_info()
                    rss[i], uss[i] = info.rss / 2**20, info.uss / 2**20
                    print(f"after {i} jobs: USS {uss[i]:.1f} MiB, RSS {rss[i]:.1f} MiB",
                          file=sys.stderr)
        finally:
            worker.terminate()
            worker.wait(60)
    result = {"bench": "worker_rss", "jobs": args.jobs, "steps": args.steps,
              "uss_mib": {str(k): round(v, 1) for k, v in uss.items()},
              "rss_mib": {str(k): round(v, 1) for k, v in rss.items()},
              "uss_ratio": round(uss[args.jobs] / uss[10], 4),
              "rss_ratio": round(rss[args.jobs] / rss[10], 4)}
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
