"""Collection throughput ÷ plain generation throughput on the toy pipeline.

Same prompts, seeds and batch size (DDIM 20 steps, guidance 4, 32 px, assets/toy-pipeline),
timed round-robin in one process for ``--repeats`` rounds:

- collect:      ``collect()`` into a fresh store folder (capture hook, fp16 copies, writer
                thread, fsync'd shards and commit records; the UNet probe and store set-up
                included), every step captured;
- plain:        ``pipe(...)`` as a user generates images (decoded to PIL);
- plain_latent: ``pipe(..., output_type="latent")``: the same denoising without the VAE
                decode, which collection skips too; the stricter baseline.

The order of the three alternates between rounds. Each is timed by wall clock and by process
CPU time (all threads, the writer included): on a machine shared with other jobs the wall
clock is noisy, the CPU time much less so. Prints one JSON line with the median images/s of
both clocks and their ratios and writes it to ``--out``. Target: collect / plain >= 0.9.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/collection_throughput.py``.
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

from steering.pipeline import SteeredPipeline
from training.activations.collect import collect
from training.activations.prompts import PromptRecord, write_prompts
from training.activations.store import ActivationStore

REPO = Path(__file__).resolve().parents[1]
STEPS, GUIDANCE, SIZE = 20, 4.0, 32
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def prompts(n: int) -> list[PromptRecord]:
    """``n`` labelled toy prompts with seeds 0..n-1."""
    return [PromptRecord(i, f"a {COLOURS[i % 4]} {SHAPES[i % 3]}",
                         {"colour": COLOURS[i % 4], "shape": SHAPES[i % 3]}, seed=i)
            for i in range(n)]


def plain(pipe, records: list[PromptRecord], batch: int, output_type: str) -> None:
    """Generate the prompts' images with the plain pipeline, ``batch`` per call."""
    for s in range(0, len(records), batch):
        part = records[s:s + batch]
        pipe(prompt=[r.prompt for r in part], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
             height=SIZE, width=SIZE, output_type=output_type,
             generator=[torch.Generator().manual_seed(r.seed) for r in part])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", type=Path, default=REPO / "assets" / "toy-pipeline")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                    "collection_throughput.json")
    args = ap.parse_args()

    pipe = SteeredPipeline.from_pretrained(args.pipeline, device=args.device).pipe
    records = prompts(args.prompts)
    work = Path(tempfile.mkdtemp(prefix="collect-bench-"))
    prompt_file = work / "prompts.jsonl"
    write_prompts(prompt_file, records)
    plain(pipe, records[:args.batch_size], args.batch_size, "pil")  # warm-up
    names = ["collect", "plain", "plain_latent"]
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    rows = 0
    try:
        for rep in range(args.repeats):
            for name in names if rep % 2 == 0 else names[::-1]:
                started, cpu_started = time.perf_counter(), time.process_time()
                if name == "collect":
                    out = work / f"store-{rep}"
                    store: ActivationStore = collect(
                        pipe, prompt_file, out, steps=STEPS, guidance=GUIDANCE, height=SIZE,
                        width=SIZE, prompts_per_shard=args.batch_size * 2,
                        batch_size=args.batch_size, command="bench", progress=False)
                    rows = store.num_rows
                else:
                    plain(pipe, records, args.batch_size,
                          "pil" if name == "plain" else "latent")
                wall[name].append(len(records) / (time.perf_counter() - started))
                cpu[name].append(len(records) / (time.process_time() - cpu_started))
                if name == "collect":
                    shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "bench": "collection_throughput",
        "pipeline": str(args.pipeline.relative_to(REPO) if args.pipeline.is_relative_to(REPO)
                        else args.pipeline),
        "device": args.device, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
        "steps": STEPS, "guidance": GUIDANCE, "size": SIZE, "prompts": len(records),
        "batch_size": args.batch_size, "repeats": args.repeats, "rows_per_run": rows,
        "tokens_per_s_collect": round(med["collect"] * rows / len(records), 1),
        "images_per_s_wall": {k: round(v, 3) for k, v in med.items()},
        "images_per_s_cpu": {k: round(v, 3) for k, v in med_cpu.items()},
        "ratio_collect_vs_plain_wall": round(med["collect"] / med["plain"], 3),
        "ratio_collect_vs_plain_latent_wall": round(med["collect"] / med["plain_latent"], 3),
        "ratio_collect_vs_plain_cpu": round(med_cpu["collect"] / med_cpu["plain"], 3),
        "ratio_collect_vs_plain_latent_cpu": round(med_cpu["collect"]
                                                   / med_cpu["plain_latent"], 3),
        "all_images_per_s_wall": {k: [round(x, 3) for x in v] for k, v in wall.items()},
        "target": ">= 0.9 (collect vs plain)",
    }
    line = json.dumps(result)
    print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
