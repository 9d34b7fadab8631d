"""Activation loader throughput ÷ a plain sequential memmap read of the same shard files.

Builds (or reuses) a store of random float16 rows at SD-1.4's d_in = 1280 with the store's
own ShardWriter, reads every shard once to warm the page cache, then times, round-robin in
one process for ``--repeats`` rounds, ``--epochs`` passes over the store by:

- loader:     ``ActivationLoader(MemmapSource(store), 4096)`` with the default shuffle buffer
              and prefetch, batches converted to float32; ``ratio`` includes the start-up (the
              first buffer is filled before the first batch), ``ratio_steady`` starts the clock
              at the first batch;
- sequential: ``np.load(mmap_mode="r")`` of each shard, 4096-row slices in file order,
              ``torch.from_numpy(slice).float()``.

Both read page-cache-warm files, so this compares the loader's CPU overhead (shuffle, thread,
copies), not the disk. The loader's consumer does the baseline's work (a float16 -> float32
copy) and its prefetch thread shuffles beside it, so the ratio depends on a free core: the
JSON records the load average and each contender's rows per CPU-second. Prints one JSON
line with the median rates and their ratios and writes it to ``--out``. Target: loader /
sequential >= 0.8.

Run: ``.venv/bin/python bench/loader_throughput.py`` (smoke: ``--epochs 2 --repeats 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from random_store import build_random_store

from training.activations.loader import ActivationLoader, MemmapSource
from training.activations.store import ActivationStore

D_IN, BATCH, TOKENS_PER_STEP, STEPS_PER_PROMPT = 1280, 4096, 1024, 10
ROWS_PER_PROMPT = TOKENS_PER_STEP * STEPS_PER_PROMPT


def sequential(store: ActivationStore, epochs: int) -> dict[str, float]:
    """Rows per second and per CPU-second of reading every shard in file order in BATCH-row
    slices, converted to float32."""
    wall, cpu, rows = time.perf_counter(), time.process_time(), 0
    arrays = [store.shard_array(shard) for shard in store.shard_ids()]  # mapped once, as ours
    for _ in range(epochs):
        for array in arrays:
            for i in range(0, len(array), BATCH):
                rows += len(torch.from_numpy(array[i:i + BATCH]).float())
    return {"sequential": rows / (time.perf_counter() - wall),
            "sequential_cpu": rows / (time.process_time() - cpu)}


def loader(store: ActivationStore, epochs: int, seed: int) -> dict[str, float]:
    """Rows per second (overall and from the first batch on), per CPU-second (both threads)
    and seconds to the first batch of the loader's float32 batches over ``epochs`` epochs."""
    wall, cpu = time.perf_counter(), time.process_time()
    with ActivationLoader(MemmapSource([store]), BATCH, seed=seed) as stream:
        batches = iter(stream)
        next(batches)
        first = time.perf_counter()
        count = epochs * stream.epoch_rows // BATCH
        for _, batch in zip(range(count - 1), batches, strict=False):
            assert batch.dtype == torch.float32
    end, rows = time.perf_counter(), count * BATCH
    return {"loader": rows / (end - wall), "loader_steady": (rows - BATCH) / (end - first),
            "loader_cpu": rows / (time.process_time() - cpu), "loader_first_batch_s": first - wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path,
                        default=Path(tempfile.gettempdir()) / "sae-steering-bench-loader-store")
    parser.add_argument("--rows", type=int, default=122_880,
                        help="rows in the store (rounded to 10240-row prompts; 2.6 kB each)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "loader_throughput.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # baseline's slices

    store = build_random_store(args.store, D_IN, max(1, args.rows // ROWS_PER_PROMPT),
                               TOKENS_PER_STEP, STEPS_PER_PROMPT, prompts_per_shard=4, seed=0,
                               command="bench/loader_throughput.py")
    sequential(store, 1)  # warm the page cache: both contenders read cached pages
    load_before = os.getloadavg()[0]
    runs: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        for name, value in [*sequential(store, args.epochs).items(),
                            *loader(store, args.epochs, seed=repeat).items()]:
            runs.setdefault(name, []).append(value)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "bench": "loader_throughput",
        "rows": store.num_rows, "d_in": D_IN,
        "store_mb": round(store.num_rows * D_IN * 2 / 2**20, 1),
        "shards": len(store.shard_ids()), "batch_size": BATCH, "epochs_per_run": args.epochs,
        "buffer_blocks": 64, "chunk_rows": 4096, "page_cache": "warm",
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "loader_tokens_per_s": round(med["loader"]),
        "sequential_tokens_per_s": round(med["sequential"]),
        "ratio": round(med["loader"] / med["sequential"], 3),
        "loader_steady_tokens_per_s": round(med["loader_steady"]),
        "ratio_steady": round(med["loader_steady"] / med["sequential"], 3),
        "loader_first_batch_s": round(med["loader_first_batch_s"], 3),
        "loader_tokens_per_cpu_s": round(med["loader_cpu"]),
        "sequential_tokens_per_cpu_s": round(med["sequential_cpu"]),
        "runs": {k: [round(r, 3) if k.endswith("_s") else round(r) for r in v]
                 for k, v in runs.items()},
    }
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
