"""End-to-end latency of one steered toy image through the service ÷ the same in-process.

Starts ``steer serve`` (embedded Valkey + API + one worker, as ``make serve``) and, in this
process, a ``SteeredPipeline`` on the same toy pipeline and bundle. Each round, alternately:
``POST /v1/generations`` with ``Prefer: wait`` and then ``GET`` of the image through its
signed link (what a client needs to show it), and ``SteeredPipeline.generate`` of the same
request + PNG encoding. Medians over ``--rounds``; target: service / in-process ≤ 1.10.

Run: ``.venv/bin/python bench/service_e2e_latency.py`` (prints one JSON line and writes
bench/results/service_e2e_latency.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results" / "service_e2e_latency.json"
PROMPT = "a red circle on a striped background"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("steer serve exited")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("steer serve not ready")


def through_service(client: httpx.Client, base: str, body: dict) -> float:
    """Seconds from POST to having the PNG bytes."""
    t0 = time.perf_counter()
    r = client.post(f"{base}/v1/generations", json=body, headers={"Prefer": "wait=60"})
    r.raise_for_status()
    job = r.json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} ended {job['status']}: {job.get('error')}")
    url = job["images"][0]["url"]
    png = client.get(url if url.startswith("http") else base + url)
    png.raise_for_status()
    return time.perf_counter() - t0


def in_process(pipe: object, body: dict) -> float:
    """Seconds of the same generation + PNG encoding in this process."""
    from steering.edits import ConceptEdit
    from steering.pipeline import GenerationRequest

    t0 = time.perf_counter()
    result = pipe.generate(GenerationRequest(  # type: ignore[attr-defined]
        body["prompt"], edits=[ConceptEdit(c["name"]) for c in body["concepts"]],
        seed=body["seed"], steps=body["steps"]))
    result.images[0].save(io.BytesIO(), format="PNG")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    from service.settings import REPO_ASSETS
    from steering.pipeline import SteeredPipeline

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEER_")
           and k != "REDIS_URL"}
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-m", "steering.cli", "serve", "--port",
                                 str(port), "--data-dir", str(Path(tmp) / "data")], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(base, proc)
            pipe = SteeredPipeline.from_pretrained(REPO_ASSETS / "toy-pipeline",
                                                   REPO_ASSETS / "toy-bundle")
            times: dict[str, list[float]] = {"service": [], "in_process": []}
            with httpx.Client(timeout=120) as client:
                for i in range(args.rounds + 1):  # round 0 warms both up
                    body = {"prompt": PROMPT, "seed": 100 + i, "steps": args.steps,
                            "concepts": [{"name": "red"}]}
                    s, p = through_service(client, base, body), in_process(pipe, body)
                    if i:
                        times["service"].append(s)
                        times["in_process"].append(p)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"bench": "service_e2e_latency", "steps": args.steps, "rounds": args.rounds,
              "service_s": round(med["service"], 4), "in_process_s": round(med["in_process"], 4),
              "ratio": round(med["service"] / med["in_process"], 3),
              "runs": {k: [round(x, 4) for x in v] for k, v in times.items()}}
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
