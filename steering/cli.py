"""The `steer` command line: the core's own commands plus groups found through entry points.

Groups (training's ``toyworld``, ``train``…, service's ``serve``…) register under the
``steer.commands`` entry-point group, so this module never imports them by name.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

app = typer.Typer(help="sae-steering: steer diffusion models with sparse autoencoders.",
                  no_args_is_help=True)


def _add_entry_point_groups(root: typer.Typer) -> None:
    """Attach every installed `steer.commands` entry point as a sub-command group."""
    for ep in entry_points(group="steer.commands"):
        try:
            group = ep.load()
        except ImportError as exc:  # an optional extra is not installed
            typer.echo(f"steer: skipping command group {ep.name!r} ({exc})", err=True)
            continue
        root.add_typer(group, name=ep.name)


def main() -> None:
    """Entry point of the `steer` program."""
    _add_entry_point_groups(app)
    app()
