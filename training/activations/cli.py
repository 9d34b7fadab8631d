"""`steer collect`: a prompt file through the pipeline into an activation store."""

from __future__ import annotations

from pathlib import Path

import typer

ASSETS = Path(__file__).resolve().parents[2] / "assets"


def parse_shard(spec: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError as e:
        raise typer.BadParameter(f"{spec!r}: use i/n, e.g. 0/4", param_hint="--shard") from e
    if not 0 <= i < n:
        raise typer.BadParameter(f"{spec!r}: need 0 <= i < n", param_hint="--shard")
    return i, n


def content_command(pipeline: Path, prompts: Path, steps: int, guidance: float, size: int,
                    capture_steps: str, prompts_per_shard: int, batch_size: int,
                    dtype: str) -> str:
    """The command recorded in store.json: only what decides the store's bytes, so every
    process of a --shard split (other devices, other paths) records the same text."""
    return (f"steer collect --pipeline {pipeline.name} --prompts {prompts.name} "
            f"--steps {steps} --guidance {guidance:g} --size {size} "
            f"--capture-steps {capture_steps} --prompts-per-shard {prompts_per_shard} "
            f"--batch-size {batch_size} --dtype {dtype}")


def register(root: typer.Typer) -> None:
    """Add `steer collect` to the root app."""

    @root.command("collect")
    def collect_command(
        prompts: Path = typer.Option(..., "--prompts", exists=True, dir_okay=False,
                                     help="JSONL prompt file (prompt, concepts, seed)."),
        out: Path = typer.Option(..., "--out", file_okay=False, help="Store folder."),
        pipeline: Path | None = typer.Option(
            None, "--pipeline", help="Local SD-1.x pipeline folder (default: "
            "assets/toy-pipeline)."),
        steps: int = typer.Option(50, min=1, max=1000, help="DDIM steps."),
        guidance: float = typer.Option(7.5, min=0.0, help="Classifier-free guidance scale."),
        size: int | None = typer.Option(None, help="Image side (height = width) in pixels "
                                        "(default: the pipeline's)."),
        capture_steps: str = typer.Option(
            "all", help="Steps to keep: all, 0,5,10 or start:stop:step (indices, 0-based)."),
        shard: str = typer.Option("0/1", help="i/n: this process does shards s with "
                                  "s % n == i (run n processes on the same --out)."),
        prompts_per_shard: int = typer.Option(64, min=1, help="Prompts per shard file."),
        batch_size: int = typer.Option(8, min=1, help="Prompts per pipeline call."),
        device: str = typer.Option("cpu", help="cpu or cuda:N."),
        dtype: str = typer.Option("float32", help="float32, float16 or bfloat16 (GPU)."),
        verify: bool = typer.Option(False, help="Re-hash committed shards before resuming."),
        force: bool = typer.Option(False, help="Start even if the disk looks too small."),
    ) -> None:
        """Collect fp16 activations at the hook point (cond half) into a resumable store."""
        import torch

        from steering.pipeline import SteeredPipeline, pipeline_default_size
        from training.activations.collect import CollectError, collect, parse_steps
        from training.activations.prompts import PromptFileError
        from training.activations.store import StoreError

        index, count = parse_shard(shard)
        pipeline = pipeline or ASSETS / "toy-pipeline"
        if dtype not in ("float32", "float16", "bfloat16"):
            raise typer.BadParameter(f"{dtype!r}: use float32, float16 or bfloat16",
                                     param_hint="--dtype")
        if size is not None and size % 8:
            raise typer.BadParameter(f"{size} is not a multiple of 8", param_hint="--size")
        try:
            captured = parse_steps(capture_steps, steps)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--capture-steps") from e
        try:
            pipe = SteeredPipeline.from_pretrained(pipeline, device=device,
                                                   dtype=getattr(torch, dtype)).pipe
        except FileNotFoundError as e:
            raise typer.BadParameter(str(e), param_hint="--pipeline") from e
        side = size or pipeline_default_size(pipe)
        command = content_command(pipeline, prompts, steps, guidance, side, capture_steps,
                                  prompts_per_shard, batch_size, dtype)
        try:
            store = collect(pipe, prompts, out, steps=steps, guidance=guidance, height=side,
                            width=side, captured_steps=captured, shard=(index, count),
                            prompts_per_shard=prompts_per_shard, batch_size=batch_size,
                            command=command, force=force, verify=verify)
        except (CollectError, StoreError, PromptFileError) as e:
            typer.echo(f"steer collect: {e}", err=True)
            raise typer.Exit(1) from e
        m = store.manifest
        state = "complete" if store.complete else "incomplete: other --shard processes to run"
        typer.echo(f"{out}: {len(store.shard_ids())} of {m.num_shards} shards, "
                   f"{store.num_rows} rows of d_in {m.d_in} ({state})")
