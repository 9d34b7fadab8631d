"""The training loop over cached (or generated) activations: init, steps, logs, checkpoints.

Every rank runs this same code; with torchrun each reads its own share of every global batch
(ActivationLoader(rank=r, world_size=W)), and the result equals one process on the
concatenated batches.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from steering.sae import SaeConfig, TopKSAE
from training.trainer.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from training.trainer.config import TrainConfig
from training.trainer.distributed import DistEnv, init_distributed
from training.trainer.init import initialise_from_sample
from training.trainer.metrics import MetricsWriter
from training.trainer.step import TrainStep

if TYPE_CHECKING:
    from training.activations.loader import BlockSource

# start_batch -> a context giving this rank's batches [local_batch, d_in] from that batch on.
BatchStream = Callable[[int], AbstractContextManager[Iterator[Tensor]]]

SAE_DIR = "sae"
CONFIG_FILE = "train_config.json"


def loader_stream(source: BlockSource, cfg: TrainConfig, env: DistEnv) -> BatchStream:
    """This rank's ActivationLoader over ``source``, seekable by batch index."""
    from training.activations.loader import ActivationLoader

    @contextmanager
    def open_stream(start_batch: int) -> Iterator[Iterator[Tensor]]:
        loader = ActivationLoader(source, batch_size=cfg.local_batch(env.world_size),
                                  seed=cfg.seed, buffer_blocks=cfg.buffer_blocks,
                                  rank=env.rank, world_size=env.world_size,
                                  start_batch=start_batch, device=env.device)
        try:
            yield iter(loader)
        finally:
            loader.close()

    return open_stream


def new_sae(cfg: TrainConfig, device: torch.device | str) -> TopKSAE:
    """A fresh TopKSAE drawn from cfg.seed (unit-norm D, E = D, zero biases)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sae = TopKSAE(SaeConfig(d_in=cfg.d_in, num_latents=cfg.num_latents, k=cfg.k))
    return sae.to(device)


def init_from_first_batches(trainer: TrainStep, stream: Iterator[Tensor]) -> Iterator[Tensor]:
    """b_dec and the encoder scale from the first global batches (gathered over ranks);
    returns the stream with those batches put back in front (they are trained on as usual)."""
    cfg, env = trainer.cfg, trainer.env
    head = [next(stream) for _ in range(math.ceil(cfg.geometric_median_rows / cfg.batch_size))]
    sample = env.all_gather_rows(torch.cat(head))
    initialise_from_sample(trainer.sae, sample, trainer.pre)
    return itertools.chain(head, stream)


def save_sae(sae: TopKSAE, out_dir: Path) -> Path:
    """Write the SAE to out_dir/sae/ (sparsify layout), replacing any earlier one atomically."""
    final = out_dir / SAE_DIR
    tmp = out_dir / (SAE_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def train_sae(cfg: TrainConfig, source: BlockSource, out_dir: str | Path, resume: bool = False,
              device: str = "cpu", *, stop_after: int | None = None,
              progress: bool = True) -> TopKSAE:
    """Train a TopK SAE on ``source``; writes checkpoints/, metrics.jsonl, tb/ and sae/.

    Under torchrun each rank passes the same source; ``stop_after`` ends (with a checkpoint)
    after that many steps, as an interrupted run would.
    """
    env = init_distributed(device)
    if source.d_in != cfg.d_in:
        raise ValueError(f"the activations have d_in={source.d_in} but the config says "
                         f"d_in={cfg.d_in}")
    return fit(cfg, loader_stream(source, cfg, env), out_dir, env, resume=resume,
               stop_after=stop_after, progress=progress)


def fit(cfg: TrainConfig, batches: BatchStream, out_dir: str | Path, env: DistEnv,
        resume: bool = False, stop_after: int | None = None, progress: bool = True) -> TopKSAE:
    """The loop itself, on any seekable per-rank batch stream (see :func:`train_sae`)."""
    if cfg.bf16 and env.device.type != "cuda":
        raise ValueError("bf16 training needs a CUDA device; drop --bf16 or pass --device cuda")
    out_dir = Path(out_dir)
    trainer = TrainStep(cfg, new_sae(cfg, env.device), env)
    env.broadcast_module_(trainer.sae)
    start = 0
    if checkpoint_path(out_dir).exists():
        if not resume:
            raise FileExistsError(f"{out_dir} already holds a run ({checkpoint_path(out_dir)}); "
                                  "pass --resume to continue it or choose another --out")
        start = load_checkpoint(out_dir, trainer)
    elif resume and env.is_main:
        tqdm.write(f"no checkpoint in {out_dir}: starting from step 0")
    end = cfg.total_steps if stop_after is None else min(stop_after, cfg.total_steps)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    env.barrier()

    with batches(start) as stream:
        if start == 0:
            stream = init_from_first_batches(trainer, stream)
        _run(trainer, stream, start, end, out_dir, progress)
    if end == cfg.total_steps and env.is_main:
        save_sae(trainer.sae, out_dir)
    env.barrier()
    return trainer.sae


def _run(trainer: TrainStep, stream: Iterator[Tensor], start: int, end: int, out_dir: Path,
         progress: bool) -> None:
    """Steps start..end-1 with logging every log_every and checkpoints every checkpoint_every."""
    cfg, env = trainer.cfg, trainer.env
    metrics = MetricsWriter(out_dir, start) if env.is_main else None
    bar = tqdm(total=cfg.total_steps * cfg.batch_size, initial=start * cfg.batch_size,
               unit="tok", unit_scale=True, desc="steer train", dynamic_ncols=True,
               disable=not (progress and env.is_main))
    acc = torch.zeros(3, dtype=torch.float64, device=env.device)
    window, t0 = 0, time.perf_counter()
    try:
        for step in range(start, end):
            lr = trainer.optimizer.param_groups[0]["lr"]
            stats = trainer(next(stream))
            acc += torch.stack([stats.fvu.double(), stats.auxk.double(), stats.active.double()])
            window += 1
            bar.update(cfg.batch_size)
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                env.all_reduce_(acc)
                dead = trainer.tokens_since_fired > cfg.dead_tokens
                record = {
                    "fvu": acc[0].item() / window,
                    "auxk": acc[1].item() / window,
                    "l0": acc[2].item() / (window * cfg.batch_size),
                    "dead_pct": 100.0 * dead.float().mean().item(),
                    "lr": lr,
                    "tokens_per_s": window * cfg.batch_size / (time.perf_counter() - t0),
                    "tokens": done * cfg.batch_size,
                }
                if metrics is not None:
                    metrics.log(done, record)
                bar.set_postfix(fvu=f"{record['fvu']:.4f}", l0=f"{record['l0']:.1f}",
                                dead=f"{record['dead_pct']:.1f}%")
                acc.zero_()
                window, t0 = 0, time.perf_counter()
            if done % cfg.checkpoint_every == 0 or done == end:
                if env.is_main:
                    save_checkpoint(out_dir, trainer, done)
                env.barrier()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
