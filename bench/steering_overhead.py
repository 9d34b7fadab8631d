"""Steering overhead per UNet step at SD-1.4 shapes: plain vs steered vs the reference's naive hook.

Measures the wall time of one SD-1.4 UNet forward (random fp32 weights on CPU, batch 1 with
classifier-free guidance = UNet batch 2, 64x64 latents, random text embeddings [2, 77, 768])
in three configurations, run round-robin in the same process (the machine is noisy), and
reports the median of each and the ratios to plain:

- plain:   no hook;
- steered: the production path (``StepTracker`` on the UNet, ``SteeringHook`` on up1.1 with a
           ``SteeringPlan`` of two suppression edits at gamma 20 and a ``DetectionPlan``):
           encoder GEMM + top-k, decode of the selected columns only;
- naive:   what the reference implementation does every step: dense n-wide latents, a dense
           edit, dense decodes of both z and z' for both CFG halves, out = x + D(z') - D(z).

The SAE is random (d_in=1280, n=20480, k=32); the importance tables have one row whose timestep
is the one used, with percentiles picked so each concept selects ``--features-per-concept``
features. Prints one JSON line and writes it (pretty) to ``--out``. Target: steered/plain <= 1.03.

Run: ``.venv/bin/python bench/steering_overhead.py`` (``--repeats 1 --warmup 0`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import ModelHook

from steering.concepts import ConceptSpec
from steering.edits import Direction, ResolvedEdit
from steering.fingerprint import HOOK_POINT
from steering.hooks import (
    SteeringHook,
    StepTracker,
    attached,
    from_tokens,
    output_tensor,
    replace_output,
    to_tokens,
)
from steering.importance_tables import ImportanceTables
from steering.plan import DetectionPlan, SteeringPlan
from steering.sae import SaeConfig, TopKSAE
from steering.sd14 import build_sd14_unet

D_IN, N_LATENTS, K = 1280, 20480, 32
GAMMA = 20.0
TIMESTEP = 981  # first DDIM timestep of a 50-step SD schedule
KIND = "object"


class NaiveSteeringHook(ModelHook):
    """The reference's per-step path: dense z and edit, dense decodes of z and z' (both halves)."""

    def __init__(self, sae: TopKSAE, features: torch.Tensor, threshold: torch.Tensor,
                 multiplier: torch.Tensor) -> None:
        super().__init__()
        self.sae, self.features = sae, features
        self.threshold, self.multiplier = threshold, multiplier

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        x = output_tensor(output)
        values, indices = self.sae.encode(to_tokens(x))
        z = self.sae.dense_latents(values, indices)  # [N·H·W, n]
        z_edit = z.clone()
        zs = z[:, self.features]
        z_edit[:, self.features] = torch.where(zs > self.threshold, zs * self.multiplier, zs)
        delta = self.sae.decode_dense(z_edit) - self.sae.decode_dense(z)
        return replace_output(output, x + from_tokens(delta, x).to(x.dtype))


def check_same_edit(sae: TopKSAE, tables: ImportanceTables, plan: SteeringPlan,
                    detection: DetectionPlan, features: torch.Tensor,
                    naive: NaiveSteeringHook) -> None:
    """Refuse to time anything unless the steered and naive hooks make the same edit."""
    tracker = StepTracker()
    tracker.timestep = TIMESTEP
    steer = SteeringHook(sae, tables, tracker, cfg=True, plan=plan, detection=detection)
    g = torch.Generator().manual_seed(2)
    # tokens built from the selected directions, so the suppression mask is on somewhere
    tokens = 0.1 * torch.randn(8, D_IN, generator=g)
    tokens[: features.numel()] += 20.0 * sae.W_dec.detach()[features]
    x = tokens.reshape(2, 2, 2, D_IN).permute(0, 3, 1, 2)
    a = output_tensor(steer.post_forward(None, (x.clone(),)))  # type: ignore[arg-type]
    b = output_tensor(naive.post_forward(None, (x.clone(),)))  # type: ignore[arg-type]
    if torch.equal(a, x) or not torch.allclose(a, b, rtol=1e-4, atol=1e-3):
        raise SystemExit("steered and naive hooks disagree; the benchmark would compare "
                         "different work")


def percentile_for(features: int, n: int) -> float:
    """Percentile whose linear quantile falls halfway inside the gap below the top ``features``."""
    return 100.0 * (1.0 - (features - 0.5) / (n - 1))


def make_tables(concepts: list[str], n: int, generator: torch.Generator) -> ImportanceTables:
    """Random scores, positive random μ, one row at ``TIMESTEP``."""
    c = len(concepts)
    return ImportanceTables(
        concepts=concepts,
        scores=torch.randn(c, 1, n, generator=generator),
        means=torch.rand(c, 1, n, generator=generator) + 0.05,
        timesteps=torch.tensor([TIMESTEP]),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs all 3 configs)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    p.add_argument("--concepts", type=int, default=2, help="suppressed (and detected) concepts")
    p.add_argument("--features-per-concept", type=int, default=3,
                   help="features each concept selects (SAeUron's 99.99 percentile: 1-3 of 20480)")
    p.add_argument("--out", type=Path, default=Path("bench/results/steering_overhead.json"))
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.concepts < 1:
        p.error("--repeats and --concepts must be >= 1, --warmup >= 0")
    if not 1 <= args.features_per_concept < N_LATENTS:
        p.error(f"--features-per-concept must be in [1, {N_LATENTS})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the models, time the three configurations round-robin, print and write the result."""
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(0)

    unet = build_sd14_unet("cpu", torch.float32, seed=0)
    block = unet.get_submodule(HOOK_POINT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        sae = TopKSAE(SaeConfig(d_in=D_IN, num_latents=N_LATENTS, k=K)).eval()
    latents = torch.randn(2, 4, 64, 64, generator=gen)  # cat([uncond, cond])
    text = torch.randn(2, 77, 768, generator=gen)
    timestep = torch.tensor(TIMESTEP)

    names = [f"concept{i}" for i in range(args.concepts)]
    tables = make_tables(names, N_LATENTS, gen)
    pct = percentile_for(args.features_per_concept, N_LATENTS)
    for c in range(args.concepts):
        got = tables.selected_features(c, 0, pct).numel()
        if got != args.features_per_concept:
            raise SystemExit(f"percentile {pct} selected {got} features for concept {c}, "
                             f"expected {args.features_per_concept}")
    specs = [ConceptSpec(name, KIND, GAMMA, (0.0, 50.0), pct) for name in names]
    edits = [ResolvedEdit(s, GAMMA, pct, Direction.SUPPRESS) for s in specs]
    plan = SteeringPlan(tables, sae.W_dec.detach(), edits, {KIND: names})
    detection = DetectionPlan(tables, [pct] * args.concepts, sae.device)
    row = plan.row(0).parts[0][1]  # the naive hook edits the same features the same way
    naive_mult = row.scale + 1.0  # scale = -γμ - 1, so z' = z·(-γμ) = z·(scale + 1)

    check_same_edit(sae, tables, plan, detection, row.features, NaiveSteeringHook(
        sae, row.features, row.threshold, naive_mult))

    def hooks_for(config: str) -> list[tuple[torch.nn.Module, str, ModelHook]]:
        if config == "steered":
            tracker = StepTracker()
            steer = SteeringHook(sae, tables, tracker, cfg=True, plan=plan, detection=detection)
            return [(unet, "step_tracker", tracker), (block, "steering", steer)]
        if config == "naive":
            return [(block, "naive", NaiveSteeringHook(sae, row.features, row.threshold,
                                                       naive_mult))]
        return []

    def step(config: str) -> float:
        with attached(hooks_for(config)), torch.inference_mode():
            t0 = time.perf_counter()
            unet(latents, timestep, encoder_hidden_states=text)
            return time.perf_counter() - t0

    configs = ["plain", "steered", "naive"]
    times: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(args.warmup):
        for config in configs:
            step(config)
    for r in range(args.repeats):
        order = configs[r % 3:] + configs[: r % 3]  # rotate so no config always runs first
        for config in order:
            times[config].append(step(config))

    med: dict[str, float] = {c: statistics.median(v) for c, v in times.items()}
    result = {
        "bench": "steering_overhead",
        "plain_s": round(med["plain"], 4),
        "steered_s": round(med["steered"], 4),
        "naive_s": round(med["naive"], 4),
        "steered_over_plain": round(med["steered"] / med["plain"], 4),
        "naive_over_plain": round(med["naive"] / med["plain"], 4),
        "target": "steered/plain <= 1.03",
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
