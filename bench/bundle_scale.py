"""Bundle size on disk and worker memory per suppressed concept at SD-1.4 scale.

A format-5 bundle of 11 concepts is built from synthetic fits shaped like SD-1.4's up1.1 SAE
(n = 20,480, d_in = 1,280, k = 32, 50 steps): a random SAE, importance tables whose means are
log-normal (the spread of the toy's), calibrated-detector weights [C, steps, n], and a learned
swap per concept covering 80 % of the features at every step (R = 819,200 rows of rank 16),
row sizes log-normal with the toy's spread. It is saved as a bundle (SAE and tables in
float16, swaps compact: uint8 rows, int16 ids, float16 basis, int8 coefficients with a scale
per row, pruned to the rows that carry ``--mass`` of each step's contribution), and the
figure of each lever is printed beside what the same parts cost before (float32 SAE, tables
and basis, int32 ids, float16 coefficients, every row).

Worker memory: the saved bundle is loaded on CPU with the real loader and, per suppressed
concept, a real ``SteeringPlan`` (gated translate, the serving dtype) builds its rows for all
50 steps into a worker ``RowCache``; the growth of the process's USS (psutil, private pages)
is what a worker holds per concept in use. A UNet is not needed for that and is not built.

Quality: each lever's change of the swap's edit Δ on synthetic top-k codes (features drawn in
proportion to their mean activation), relative to the uncompressed swap's Δ.

Run: ``.venv/bin/python bench/bundle_scale.py``. Prints one JSON line and writes
bench/results/bundle_scale.json. Targets: bundle ≤ 300 MB, USS growth ≤ 100 MB per concept.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import tempfile
import time
from pathlib import Path

import psutil
import torch

from steering.bundle import SteeringBundle
from steering.concepts import ConceptSpec
from steering.detector import ConceptDetectors
from steering.edits import ConceptEdit, resolve_edits
from steering.importance_tables import ImportanceTables
from steering.plan import RowCache, SteeringPlan
from steering.recipe import GATED_TRANSLATE
from steering.recipes.translate import RowTranslate
from steering.sae import SaeConfig, TopKSAE
from steering.translation import ConceptTranslation, TranslationTables

D_IN, N, K, STEPS, RANK = 1280, 20480, 32, 50, 16
KINDS = {"color": ["red", "green", "blue", "yellow"], "shape": ["circle", "square", "cross",
                                                                   "triangle"],
         "background": ["plain", "striped", "dotted"]}
CONCEPTS = [c for names in KINDS.values() for c in names]
COVERAGE = 0.8
LOG_SPREAD = 0.6  # σ of log row size (the toy's swaps: 0.57) and of log mean activation
BUDGET_BYTES, USS_BUDGET = 300 * 10**6, 100 * 10**6


def synthetic_tables(g: torch.Generator) -> ImportanceTables:
    """Scores and log-normal means [C, steps, n]; timesteps of a 50-step DDIM schedule."""
    shape = (len(CONCEPTS), STEPS, N)
    means = torch.exp(LOG_SPREAD * 2 * torch.randn(shape, generator=g)) * 0.05
    scores = means * torch.rand(shape, generator=g)
    return ImportanceTables(CONCEPTS, scores, means, torch.arange(STEPS - 1, -1, -1) * 20 + 1)


def synthetic_swap(anchor: str, g: torch.Generator) -> ConceptTranslation:
    """80 % of the features at every step plus the bias, rank 16, log-normal row sizes."""
    m = int(COVERAGE * N)
    feats = torch.cat([torch.cat([torch.sort(torch.randperm(N, generator=g)[:m]).values,
                                  torch.tensor([N])]) for _ in range(STEPS)])
    rows = torch.arange(STEPS).repeat_interleave(m + 1)
    direction = torch.nn.functional.normalize(torch.randn(len(rows), RANK, generator=g), dim=1)
    size = torch.exp(LOG_SPREAD * torch.randn(len(rows), 1, generator=g)) * 0.1
    basis = torch.linalg.qr(torch.randn(STEPS, D_IN, RANK, generator=g)).Q.transpose(1, 2)
    return ConceptTranslation(anchor, rows, feats, (direction * size).half(), basis)


def relative_error(full: ConceptTranslation, other: ConceptTranslation, weight: torch.Tensor,
                   g: torch.Generator, steps: tuple[int, ...] = (0, 25, 49)) -> float:
    """‖Δ_other − Δ_full‖ / ‖Δ_full‖ over 2,048 synthetic tokens at a few steps."""
    num = den = 0.0
    for r in steps:
        idx = torch.multinomial(weight[r], 2048 * K, replacement=True, generator=g)
        indices = idx.view(-1, K)
        values = torch.rand(indices.shape, generator=g) * 2
        parts = []
        for t in (full, other):
            feats, coef, basis, bias = t.factors(r, N)
            parts.append(RowTranslate(feats, coef, bias, basis).delta(values, indices))
        num += float((parts[1] - parts[0]).norm() ** 2)
        den += float(parts[0].norm() ** 2)
    return (num / den) ** 0.5


def uss() -> int:
    """This process's private memory in bytes, after handing freed heap back to the system
    (otherwise new rows land in pages already counted and the growth reads too low)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_full_info().uss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mass", type=float, default=0.8,
                    help="share of each step's swap contribution kept when pruning rows")
    ap.add_argument("--out", type=Path, default=Path("bench/results/bundle_scale.json"))
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()

    sae = TopKSAE(SaeConfig(D_IN, N, K))
    sae.storage_dtype = torch.float16
    tables = synthetic_tables(g)
    tables.storage_dtype = torch.float16
    weight = tables.means.mean(0)  # what a feature typically carries at each step
    full = {c: synthetic_swap(KINDS_OF[c], g) for c in CONCEPTS}
    swaps = TranslationTables(N, D_IN, STEPS, full).pruned(args.mass, weight).quantized()
    red = full["red"]
    quality = {
        "int8_coefficients": relative_error(red, red.quantized(), weight, g),
        "pruned": relative_error(red, red.pruned(args.mass, N, weight), weight, g),
        "pruned_int8": relative_error(red, swaps.get("red"), weight, g),
    }
    rows_full = sum(len(t.row) for t in full.values())
    rows_kept = sum(len(t.row) for t in swaps.concepts.values())
    del full
    specs = [ConceptSpec(name=c, kind=kind, default_gamma=1.0, gamma_range=(0.25, 4.0),
                         default_percentile=95.0)
             for kind, names in KINDS.items() for c in names]
    bundle = SteeringBundle.create(sae, tables, specs, "synthetic-sd14",
                                   {"class_name": "DDIMScheduler", "config": {}},
                                   "bench/bundle_scale.py", recipe=GATED_TRANSLATE)
    bundle.translations = swaps
    c = len(CONCEPTS)
    bundle.detectors = ConceptDetectors(CONCEPTS, torch.randn(c, STEPS, N, generator=g) * 0.01,
                                        torch.zeros(c, STEPS), torch.zeros(c))
    with tempfile.TemporaryDirectory() as tmp:
        bundle.save(tmp)
        files = {p.name: p.stat().st_size for p in sorted(Path(tmp).iterdir())}
        del bundle, sae, tables, swaps
        loaded = SteeringBundle.load(tmp)
        baseline = uss()
        cache = RowCache()
        specs_of = {s.name: s for s in loaded.manifest.concepts}
        growth, cache_bytes = [], []
        for name in ("red", "circle"):
            before, held = uss(), cache.bytes
            plan = SteeringPlan(loaded.tables, loaded.sae.W_dec.detach(),
                                resolve_edits([ConceptEdit(name)], specs_of), KINDS,
                                GATED_TRANSLATE, loaded.translations, cache=cache,
                                scope=loaded.sha256, swap_dtype=torch.float32)
            plan.prepare(range(STEPS))
            growth.append(uss() - before)
            cache_bytes.append(cache.bytes - held)
        fp16_plan = SteeringPlan(loaded.tables, loaded.sae.W_dec.detach(),
                                 resolve_edits([ConceptEdit("green")], specs_of), KINDS,
                                 GATED_TRANSLATE, loaded.translations, cache=cache,
                                 scope="fp16", swap_dtype=torch.float16)
        held = cache.bytes
        fp16_plan.prepare(range(STEPS))
        fp16_bytes = cache.bytes - held
    rows_per_step = rows_kept / c / STEPS
    d = D_IN
    before_bytes = {  # the same parts as stored before: float32 SAE, tables, basis; int32 ids
        "sae.safetensors": 4 * (2 * N * d + N + d),
        "importance.safetensors": 4 * 2 * c * STEPS * N,
        "translation.safetensors": rows_full * (4 + 4 + 2 * RANK) + c * STEPS * RANK * d * 4,
    }
    result = {
        "bench": "bundle_scale", "shape": {"d_in": D_IN, "n": N, "k": K, "steps": STEPS,
                                            "rank": RANK, "concepts": c,
                                            "swap_coverage": COVERAGE},
        "bundle_bytes": sum(files.values()), "budget_bytes": BUDGET_BYTES,
        "files": files, "before_bytes": before_bytes,
        "swap_rows": {"fitted": rows_full, "kept": rows_kept, "mass_kept": args.mass},
        "uss_growth_per_concept_bytes": int(max(growth)),
        "uss_budget_bytes": USS_BUDGET,
        "uss_growth_each": growth, "uss_baseline_bytes": baseline,
        "plan_cache_bytes_per_concept": {"float32": int(max(cache_bytes)), "float16": fp16_bytes},
        "materialised_rows_bytes_per_concept": {  # what [m, d_in] rows would hold instead
            "float32": int(rows_per_step * d * 4 * STEPS),
            "float16": int(rows_per_step * d * 2 * STEPS)},
        "delta_relative_error": quality,
        "measure": "USS growth of one process building real SteeringPlan rows (gated "
                   "translate, float32 = a CPU worker's serving dtype) for all 50 steps "
                   "from the bundle as loaded by SteeringBundle.load",
        "seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    line = json.dumps(result)
    print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(line + "\n")


KINDS_OF = {c: next(n for n in names if n != c) for names in KINDS.values() for c in names}

if __name__ == "__main__":
    main()
