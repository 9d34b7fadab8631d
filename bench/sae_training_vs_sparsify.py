"""SAE training tokens/s: our TrainStep vs EleutherAI sparsify's SparseCoder, side by side.

Both train on the same synthetic activations (sparse non-negative combinations of n random
unit atoms, plus noise and an offset), batch by batch, with steps interleaved (ours, theirs,
ours, ...) so machine noise hits both alike. sparsify's step is what its Trainer does per
batch for an FVU loss: forward (fused encoder, sparse decoder, AuxK on latents dead for more
than dead_tokens tokens, coefficient 1/32), backward, parallel-gradient removal, Adam, LR
schedule (linear warm-up + decay), dead-latent bookkeeping, decoder re-normalisation.
Ours: training.trainer.step.TrainStep (the same, plus grad-norm clipping). Same lr and
schedule; each uses its own init (ours: geometric-median b_dec, E = s·D with s fit by least
squares; sparsify: mean b_dec, nn.Linear's encoder init, D = its normalised copy).
FVU: both SAEs on the same held-out rows after the same batches.

Scales: toy (d 64, n 1024, k 8, batch 4096; --toy-steps steps, timing all of them) and SD
(d 1280, n 20480, k 32, batch 4096; --sd-steps timed steps after one warm-up).
Run: ``.venv/bin/python bench/sae_training_vs_sparsify.py`` (``--skip-sd`` for toy only).
Prints one JSON line and writes bench/results/sae_training_vs_sparsify.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch
import torch.nn.functional as F

from training.trainer.config import TrainConfig
from training.trainer.distributed import DistEnv
from training.trainer.evaluate import evaluate_sae
from training.trainer.init import initialise_from_sample
from training.trainer.loop import new_sae
from training.trainer.step import TrainStep, lr_factor

RESULTS = Path(__file__).resolve().parent / "results" / "sae_training_vs_sparsify.json"


class Synthetic:
    """Deterministic batches: x = Σ_{a∈A(x)} c_a·atom_a + noise + offset, |A(x)| = active."""

    def __init__(self, d: int, atoms: int, active: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.atoms = F.normalize(torch.randn(atoms, d, generator=gen), dim=1)
        self.offset = torch.randn(d, generator=gen) * 0.5
        self.active, self.seed = active, seed

    def batch(self, i: int, rows: int) -> torch.Tensor:
        """Batch ``i`` (any i, any order: each has its own generator)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        idx = torch.randint(0, self.atoms.shape[0], (rows, self.active), generator=gen)
        coef = torch.rand(rows, self.active, generator=gen) * 2
        x = F.embedding_bag(idx, self.atoms, per_sample_weights=coef, mode="sum")
        return x + 0.05 * torch.randn(x.shape, generator=gen) + self.offset


