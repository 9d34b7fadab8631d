"""Property-based fuzzing of the API: schemathesis generates requests from the
committed openapi/openapi.json — valid and invalid bodies, parameters, headers — against a live
app (uvicorn on a loopback port) with a real `steer worker` taking the jobs, on a private Redis.
Every answer must be documented: no 5xx, a status code, content type, headers and body that the
schema declares for the operation. Bounded: FUZZ_EXAMPLES per operation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service.conftest import PrivateRedis, fast_settings, free_port
from tests.service.live_support import serving, wait_http_ready
from tests.service.worker_support import ROOT, start_worker

FUZZ_EXAMPLES = 50
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]

schema = schemathesis.openapi.from_path(ROOT / "openapi" / "openapi.json")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a live gateway with one worker, on a Redis of its own."""
    tmp = tmp_path_factory.mktemp("fuzz")
    server = PrivateRedis(free_port())
    server.start()
    # small bounds, so the jobs the fuzzer gets accepted stay cheap for the worker
    settings = fast_settings(tmp / "data", server.url, max_steps=8, max_n_images=2,
                             max_size=64, max_batch_items=4, rate_limit_per_minute=100_000)
    worker = start_worker(settings, "fuzz", tmp)
    try:
        with serving(settings) as base:
            wait_http_ready(base, worker)  # /readyz 200, not 503
            yield base
    finally:
        worker.proc.kill()
        worker.proc.wait(10)
        server.stop()


@schema.parametrize()
@hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck),
                     phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
def test_every_answer_is_documented_and_never_a_server_error(case, live):
    case.call_and_validate(base_url=live, checks=CHECKS, timeout=30)


def test_the_fuzzed_schema_is_the_apps_own():
    committed = Path(ROOT / "openapi" / "openapi.json").read_text()
    assert '"/v1/generations"' in committed and len(list(schema.get_all_operations())) >= 12
