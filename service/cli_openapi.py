"""``steer openapi``: write openapi/openapi.json from the app, or check that it is current."""

from __future__ import annotations

import json
from pathlib import Path

import typer

DEFAULT_OUT = Path("openapi/openapi.json")


def render_openapi() -> str:
    """The app's OpenAPI document as stable text (sorted keys, 2-space indent, final newline).

    Built from the default Settings: nothing in the schema depends on the deployment."""
    from service.app import create_app
    from service.settings import Settings

    document = create_app(Settings()).openapi()
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def openapi(out: Path = typer.Option(DEFAULT_OUT, "--out", "-o", help="Where to write it."),
            check: bool = typer.Option(False, "--check",
                                       help="Write nothing; fail if OUT differs from the app.")
            ) -> None:
    """Write the gateway's OpenAPI document (or, with --check, fail when it has drifted)."""
    text = render_openapi()
    if check:
        current = out.read_text(encoding="utf-8") if out.exists() else None
        if current != text:
            typer.echo(f"{out} is out of date with the app; run `steer openapi` and commit it",
                       err=True)
            raise typer.Exit(1)
        typer.echo(f"{out} is up to date")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {out}")