class SparsifyStep:
    """sparsify's Trainer step for one SparseCoder on cached activations (loss_fn="fvu")."""

    def __init__(self, cfg: TrainConfig, first: torch.Tensor) -> None:
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.sae = SparseCoder(cfg.d_in, SparseCoderConfig(num_latents=cfg.num_latents, k=cfg.k),
                               "cpu", dtype=torch.float32)
        with torch.no_grad():
            self.sae.b_dec.copy_(first.mean(0))  # sparsify's Trainer: b_dec = batch mean
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(cfg, s))
        self.since_fired = torch.zeros(cfg.num_latents, dtype=torch.long)

    def __call__(self, x: torch.Tensor) -> float:
        """One step; returns the batch FVU."""
        self.sae.set_decoder_norm_to_unit_norm()
        dead = self.since_fired > self.cfg.dead_tokens
        out = self.sae(x, dead_mask=dead)
        (out.fvu + self.cfg.aux_coef * out.auxk_loss).backward()
        fired = torch.zeros(self.cfg.num_latents, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        self.since_fired += x.shape[0]
        self.since_fired[fired] = 0
        return float(out.fvu.detach())

    @torch.no_grad()
    def fvu(self, rows: torch.Tensor) -> float:
        """FVU on held-out rows (global mean), as evaluate_sae computes it."""
        self.sae.set_decoder_norm_to_unit_norm()
        err, x64 = 0.0, rows.double()
        for x in rows.split(4096):
            err += float((x - self.sae(x).sae_out).pow(2).sum(dtype=torch.float64))
        return err / float((x64 - x64.mean(0)).pow(2).sum())


class _Held:
    """A BlockSource over an in-memory held-out tensor, one block."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows, self.d_in = rows, rows.shape[1]

    def block_rows(self) -> list[int]:
        return [self.rows.shape[0]]

    def read_block(self, i: int) -> torch.Tensor:
        return self.rows


def run_scale(name: str, d: int, n: int, k: int, batch: int, steps: int, warmup: int,
              lr: float, held_rows: int) -> dict[str, object]:
    """Interleaved steps of both on the same batches; tokens/s medians and held-out FVU."""
    cfg = TrainConfig(d_in=d, num_latents=n, k=k, batch_size=batch, total_steps=steps + warmup,
                      warmup_steps=max(1, (steps + warmup) // 20), lr=lr)
    data = Synthetic(d, atoms=n, active=max(1, k // 2))
    first = data.batch(0, batch)
    ours = TrainStep(cfg, new_sae(cfg, "cpu"), DistEnv(0, 1, torch.device("cpu")))
    initialise_from_sample(ours.sae, first[: cfg.geometric_median_rows], ours.pre)
    theirs = SparsifyStep(cfg, first)
    t_ours, t_theirs, f_ours, f_theirs = [], [], [], []
    for i in range(steps + warmup):
        x = first if i == 0 else data.batch(i, batch)
        t0 = time.perf_counter()
        f_ours.append(float(ours(x).fvu))
        t1 = time.perf_counter()
        f_theirs.append(theirs(x))
        t2 = time.perf_counter()
        if i >= warmup:
            t_ours.append(t1 - t0)
            t_theirs.append(t2 - t1)
        print(f"{name} step {i}: ours {t1 - t0:.3f} s, sparsify {t2 - t1:.3f} s", flush=True)
    held = data.batch(10**6, held_rows)
    ours_fvu = evaluate_sae(ours.sae, _Held(held), max_rows=held_rows)["fvu"]
    tail = max(1, len(f_ours) // 10)
    result = {
        "d_in": d, "num_latents": n, "k": k, "batch": batch, "timed_steps": len(t_ours),
        "trained_steps": steps + warmup, "tokens": (steps + warmup) * batch,
        "ours_tokens_per_s": batch / statistics.median(t_ours),
        "sparsify_tokens_per_s": batch / statistics.median(t_theirs),
        "held_out_fvu_ours": ours_fvu, "held_out_fvu_sparsify": theirs.fvu(held),
        "train_fvu_by_tenth_ours": [round(statistics.mean(f_ours[i:i + tail]), 4)
                                    for i in range(0, len(f_ours), tail)],
        "train_fvu_by_tenth_sparsify": [round(statistics.mean(f_theirs[i:i + tail]), 4)
                                        for i in range(0, len(f_theirs), tail)],
    }
    result["speedup"] = result["ours_tokens_per_s"] / result["sparsify_tokens_per_s"]
    return result


def main() -> None:
    """Toy then SD scale; one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy-steps", type=int, default=300)
    ap.add_argument("--sd-steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--skip-sd", action="store_true")
    ap.add_argument("--skip-toy", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    report: dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                 "loadavg_start": os.getloadavg()[0]}
    if not args.skip_toy:
        report["toy"] = run_scale("toy", 64, 1024, 8, 4096, args.toy_steps, 1, args.lr, 65_536)
    if not args.skip_sd:
        report["sd"] = run_scale("sd", 1280, 20480, 32, 4096, args.sd_steps, 1, args.lr, 8192)
    report["loadavg_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
