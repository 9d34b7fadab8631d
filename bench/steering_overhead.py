"""Steering overhead per UNet step at SD-1.4 shapes: plain generation vs the plain recipe vs the
shipped recipe.

Measures the wall time of one SD-1.4 UNet forward (random fp32 weights on CPU, batch 1 with
classifier-free guidance = UNet batch 2, 64x64 latents, random text embeddings [2, 77, 768])
in three configurations, interleaved in rounds in the same process (the machine is noisy),
and reports min / median / max of each and the ratios of the medians, and the median time of
the steering hook alone (called on an up1.1-shaped output, best of 3 per round) with the
ratios it implies on the fastest plain step (``from_hooks``: the step's own noise on a
shared machine is larger than the hook):

- plain:   no hook (plain generation);
- recipe:  the plain recipe: ``StepTracker`` on the UNet, ``SteeringHook`` on up1.1 with two
           suppression edits at gamma 20 (a few features each) and a ``DetectionPlan``;
- shipped: the shipped recipe as format 5 serves it (gated ``translate``): the same hooks
           with learned swaps for two suppressed concepts whose rows cover
           ``--swap-coverage`` of the features at the step, gated by the detectors, which
           also read every concept before and after the edit (one more encode of the cond
           half).

Both steered configurations run as in serving: the schedule's table rows are given to the
tracker and the plan's rows are built before timing (what a worker's plan cache holds after
its first request), so the hook makes no host synchronisation. The SAE is random (d_in=1280,
n=20480, k=32); the importance tables have one row, at the timestep used. The gate uses
synthetic detectors whose thresholds keep every image gated in, so the swaps are always
applied. Prints one JSON line
and writes it (pretty) to ``--out``. Targets: shipped/recipe <= 1.02, shipped/plain <= 1.05.

Run: ``.venv/bin/python bench/steering_overhead.py`` (``--rounds 1 --warmup 0`` for a smoke
run).
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
from steering.detector import ConceptDetectors, DetectorReadout
from steering.edits import Direction, ResolvedEdit
from steering.fingerprint import HOOK_POINT
from steering.gate import ConceptGate
from steering.hooks import EditStage, SteeringHook, StepTracker, attached
from steering.importance_tables import ImportanceTables
from steering.plan import DetectionPlan, RowCache, SteeringPlan
from steering.recipe import GATED_TRANSLATE, PLAIN
from steering.sae import SaeConfig, TopKSAE
from steering.sd14 import build_sd14_unet
from steering.translation import ConceptTranslation, TranslationTables

D_IN, N_LATENTS, K = 1280, 20480, 32
RANK = 16  # the shipped swaps' basis rank
GAMMA = 20.0
TIMESTEP = 981  # first DDIM timestep of a 50-step SD schedule
KIND = "object"
CONFIGS = ("plain", "recipe", "shipped")


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


def make_swap(anchor: str, coverage: float, generator: torch.Generator) -> ConceptTranslation:
    """A learned swap at row 0 over ``coverage`` of the features (and the bias), rank RANK."""
    m = int(coverage * N_LATENTS)
    features = torch.cat([torch.randperm(N_LATENTS, generator=generator)[:m],
                          torch.tensor([N_LATENTS])])
    coef = (0.01 * torch.randn(m + 1, RANK, generator=generator)).half()
    basis = torch.linalg.qr(torch.randn(1, D_IN, RANK, generator=generator)).Q.transpose(1, 2)
    return ConceptTranslation(anchor, torch.zeros(m + 1, dtype=torch.long), features, coef,
                              basis.contiguous())


def synthetic_detectors(tables: ImportanceTables, generator: torch.Generator
                        ) -> ConceptDetectors:
    """Detectors of SD-1.4's width that find every concept in every image (τ far below any
    score), so the shipped edits always apply and every read-out does its full work."""
    names, c = tables.concepts, tables.num_concepts
    weight = (0.01 * torch.randn(c, 1, N_LATENTS, generator=generator)).half()
    return ConceptDetectors(names, weight, torch.zeros(c, 1), torch.full((c,), -1e9))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9,
                   help="timed rounds (each runs all 3 configurations once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    p.add_argument("--features-per-concept", type=int, default=3,
                   help="features each plain-recipe concept selects (SAeUron's 99.99 "
                   "percentile: 1-3 of 20480)")
    p.add_argument("--swap-coverage", type=float, default=0.8,
                   help="fraction of the features each learned swap has a row for")
    p.add_argument("--out", type=Path, default=Path("bench/results/steering_overhead.json"))
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1, --warmup >= 0")
    if not 1 <= args.features_per_concept < N_LATENTS:
        p.error(f"--features-per-concept must be in [1, {N_LATENTS})")
    if not 0.0 < args.swap_coverage <= 1.0:
        p.error("--swap-coverage must be in (0, 1]")
    return args


def spread(times: list[float]) -> dict[str, float]:
    """min / median / max of one configuration's step times, in seconds."""
    return {"min": round(min(times), 4), "median": round(statistics.median(times), 4),
            "max": round(max(times), 4)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the models, time the three configurations in rounds, print and write the result."""
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

    # two suppressed concepts, each with an anchor of its kind to be swapped for
    names = ["concept0", "concept1", "anchor0", "anchor1"]
    kinds = {KIND: names}
    tables = make_tables(names, N_LATENTS, gen)
    pct = percentile_for(args.features_per_concept, N_LATENTS)
    for c in range(2):
        got = tables.selected_features(c, 0, pct).numel()
        if got != args.features_per_concept:
            raise SystemExit(f"percentile {pct} selected {got} features for concept {c}, "
                             f"expected {args.features_per_concept}")
    specs = [ConceptSpec(name, KIND, GAMMA, (0.0, 50.0), pct) for name in names]
    edits = [ResolvedEdit(s, GAMMA, pct, Direction.SUPPRESS) for s in specs[:2]]
    swaps = TranslationTables(N_LATENTS, D_IN, 1, {
        f"concept{i}": make_swap(f"anchor{i}", args.swap_coverage, gen) for i in range(2)})
    detection = DetectionPlan(tables, [pct] * len(names), sae.device)
    detection.prepare([0])
    cache = RowCache()
    plans = {"recipe": SteeringPlan(tables, sae.W_dec.detach(), edits, kinds, PLAIN),
             "shipped": SteeringPlan(tables, sae.W_dec.detach(), edits, kinds,
                                     GATED_TRANSLATE, swaps, cache=cache, scope="bench")}
    plans["recipe"].prepare([0])
    started = time.perf_counter()
    plans["shipped"].prepare([0])  # what a worker's first request with these edits builds
    build_s = time.perf_counter() - started
    detectors = synthetic_detectors(tables, gen)
    shipped = plans["shipped"]

    def hooks_for(config: str) -> list[tuple[torch.nn.Module, str, ModelHook]]:
        """The plain recipe as format 1–4 served it (sparse detection score); the shipped one
        as format 5 serves it: the detectors gate the swaps and read every concept before
        and after the edit."""
        if config == "plain":
            return []
        tracker = StepTracker([TIMESTEP], [0])
        if config == "shipped":
            gate = ConceptGate(tables, kinds, shipped.gate_margins, shipped.gate_anchors,
                               None, detectors)
            steer = SteeringHook(sae, tables, tracker, cfg=True, stages=[EditStage(shipped, gate)],
                                 before=DetectorReadout(detectors),
                                 after=DetectorReadout(detectors))
        else:
            steer = SteeringHook(sae, tables, tracker, cfg=True,
                                 stages=[EditStage(plans[config])], detection=detection)
        return [(unet, "step_tracker", tracker), (block, "steering", steer)]

    def step(config: str) -> float:
        with attached(hooks_for(config)), torch.inference_mode():
            t0 = time.perf_counter()
            unet(latents, timestep, encoder_hidden_states=text)
            return time.perf_counter() - t0

    block_out = torch.randn(2, D_IN, 16, 16, generator=gen)  # up1.1's output at 512²

    def hook_only(config: str) -> float:
        """The steering hook alone on an up1.1-shaped output: its cost without the UNet's
        noise (the whole step is ~100× longer)."""
        ((_, _, tracker), (_, _, steer)) = hooks_for(config)
        tracker.pre_forward(unet, latents, timestep)
        with torch.inference_mode():
            t0 = time.perf_counter()
            steer.post_forward(block, (block_out,))
            return time.perf_counter() - t0

    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    hook_times: dict[str, list[float]] = {c: [] for c in CONFIGS[1:]}
    for _ in range(args.warmup):
        for config in CONFIGS:
            step(config)
    for r in range(args.rounds):
        order = CONFIGS[r % 3:] + CONFIGS[: r % 3]  # rotate so no config always runs first
        for config in order:
            times[config].append(step(config))
            if config != "plain":
                hook_only(config)  # once untimed: the hook's first call allocates
                hook_times[config].append(min(hook_only(config) for _ in range(3)))

    med = {c: statistics.median(v) for c, v in times.items()}
    hook = {c: statistics.median(v) for c, v in hook_times.items()}
    # the least disturbed plain step plus each hook alone: robust when the machine is noisy
    base = min(times["plain"])
    result = {
        "bench": "steering_overhead",
        **{f"{c}_s": spread(times[c]) for c in CONFIGS},
        "recipe_over_plain": round(med["recipe"] / med["plain"], 4),
        "shipped_over_recipe": round(med["shipped"] / med["recipe"], 4),
        "shipped_over_plain": round(med["shipped"] / med["plain"], 4),
        "target": "shipped/recipe <= 1.02, shipped/plain <= 1.05",
        **{f"{c}_hook_ms": round(1000 * v, 1) for c, v in hook.items()},
        "from_hooks": {
            "shipped_over_recipe": round((base + hook["shipped"]) / (base + hook["recipe"]), 4),
            "shipped_over_plain": round((base + hook["shipped"]) / base, 4)},
        "swap_rows_per_concept": int(args.swap_coverage * N_LATENTS),
        "shipped_plan_build_s": round(build_s, 3),
        "shipped_plan_cache_mb": round(cache.bytes / 2**20, 1),
        "gate": "detectors (before and after read-outs)",
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
