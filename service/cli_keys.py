"""``steer keys create|list|revoke``: manage the gateway's API keys (stored hashed in Redis)."""

from __future__ import annotations

from datetime import UTC, datetime

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


@keys_app.command("create")
def create(name: str = typer.Option(..., "--name", "-n", help="Who or what the key is for."),
           redis_url: str | None = RedisUrlOption) -> None:
    """Make a key and print its token (shown this once; only its hash is stored)."""
    from service.auth import create_key

    key, token = create_key(_connect(redis_url), name)
    typer.echo(token)
    typer.echo(f"key id {key.id} ({name}); the token is not stored: keep it now. Revoke it "
               f"with `steer keys revoke {key.id}`.", err=True)


@keys_app.command("list")
def list_(redis_url: str | None = RedisUrlOption) -> None:
    """Show every key: id, created, token prefix, name (never the token)."""
    from service.auth import list_keys

    keys = list_keys(_connect(redis_url))
    if not keys:
        typer.echo("no API keys; create one with `steer keys create --name NAME`", err=True)
        return
    for key in keys:
        typer.echo(f"{key.id}  {_when(key.created_at)}  {key.prefix}…  {key.name}")


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
