"""The service's ``steer`` commands: serve, worker, keys, policy, openapi (entry point
``service``)."""

from __future__ import annotations

import typer


def register(root: typer.Typer) -> None:
    """Add the service commands to the root ``steer`` CLI."""
    from service.cli_keys import keys_app
    from service.cli_openapi import openapi
    from service.cli_policy import policy_app
    from service.cli_serve import serve
    from service.cli_worker import worker

    root.command("serve")(serve)
    root.command("worker")(worker)
    root.command("openapi")(openapi)
    root.add_typer(keys_app, name="keys", help="Create, list and revoke API keys.")
    root.add_typer(policy_app, name="policy", help="Check content-safety policy files.")
