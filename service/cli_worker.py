"""``steer worker --device cpu|cuda:N``: one RQ worker process holding one loaded pipeline.

Run one per GPU (``--device cuda:0``, ``cuda:1``…), on as many hosts as needed, all pointed
at the same ``REDIS_URL`` and the same image folder (``STEER_DATA_DIR``). SIGTERM finishes
the current job, then exits; a second SIGTERM stops at once (the job is retried elsewhere).
"""

from __future__ import annotations

import re

import typer

DTYPES = ("float32", "float16", "bfloat16")


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` that this machine has; else a BadParameter saying why."""
    import torch

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise typer.BadParameter(f"{device!r}: use cpu, cuda or cuda:N", param_hint="--device")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise typer.BadParameter(f"{device}: no CUDA GPU is visible to this process (is "
                                     "the CUDA build of torch installed, and the GPU passed "
                                     "to the container?)", param_hint="--device")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise typer.BadParameter(f"{device}: this machine has "
                                     f"{torch.cuda.device_count()} GPU(s), cuda:0 to "
                                     f"cuda:{torch.cuda.device_count() - 1}",
                                     param_hint="--device")
    return device


def _quiet_model_loading() -> None:
    """No tqdm bars from diffusers/transformers in the worker's (JSON) log."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def worker(
    device: str = typer.Option("cpu", help="Where the model runs: cpu, cuda or cuda:N."),
    name: str | None = typer.Option(None, help="Worker name, unique among live workers "
                                    "(default: host-device-random)."),
    burst: bool = typer.Option(False, help="Run the queued jobs, then exit."),
    dtype: str = typer.Option("float32", help="Model precision: float32, float16 or "
                              "bfloat16 (the half precisions on GPUs only)."),
) -> None:
    """Run a generation worker: load the pipeline and bundle once, then take jobs from Redis."""
    import torch

    from service.logs import configure_logging
    from service.settings import Settings
    from service.worker import SteerWorker

    if dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r}: use one of {', '.join(DTYPES)}",
                                 param_hint="--dtype")
    check_device(device)
    settings = Settings()
    configure_logging(settings.log_json)
    _quiet_model_loading()
    try:
        steer_worker = SteerWorker.create(settings, device=device, dtype=getattr(torch, dtype),
                                          name=name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="REDIS_URL") from exc
    try:
        steer_worker.work(burst=burst)
    except (FileNotFoundError, ValueError) as exc:  # pipeline / bundle that cannot be loaded
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


if __name__ == "__main__":
    typer.run(worker)
