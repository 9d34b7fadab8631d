"""Helpers shared by the gateway tests (tests/service/test_api_*.py): a TestClient whose
lifespan has run, and a valid request body."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings


@contextmanager
def api_client(settings: Settings, **headers: str) -> Iterator[TestClient]:
    """A TestClient on a fresh app for ``settings`` (lifespan started, closed on exit)."""
    with TestClient(create_app(settings), headers=headers or None) as client:
        yield client


def body(**overrides: Any) -> dict[str, Any]:
    """A small valid generation request (toy bundle concepts)."""
    return {"prompt": "a red circle on a striped background", "steps": 2, **overrides}


def poll(client: TestClient, url: str, wait_for: Any,
         done: tuple[str, ...] = ("succeeded", "failed", "canceled")) -> dict[str, Any]:
    """GET ``url`` until its status is final; the last answer."""
    return wait_for(lambda: (r := client.get(url).json())["status"] in done and r,
                    timeout=120, what=f"{url} to finish", interval=0.1)
