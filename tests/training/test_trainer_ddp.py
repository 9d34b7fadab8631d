"""DDP: 2 CPU processes on gloo train the same SAE as 1 process on the concatenated batches."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from steering.sae import TopKSAE
from training.activations.loader import ActivationLoader, TensorSource
from training.trainer import TrainConfig, train_sae
from training.trainer.distributed import DistEnv
from training.trainer.loop import fit

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

WORLD = 2
CFG = TrainConfig(d_in=16, num_latents=256, k=2, total_steps=8, batch_size=128, lr=3e-3,
                  warmup_steps=2, checkpoint_every=4, log_every=2, buffer_blocks=3,
                  chunk_rows=128, geometric_median_rows=256, dead_tokens=300)


def _data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(4_096, 16, generator=gen) * torch.linspace(0.5, 2, 16) + 1.0


def _source() -> TensorSource:
    return TensorSource(_data(), CFG.chunk_rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    try:
        train_sae(CFG, _source(), out, device="cpu", progress=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def _all_ranks_in_one(start_batch: int) -> Iterator[Iterator[torch.Tensor]]:
    """Global batch b = cat over ranks r of rank r's batch b (the loader's DDP contract)."""
    loaders = [ActivationLoader(_source(), batch_size=CFG.batch_size // WORLD, seed=CFG.seed,
                                buffer_blocks=CFG.buffer_blocks, rank=r, world_size=WORLD,
                                start_batch=start_batch) for r in range(WORLD)]
    try:
        yield (torch.cat(parts) for parts in zip(*loaders, strict=True))
    finally:
        for loader in loaders:
            loader.close()


def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    # fork: the workers start in milliseconds instead of re-importing torch (spawn: ~20 s here).
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path / "ddp")), nprocs=WORLD,
                             join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 120 s")
    ddp = TopKSAE.from_pretrained(tmp_path / "ddp" / "sae")

    single_env = DistEnv(rank=0, world_size=1, device=torch.device("cpu"))
    single = fit(CFG, _all_ranks_in_one, tmp_path / "single", single_env, progress=False)

    for name, ref in single.state_dict().items():
        got = ddp.state_dict()[name]
        rel = (got - ref).norm() / ref.norm().clamp_min(1e-12)
        assert rel < 1e-5, (name, float(rel))
    # AuxK ran (dead latents, counted over the global batch) in both.
    logs = [[json.loads(s) for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("ddp", "single")]
    assert any(r["auxk"] > 0 for r in logs[1])
    for a, b in zip(*logs, strict=True):
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-5)
        assert a["dead_pct"] == b["dead_pct"]
