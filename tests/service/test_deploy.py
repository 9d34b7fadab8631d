"""Deployment files: docker-compose.yml has the services, GPU reservation, shared volume and
health checks the docs promise, validates with the compose CLI present on this machine, and
Dockerfile.gpu pins torch to the project's version on a CUDA runtime base as a non-root user."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_services_volumes_and_gpu_reservation() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "api", "worker", "rq-dashboard"}
    worker, api = services["worker"], services["api"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "replicas" in worker["deploy"]
    assert worker["command"][:2] == ["steer", "worker"] and "--device" in worker["command"]
    assert api["command"][:2] == ["steer", "serve"]
    # API and workers share the image volume, and both talk to the same Redis.
    assert "images:/data" in api["volumes"] and "images:/data" in worker["volumes"]
    assert api["environment"]["REDIS_URL"] == worker["environment"]["REDIS_URL"]
    assert "healthcheck" in worker and "healthcheck" in services["redis"]
    assert worker["stop_grace_period"]  # warm shutdown has time to finish the job
    assert services["rq-dashboard"]["environment"]["RQ_DASHBOARD_REDIS_URL"].startswith(
        "redis://redis:6379")


def test_compose_validates_with_the_compose_cli() -> None:
    env = dict(os.environ, STEER_URL_SIGNING_SECRET="x", STEER_WEBHOOK_SECRET="y")
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        cmd = ["docker", "compose", "-f", "docker-compose.yml", "config", "-q"]
    elif shutil.which("docker-compose"):
        cmd = ["docker-compose", "-f", "docker-compose.yml", "config", "-q"]
    else:  # no compose CLI: the structure test above still ran
        return
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # Without the secrets compose refuses to start, naming what to set.
    env.pop("STEER_URL_SIGNING_SECRET")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "STEER_URL_SIGNING_SECRET" in done.stderr


def test_dockerfile_pins_torch_on_cuda_as_non_root() -> None:
    text = (REPO / "Dockerfile.gpu").read_text()
    pinned = next(d for d in tomllib.loads((REPO / "pyproject.toml").read_text())
                  ["project"]["dependencies"] if d.startswith("torch"))
    version = pinned.split("==")[1]
    assert f"ARG TORCH_VERSION={version}" in text
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-\S*runtime", text)
    assert re.search(r"^USER steer$", text, re.M) and "HEALTHCHECK" in text
    assert 'VOLUME ["/data", "/models", "/bundles"]' in text
    for path in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (REPO / path).exists(), f"Dockerfile.gpu copies {path}, which does not exist"
