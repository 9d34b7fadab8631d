"""Peak unique memory (USS) of `steer train`'s loop on a store at 1× vs 8× the dataset size.

Builds two stores of random float16 rows in the store format (H1's ShardWriter), 1× and 8×
the rows, then trains the same SAE with the same steps and batch on each, every run in a
fresh child process whose USS (psutil: private pages; pages of a memory-mapped file count
once touched, which is why MemmapSource reads blocks with pread) the parent samples every
50 ms.
The steps are chosen so the 8× run reads its whole store once (the 1× run reads its store
8 times): memory must not grow with the rows a run touches. Target: peak USS 8× / 1× ≤ 1.1.

Run: ``.venv/bin/python bench/training_memory.py`` (``--rows 32768`` for a quick look).
Prints one JSON line and writes bench/results/training_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from random_store import build_random_store

RESULTS = Path(__file__).resolve().parent / "results" / "training_memory.json"
D_IN, TOKENS_PER_STEP, STEPS_PER_PROMPT, PROMPTS_PER_SHARD = 256, 256, 4, 32
ROWS_PER_PROMPT = TOKENS_PER_STEP * STEPS_PER_PROMPT
TRAIN = dict(num_latents=2048, k=16, batch_size=4096, buffer_blocks=8, chunk_rows=4096,
             checkpoint_every=10_000, log_every=50, warmup_steps=10)


def child(store: Path, out: Path, steps: int) -> None:
    """The measured process: train_sae on the store (no progress bar)."""
    from training.activations.loader import MemmapSource
    from training.activations.store import ActivationStore
    from training.trainer import TrainConfig, train_sae

    cfg = TrainConfig(d_in=D_IN, total_steps=steps, **TRAIN)  # type: ignore[arg-type]
    source = MemmapSource([ActivationStore.open(store)], chunk_rows=cfg.chunk_rows)
    train_sae(cfg, source, out, progress=False)


def measure(store: Path, out: Path, steps: int) -> dict[str, float]:
    """Run the child on ``store`` and sample its USS/RSS until it exits."""
    cmd = [sys.executable, __file__, "--child", str(store), str(out), str(steps)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    watched = psutil.Process(proc.pid)
    peak_uss = peak_rss = 0
    while proc.poll() is None:
        try:
            info = watched.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            break
        peak_uss, peak_rss = max(peak_uss, info.uss), max(peak_rss, info.rss)
        time.sleep(0.05)
    if proc.wait() != 0:
        raise SystemExit(f"training child failed on {store}")
    return {"peak_uss_mib": peak_uss / 2**20, "peak_rss_mib": peak_rss / 2**20,
            "seconds": time.perf_counter() - t0}


def main() -> None:
    """Build both stores, measure both runs, print and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=131_072, help="Rows of the 1× store.")
    ap.add_argument("--work-dir", type=Path, default=None, help="Where the stores go "
                    "(kept for reruns) [default: a temporary folder]")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        small, big = work / "store-1x", work / "store-8x"
        for path, rows, seed in ((small, args.rows, 1), (big, 8 * args.rows, 8)):
            build_random_store(path, D_IN, rows // ROWS_PER_PROMPT, TOKENS_PER_STEP,
                               STEPS_PER_PROMPT, PROMPTS_PER_SHARD, seed,
                               command="bench/training_memory.py", side=128)
        steps = 8 * args.rows // TRAIN["batch_size"]
        runs = {name: measure(store, Path(tmp) / f"run-{name}", steps)
                for name, store in (("1x", small), ("8x", big))}
    report = {
        "d_in": D_IN, **TRAIN, "steps": steps, "rows_1x": args.rows, "rows_8x": 8 * args.rows,
        "store_mib_1x": args.rows * D_IN * 2 / 2**20,
        "store_mib_8x": 8 * args.rows * D_IN * 2 / 2**20,
        "runs": runs,
        "uss_ratio_8x_over_1x": runs["8x"]["peak_uss_mib"] / runs["1x"]["peak_uss_mib"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
