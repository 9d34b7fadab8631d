"""SD-scale SAE training on a GPU: the sd14 presets' per-step time and memory, measured.

On the CUDA device at hand, for each ``sd14-*`` preset (d 1280, n 20480, k 32, batch 4096,
bf16 autocast):

- ``step``: median wall time of ``--step-repeats`` real training steps on random data
  (``measure_step_seconds``, synchronised) and peak allocated GPU memory, beside the preset's
  own FLOP/byte estimate (what ``steer train --dry-run`` prints);
- ``end_to_end``: ``train_sae`` for ``--steps`` steps from a random activation store on disk
  (``MemmapSource`` → ``ActivationLoader`` with pinned staging → the trainer), timed from the
  first step to the last, so the loader feeding the GPU is part of the figure.

Run on a GPU machine: ``python bench/gpu_training.py`` (prints one JSON line and writes
bench/results/gpu_training.json). Needs no diffusers or sparsify.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from random_store import build_random_store

from training.activations.loader import MemmapSource
from training.activations.store import ActivationStore
from training.trainer.loop import train_sae
from training.trainer.presets import (
    PRESETS,
    measure_step_seconds,
    memory_estimate,
    time_estimate,
)

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_training.json"


def step_figures(name: str, repeats: int) -> dict[str, object]:
    """Measured step time and peak memory of preset ``name`` beside its estimate."""
    preset = PRESETS[name]
    cfg = preset.config()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    per_step = measure_step_seconds(cfg, "cuda", steps=repeats)
    estimate = time_estimate(preset, cfg)
    memory = memory_estimate(cfg)
    gpu_estimate = sum(v for k, v in memory.items() if k != "loader_buffers")
    return {"preset": name, "measured_ms_per_step": round(per_step * 1e3, 2),
            "measured_tokens_per_s": round(cfg.batch_size / per_step),
            "estimated_ms_per_step": round(estimate.per_step * 1e3, 2),
            "measured_total_h": round(per_step * cfg.total_steps / 3600, 2),
            "estimated_total_h": round(estimate.total / 3600, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "estimated_gpu_gib": round(gpu_estimate / 2**30, 2)}


def end_to_end(store: ActivationStore, steps: int, out: Path) -> dict[str, object]:
    """Tokens/s of ``train_sae`` (sd14-h100 settings, ``steps`` steps) fed from ``store``."""
    cfg = PRESETS["sd14-h100"].config(total_steps=steps, warmup_steps=10, log_every=10,
                                      checkpoint_every=10 * steps)
    shutil.rmtree(out, ignore_errors=True)
    source = MemmapSource([store], chunk_rows=cfg.chunk_rows)
    start = time.perf_counter()
    train_sae(cfg, source, out, device="cuda", progress=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # first: start-up
    return {"steps": steps, "wall_s": round(wall, 1), "read_threads": source.read_threads,
            "logged_tokens_per_s_median": round(statistics.median(rates)) if rates else None,
            "store_rows": store.num_rows,
            "final_fvu": rows[-1].get("fvu") if rows else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path,
                    default=Path(tempfile.gettempdir()) / "sae-steering-bench-gpu-store")
    ap.add_argument("--rows", type=int, default=409_600, help="rows of the random store")
    ap.add_argument("--steps", type=int, default=200, help="end-to-end training steps")
    ap.add_argument("--step-repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_training.py needs a CUDA device")
    result: dict[str, object] = {
        "bench": "gpu_training", "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "cpus": os.cpu_count(),
        "step": [step_figures(name, args.step_repeats) for name in ("sd14-a100", "sd14-h100")],
    }
    store = build_random_store(args.store, 1280, max(1, args.rows // 10240), 1024, 10,
                               prompts_per_shard=4, seed=0, command="bench/gpu_training.py")
    result["end_to_end"] = end_to_end(store, args.steps, args.store.parent / "gpu-train-run")
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
