"""openapi/openapi.json is what the app generates (`steer openapi` rewrites it), and it
documents every route's responses and errors."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from service.cli_openapi import DEFAULT_OUT, openapi, render_openapi

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / DEFAULT_OUT


def test_committed_openapi_matches_the_app():
    assert COMMITTED.is_file(), "openapi/openapi.json is missing: run `steer openapi`"
    assert COMMITTED.read_text(encoding="utf-8") == render_openapi(), (
        "openapi/openapi.json drifted from the app: run `steer openapi` and commit the result")


def test_rendering_is_deterministic_and_sorted():
    text = render_openapi()
    assert text == render_openapi()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True,
                              ensure_ascii=False) + "\n"


def test_every_route_documents_its_errors_as_error_detail():
    doc = json.loads(render_openapi())
    error_ref = "#/components/schemas/ErrorDetail"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            assert any(code.startswith("2") for code in responses), (method, path)
            for code, response in responses.items():
                if code.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": error_ref}, (method, path, code)
                    if code in ("429", "503"):
                        assert "Retry-After" in response["headers"], (method, path, code)
            if path.startswith("/v1/") and not path.startswith("/v1/images"):
                assert "401" in responses and op["security"] == [{"ApiKey": []}], path
    post = doc["paths"]["/v1/generations"]["post"]["responses"]
    assert {"200", "202", "401", "409", "413", "422", "429", "503"} <= set(post)
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_the_command_writes_and_checks(tmp_path):
    app = typer.Typer()
    app.command()(openapi)
    out = tmp_path / "openapi.json"
    runner = CliRunner()
    assert runner.invoke(app, ["--check", "--out", str(out)]).exit_code == 1
    assert runner.invoke(app, ["--out", str(out)]).exit_code == 0
    assert out.read_text() == render_openapi()
    assert runner.invoke(app, ["--check", "--out", str(out)]).exit_code == 0
    out.write_text(out.read_text().replace("sae-steering", "drifted"))
    result = runner.invoke(app, ["--check", "--out", str(out)])
    assert result.exit_code == 1 and "steer openapi" in result.output
