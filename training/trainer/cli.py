"""`steer train`: a TopK SAE from activation stores, or online from a pipeline.

Online mode (--from-pipeline): a PipelineSource generates blocks of prompts on demand and
feeds the same ActivationLoader. The loader's bounded prefetch queue (prefetch_buffers
buffers of --buffer-blocks blocks) is the only buffer between generation and training;
nothing is written to disk, and every epoch generates its blocks again.
Distributed: `torchrun --nproc_per_node N -m steering.cli train ...` (or the `steer` script);
every rank runs the same command.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from training.activations.loader import BlockSource
    from training.trainer.config import TrainConfig

ONLINE_BUFFER_BLOCKS = 4
EVAL_FILE = "eval.json"


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _stores_source(dirs: list[Path], chunk_rows: int) -> BlockSource:
    """MemmapSource over the committed shards of the given stores (clear error if unusable)."""
    from training.activations.loader import MemmapSource
    from training.activations.store import ActivationStore, StoreError

    try:
        stores = [ActivationStore.open(d) for d in dirs]
        for store in stores:
            if not store.complete and _is_main():
                typer.echo(f"note: store {store.directory} is incomplete "
                           f"({len(store.shard_ids())} of {store.manifest.num_shards} shards); "
                           "training on the committed ones", err=True)
        return MemmapSource(stores, chunk_rows=chunk_rows)
    except (StoreError, FileNotFoundError, ValueError) as e:
        typer.echo(f"steer train: {e}", err=True)
        raise typer.Exit(1) from e


def _pipeline_source(pipeline: Path, prompts: Path, device: str, gen: dict[str, Any]
                     ) -> BlockSource:
    """PipelineSource: the prompts run through the pipeline on ``device`` (online mode)."""
    import torch

    from steering.pipeline import SteeredPipeline
    from training.activations.collect import parse_steps
    from training.activations.online import PipelineSource
    from training.activations.prompts import PromptFileError, load_prompts

    try:
        records = load_prompts(prompts)
        captured = parse_steps(gen["capture_steps"], gen["steps"])
        pipe = SteeredPipeline.from_pretrained(pipeline, device=device,
                                               dtype=getattr(torch, gen["dtype"])).pipe
    except (PromptFileError, FileNotFoundError, ValueError) as e:
        typer.echo(f"steer train: {e}", err=True)
        raise typer.Exit(1) from e
    return PipelineSource(pipe, records, steps=gen["steps"], guidance=gen["guidance"],
                          height=gen["size"], width=gen["size"], captured_steps=captured,
                          prompts_per_block=gen["prompts_per_block"],
                          batch_size=gen["batch_size"])


def _evaluate(sae: Any, dirs: list[Path], cfg: TrainConfig, max_rows: int,
              out: Path) -> dict[str, float]:
    """Held-out FVU / L0 / dead % on the eval stores, written to out/eval.json."""
    from training.trainer.evaluate import evaluate_sae

    result = evaluate_sae(sae, _stores_source(dirs, cfg.chunk_rows), max_rows=max_rows)
    (out / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def register(root: typer.Typer) -> None:
    """Add `steer train` to the root app."""

    @root.command("train")
    def train_command(
        out: Path = typer.Option(..., "--out", file_okay=False,
                                 help="Run folder: checkpoints/, metrics.jsonl, tb/, sae/."),
        store: list[Path] = typer.Option([], "--store", help="Activation store folder "
                                         "(repeatable; rows of all stores are mixed)."),
        from_pipeline: Path | None = typer.Option(
            None, "--from-pipeline", help="Online mode: generate activations with this SD-1.x "
            "pipeline folder instead of reading stores (needs --prompts)."),
        prompts: Path | None = typer.Option(None, "--prompts", dir_okay=False,
                                            help="JSONL prompt file for --from-pipeline."),
        preset: str = typer.Option("toy", help="smoke, toy, sd14-a100 or sd14-h100; the flags "
                                   "below override its values."),
        steps: int | None = typer.Option(None, "--steps", min=1, help="Optimiser steps."),
        batch_size: int | None = typer.Option(None, min=1, help="Global tokens per step."),
        lr: float | None = typer.Option(None, min=0.0),
        num_latents: int | None = typer.Option(None, min=1, help="SAE width n."),
        k: int | None = typer.Option(None, min=1, help="Active latents per token."),
        seed: int | None = typer.Option(None),
        warmup_steps: int | None = typer.Option(None, min=0),
        dead_tokens: int | None = typer.Option(None, min=0, help="A latent silent for more "
                                               "tokens than this is dead (AuxK)."),
        checkpoint_every: int | None = typer.Option(None, min=1),
        log_every: int | None = typer.Option(None, min=1),
        buffer_blocks: int | None = typer.Option(None, min=1, help="Blocks per shuffle buffer "
                                                 f"(online default: {ONLINE_BUFFER_BLOCKS})."),
        chunk_rows: int | None = typer.Option(None, min=1, help="Rows per contiguous read."),
        device: str | None = typer.Option(None, help="cpu or cuda (default: the preset's)."),
        bf16: bool | None = typer.Option(None, "--bf16/--no-bf16",
                                         help="bf16 encoder GEMM (CUDA)."),
        resume: bool = typer.Option(False, help="Continue the run in --out bit-exactly."),
        eval_store: list[Path] = typer.Option([], "--eval-store", help="Held-out store(s): "
                                              "FVU, L0, dead % at the end -> out/eval.json."),
        eval_rows: int = typer.Option(1_000_000, min=1, help="Held-out rows to evaluate."),
        dry_run: bool = typer.Option(False, help="Print the settings and expected memory and "
                                     "time, then stop."),
        gen_steps: int = typer.Option(50, min=1, help="Online: DDIM steps."),
        guidance: float = typer.Option(7.5, min=0.0, help="Online: guidance scale."),
        size: int | None = typer.Option(None, help="Online: image side (default: the pipeline's)."),
        capture_steps: str = typer.Option("all", help="Online: steps to keep."),
        prompts_per_block: int = typer.Option(16, min=1, help="Online: prompts per block."),
        gen_batch_size: int = typer.Option(8, min=1, help="Online: prompts per pipeline call."),
        dtype: str = typer.Option("float32", help="Online: pipeline dtype."),
    ) -> None:
        """Train a TopK SAE with a progress bar; resumable; torchrun for DDP."""
        from training.trainer.distributed import init_distributed
        from training.trainer.loop import SAE_DIR, train_sae
        from training.trainer.presets import describe, get_preset

        try:
            chosen = get_preset(preset)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--preset") from e
        if bool(store) == bool(from_pipeline):
            raise typer.BadParameter("give either --store DIR (repeatable) or "
                                     "--from-pipeline DIR --prompts FILE")
        if from_pipeline is not None and prompts is None:
            raise typer.BadParameter("--from-pipeline needs --prompts FILE")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise typer.BadParameter(f"{dtype!r}: use float32, float16 or bfloat16",
                                     param_hint="--dtype")
        online = from_pipeline is not None
        if online and buffer_blocks is None:
            buffer_blocks = ONLINE_BUFFER_BLOCKS
        overrides = dict(total_steps=steps, batch_size=batch_size, lr=lr,
                         num_latents=num_latents, k=k, seed=seed, warmup_steps=warmup_steps,
                         dead_tokens=dead_tokens, checkpoint_every=checkpoint_every,
                         log_every=log_every, buffer_blocks=buffer_blocks,
                         chunk_rows=chunk_rows, bf16=bf16)
        device = device or chosen.device
        try:
            env = init_distributed(device)
        except RuntimeError as e:
            raise typer.BadParameter(str(e), param_hint="--device") from e
        if online:
            assert from_pipeline is not None and prompts is not None
            gen = dict(steps=gen_steps, guidance=guidance, size=size,
                       capture_steps=capture_steps, prompts_per_block=prompts_per_block,
                       batch_size=gen_batch_size, dtype=dtype)
            source = _pipeline_source(from_pipeline, prompts, str(env.device), gen)
        else:
            source = _stores_source(store, chunk_rows or chosen.chunk_rows)
        try:
            cfg = chosen.config(d_in=source.d_in, **overrides)
            cfg.local_batch(env.world_size)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        if env.is_main:
            typer.echo(describe(chosen, cfg, env.world_size, device=env.device))
            if online:
                typer.echo(f"online: blocks of {prompts_per_block} prompts generated on demand; "
                           f"the loader's queue of {cfg.buffer_blocks}-block buffers is the only "
                           "buffer, nothing is stored")
        if dry_run:
            return
        try:
            sae = train_sae(cfg, source, out, resume=resume, device=str(env.device))
        except (FileExistsError, ValueError, RuntimeError) as e:
            typer.echo(f"steer train: {e}", err=True)
            raise typer.Exit(1) from e
        if not env.is_main:
            return
        typer.echo(f"SAE written to {out / SAE_DIR}")
        if eval_store:
            result = _evaluate(sae, eval_store, cfg, eval_rows, out)
            typer.echo(f"held-out ({result['rows']} rows): FVU {result['fvu']:.4f}, "
                       f"L0 {result['l0']:.2f}, dead {result['dead_pct']:.2f}% "
                       f"-> {out / EVAL_FILE}")
