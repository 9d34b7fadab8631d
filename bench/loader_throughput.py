"""Activation loader throughput ÷ a plain sequential memmap read of the same shard files.

Two stores of random float16 rows at SD-1.4's d_in = 1280, written with the store's own
ShardWriter, and two settings, each timed round-robin in one process:

- from storage (``ratio``, the training case: an SD-scale store is hundreds of GB, far beyond
  RAM, so every epoch reads the disk): a 3 GB store whose pages are dropped from the page cache
  (``posix_fadvise(DONTNEED)``, no root needed) before each contender's epoch;
- page-cache warm (``ratio_warm``, the CPU overhead alone: shuffle, thread, copies): a 300 MB
  store read once beforehand, ``--epochs`` epochs per timing.

Contenders:

- loader:     ``ActivationLoader(MemmapSource(store), 4096)`` with the default shuffle buffer
              (64 blocks of 4096 rows) and prefetch, batches converted to float32; timings
              include the start-up (the first buffer is filled before the first batch);
- sequential: ``np.load(mmap_mode="r")`` of each shard, 4096-row slices in file order,
              ``torch.from_numpy(slice).float()``.

The JSON records the load average and each contender's rows per CPU-second. Prints one JSON
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


def drop_from_page_cache(store: ActivationStore) -> None:
    """Evict the store's shard files from the page cache, so the next read comes from disk."""
    for shard in store.shard_ids():
        fd = os.open(store.shard_array(shard).filename, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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


def loader(store: ActivationStore, epochs: int, seed: int,
           read_threads: int | None = None) -> dict[str, float]:
    """Rows per second (overall and from the first batch on), per CPU-second (both threads)
    and seconds to the first batch of the loader's float32 batches over ``epochs`` epochs."""
    wall, cpu = time.perf_counter(), time.process_time()
    source = MemmapSource([store], read_threads=read_threads)
    with ActivationLoader(source, BATCH, seed=seed) as stream:
        batches = iter(stream)
        next(batches)
        first = time.perf_counter()
        count = epochs * stream.epoch_rows // BATCH
        for _, batch in zip(range(count - 1), batches, strict=False):
            assert batch.dtype == torch.float32
    end, rows = time.perf_counter(), count * BATCH
    return {"loader": rows / (end - wall), "loader_steady": (rows - BATCH) / (end - first),
            "loader_cpu": rows / (time.process_time() - cpu), "loader_first_batch_s": first - wall}


def median_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-key medians of a list of timing dicts."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    tmp = Path(tempfile.gettempdir())
    parser.add_argument("--store", type=Path, default=tmp / "sae-steering-bench-loader-store",
                        help="page-cache-warm store (built when missing)")
    parser.add_argument("--rows", type=int, default=122_880,
                        help="rows in the warm store (rounded to 10240-row prompts; 2.6 kB each)")
    parser.add_argument("--cold-store", type=Path,
                        default=tmp / "sae-steering-bench-loader-store-cold",
                        help="store read from disk (built when missing)")
    parser.add_argument("--cold-rows", type=int, default=1_228_800,
                        help="rows in the from-storage store (3 GB by default: several buffers)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per warm timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--read-threads", type=int, default=None,
                        help="MemmapSource read threads (default: its own, half the CPUs)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "loader_throughput.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # baseline's slices

    def build(path: Path, rows: int) -> ActivationStore:
        return build_random_store(path, D_IN, max(1, rows // ROWS_PER_PROMPT), TOKENS_PER_STEP,
                                  STEPS_PER_PROMPT, prompts_per_shard=4, seed=0,
                                  command="bench/loader_throughput.py")

    cold, warm = build(args.cold_store, args.cold_rows), build(args.store, args.rows)
    load_before = os.getloadavg()[0]
    cold_runs: list[dict[str, float]] = []
    for repeat in range(args.repeats):
        drop_from_page_cache(cold)
        run = sequential(cold, 1)
        drop_from_page_cache(cold)
        cold_runs.append({**run, **loader(cold, 1, repeat, args.read_threads)})
    drop_from_page_cache(cold)
    sequential(warm, 1)  # warm the page cache: both contenders read cached pages
    warm_runs = [{**sequential(warm, args.epochs),
                  **loader(warm, args.epochs, repeat, args.read_threads)}
                 for repeat in range(args.repeats)]
    c, w = median_runs(cold_runs), median_runs(warm_runs)

    def rates(med: dict[str, float]) -> dict[str, float]:
        return {"loader_tokens_per_s": round(med["loader"]),
                "sequential_tokens_per_s": round(med["sequential"]),
                "loader_first_batch_s": round(med["loader_first_batch_s"], 3),
                "loader_tokens_per_cpu_s": round(med["loader_cpu"]),
                "sequential_tokens_per_cpu_s": round(med["sequential_cpu"])}

    def rounded(runs: list[dict[str, float]]) -> dict[str, list[float]]:
        return {k: [round(r[k], 3) if k.endswith("_s") else round(r[k]) for r in runs]
                for k in runs[0]}

    result = {
        "bench": "loader_throughput", "d_in": D_IN, "batch_size": BATCH,
        "buffer_blocks": 64, "chunk_rows": 4096,
        "read_threads": MemmapSource([warm], read_threads=args.read_threads).read_threads,
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "ratio": round(c["loader"] / c["sequential"], 3),
        "ratio_warm": round(w["loader"] / w["sequential"], 3),
        "ratio_warm_steady": round(w["loader_steady"] / w["sequential"], 3),
        "from_storage": {"rows": cold.num_rows,
                         "store_mb": round(cold.num_rows * D_IN * 2 / 2**20, 1),
                         "shards": len(cold.shard_ids()), "epochs_per_run": 1,
                         "page_cache": "dropped before each epoch", **rates(c),
                         "runs": rounded(cold_runs)},
        "page_cache_warm": {"rows": warm.num_rows,
                            "store_mb": round(warm.num_rows * D_IN * 2 / 2**20, 1),
                            "shards": len(warm.shard_ids()), "epochs_per_run": args.epochs,
                            **rates(w), "loader_steady_tokens_per_s": round(w["loader_steady"]),
                            "runs": rounded(warm_runs)},
    }
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
