"""``steer keys create|list|revoke``: manage the gateway's API keys (stored hashed in Redis)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import redis
import typer

keys_app = typer.Typer(help="Create, list and revoke API keys (Authorization: Bearer <key>).",
                       no_args_is_help=True)

RedisUrlOption = typer.Option(
    None, "--redis-url", envvar=["REDIS_URL", "STEER_REDIS_URL"],
    help="The gateway's Redis [default: $REDIS_URL].")


def _connect(url: str | None) -> redis.Redis:
    """A connection that has answered PING, or a usage error saying what to set."""
    if not url:
        raise typer.BadParameter("no Redis to store keys in: set REDIS_URL (or --redis-url) "
                                 "to the server the gateway uses", param_hint="--redis-url")
    conn = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        conn.ping()
    except redis.RedisError as exc:
        raise typer.BadParameter(f"cannot reach Redis at {url}: {exc}",
                                 param_hint="--redis-url") from exc
    return conn


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _check_policy(policy: str, policy_file: Path | None) -> None:
    """The policy must be in the policy file (when one is known: it is not read otherwise)."""
    from service.policy import PolicyError, load_policies

    if policy_file is None:
        typer.echo(f"note: no policy file given (--policy-file / STEER_POLICY_FILE), so "
                   f"{policy!r} was not checked; the gateway refuses the key's requests if "
                   "its file lacks it", err=True)
        return
    try:
        load_policies(policy_file).get(policy)
    except PolicyError as exc:
        raise typer.BadParameter(str(exc), param_hint="--policy") from exc


@keys_app.command("create")
def create(name: str = typer.Option(..., "--name", "-n", help="Who or what the key is for."),
           policy: str | None = typer.Option(
               None, "--policy", help="Content policy for this key's requests instead of the "
               "policy file's default (e.g. a trusted key's)."),
           policy_file: Path | None = typer.Option(
               None, "--policy-file", envvar="STEER_POLICY_FILE",
               help="The gateway's policy file, to check --policy against."),
           redis_url: str | None = RedisUrlOption) -> None:
    """Make a key and print its token (shown this once; only its hash is stored)."""
    from service.auth import create_key

    if policy is not None:
        _check_policy(policy, policy_file)
    key, token = create_key(_connect(redis_url), name, policy)
    typer.echo(token)
    uses = f", policy {policy!r}" if policy else ""
    typer.echo(f"key id {key.id} ({name}{uses}); the token is not stored: keep it now. Revoke "
               f"it with `steer keys revoke {key.id}`.", err=True)


@keys_app.command("list")
def list_(redis_url: str | None = RedisUrlOption) -> None:
    """Show every key: id, created, token prefix, name (never the token)."""
    from service.auth import list_keys

    keys = list_keys(_connect(redis_url))
    if not keys:
        typer.echo("no API keys; create one with `steer keys create --name NAME`", err=True)
        return
    for key in keys:
        policy = f"  [policy {key.policy}]" if key.policy else ""
        typer.echo(f"{key.id}  {_when(key.created_at)}  {key.prefix}…  {key.name}{policy}")


@keys_app.command("revoke")
def revoke(key_id: str = typer.Argument(..., help="The key id (see `steer keys list`)."),
           redis_url: str | None = RedisUrlOption) -> None:
    """Delete a key; requests with its token are refused (401) from now on."""
    from service.auth import revoke_key

    key = revoke_key(_connect(redis_url), key_id)
    if key is None:
        raise typer.BadParameter(f"no key with id {key_id!r}; `steer keys list` shows them",
                                 param_hint="KEY_ID")
    typer.echo(f"revoked {key.id} ({key.name})")
