"""One code path for 1 or W processes: torchrun's env, gloo on CPU, nccl on CUDA.

Every collective is a no-op at world size 1. Gradients are summed (not averaged): each rank's
loss is already its share of the global-batch loss (global denominators), so the sum over
ranks is exactly the single-process gradient on the concatenated batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistEnv:
    """This process's rank, the world size and the device it trains on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (which logs, checkpoints and writes the SAE)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when collectives actually communicate."""
        return self.world_size > 1

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor:
        """In-place all-reduce (sum or max) of ``t``; returns it."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

    def all_gather_rows(self, t: Tensor) -> Tensor:
        """Concatenate every rank's ``t`` (same shape on all ranks) along dim 0, in rank order."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    def sum_gradients_(self, module: nn.Module) -> None:
        """Sum every parameter's gradient over ranks, as one flat all-reduce."""
        if not self.active:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_module_(self, module: nn.Module) -> None:
        """Copy rank 0's parameters to every rank."""
        if self.active:
            for p in module.parameters():
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            dist.barrier()


def init_distributed(device: str = "cpu") -> DistEnv:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA).

    On CUDA each rank uses cuda:LOCAL_RANK. A group initialised by the caller is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; "
                           "use --device cpu")
    if world > 1 or dist.is_initialized():
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(dev)
        return DistEnv(rank=rank, world_size=world, device=dev)
    return DistEnv(rank=0, world_size=1, device=dev)
