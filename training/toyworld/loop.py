"""One resumable training loop shared by the toy-world stages (VAE, pipeline, classifier)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from training.toyworld.checkpoint import load_state, save_state


def warmup_cosine(total: int, warmup: int, floor: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to ``floor``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(
    name: str,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    step_fn: Callable[[int], torch.Tensor],
    state_path: Path,
    warmup: int = 100,
    save_every: int = 250,
    clip: float = 1.0,
) -> list[float]:
    """Run ``step_fn(step) -> loss`` for steps not yet done, checkpointing every ``save_every``.

    Killing the process loses at most ``save_every`` steps; rerunning continues from the
    last checkpoint with the same per-step data (step_fn must derive its RNG from ``step``).
    """
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
    start, losses = 0, []
    state = load_state(state_path)
    if state is not None:
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, losses = state["step"], state["losses"]
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]

    def checkpoint(step: int) -> None:
        save_state(
            state_path,
            {
                "modules": {k: m.state_dict() for k, m in modules.items()},
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "step": step,
                "losses": losses,
            },
        )

    for m in modules.values():
        m.train()
    bar = tqdm(range(start, total_steps), desc=name, initial=start, total=total_steps)
    for step in bar:
        loss = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if (step + 1) % save_every == 0 or step + 1 == total_steps:
            checkpoint(step + 1)
    for m in modules.values():
        m.eval()
    return losses
