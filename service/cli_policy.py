"""``steer policy check FILE [--bundle DIR]``: validate a content-safety policy file against a
steering bundle, and show what each policy does."""

from __future__ import annotations

from pathlib import Path

import typer

policy_app = typer.Typer(help="Content-safety policy files (STEER_POLICY_FILE).",
                         no_args_is_help=True)


@policy_app.callback()
def policy_group() -> None:
    """Content-safety policy files (STEER_POLICY_FILE); a group, so `check` keeps its name."""


@policy_app.command("check")
def check(
    file: Path = typer.Argument(..., help="The policy file (.toml, .yaml or .yml)."),
    bundle: Path | None = typer.Option(
        None, "--bundle", help="Steering bundle folder [default: $STEER_BUNDLE_DIR, else the "
        "shipped toy bundle]."),
) -> None:
    """Check FILE's structure and its concepts, γ and percentiles against the bundle; print each
    policy's effective suppressions and rules, or the first error and exit 1."""
    from service.catalog import load_catalog
    from service.policy import PolicyError, check_policies, load_policies
    from service.settings import Settings

    bundle_dir = bundle if bundle is not None else Settings().bundle_dir
    try:
        catalog = load_catalog(bundle_dir)
        policies = load_policies(file)
        check_policies(policies, catalog.concepts)
    except (PolicyError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"{file}: OK against {bundle_dir} ({len(policies.policies)} policies, "
               f"default {policies.default!r})")
    for name, policy in policies.policies.items():
        typer.echo(f"  {name}{' (default)' if name == policies.default else ''}"
                   f"{': ' + policy.description if policy.description else ''}")
        for edit in policy.suppressions(catalog.concepts):
            typer.echo(f"    suppress {edit.spec.name}: γ {edit.gamma:g}, percentile "
                       f"{edit.percentile:g}")
        for rule in policy.detect:
            typer.echo(f"    detect {rule.concept}: score ≥ {rule.threshold:g} → {rule.action}")
