"""Peak memory and time of the learned-swap fit (training.translation_fit.fit_row) at SD-1.4 shape.

The real solver runs on synthetic codes shaped like SD-1.4's up1.1 SAE: n = 20,480 features,
d_in = 1,280, k = 32, 50 denoising steps (table rows), and per row 256 pairs × 512 tokens
(both CFG halves of a 16 × 16 hook output) = 131,072 tokens. Each token's top-k ids take one
feature from each of k strata of n / k features, power-law within a stratum (some features
frequent, none absent: the coverage printed is the share of features active in the row);
values are exponential. Targets are a random rank-8 sparse linear map of the codes, plus a
bias and noise (σ ¼ of the signal's), made block by block from seeded generators, so the two
passes of ``fit_row`` read the same tokens without the row's [131k, 1,280] targets held in
memory (the pipeline path decodes them block by block from recorded codes the same way).

Memory is per row (rows are solved one at a time), so one row is fitted at the full shape,
with peak USS (psutil, private pages) sampled every 10 ms in a thread. Time per row is
measured on a 10 % slice of the tokens; the time per concept (50 rows, all tokens) is
*extrapolated* as 50 × 10 × that, assuming cost linear in tokens at the same conjugate-gradient
iteration count as the slice; that is pessimistic: at the full shape every feature is seen
more often and conjugate gradients converge in fewer iterations, so 50 × the measured full
row is printed too (``extrapolated_seconds_per_concept_from_full_row``).
The slice's fit is also checked against the noiseless targets (``fit_r2_slice``).

Run: ``.venv/bin/python bench/fit_swap_memory.py`` (``--pairs 16`` for a quick look).
Prints one JSON line and writes bench/results/fit_swap_memory.json. Target: peak USS ≤ 8 GiB.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from training.translation_fit import Chunk, fit_row

RESULTS = Path(__file__).resolve().parent / "results" / "fit_swap_memory.json"
N, D_IN, K, STEPS, TOKENS_PER_PAIR, TRUE_RANK, RANK = 20_480, 1_280, 32, 50, 512, 8, 16
BLOCK = 8192  # tokens per chunk fed to the fit


class PeakUss:
    """Samples this process's USS in a thread; ``peak`` is the largest seen."""

    def __init__(self, every: float = 0.01) -> None:
        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_full_info().uss)
            time.sleep(self.every)

    def __enter__(self) -> PeakUss:
        self.peak = self.proc.memory_full_info().uss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_full_info().uss)


class SyntheticRow:
    """One row's synthetic codes (held: k ids and values per token) and targets (made per
    block from a seeded generator, identical on every pass)."""

    def __init__(self, tokens: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        width = N // K
        weights = 1.0 / torch.arange(1, width + 1, dtype=torch.float64) ** 0.8
        picks = torch.multinomial(weights, tokens * K, replacement=True, generator=g)
        perm = torch.randperm(width, generator=g)  # which ids of a stratum are the frequent
        self.indices = (perm[picks].reshape(tokens, K)
                        + torch.arange(K) * width).to(torch.int32)
        self.values = torch.empty(tokens, K).exponential_(generator=g) + 0.05
        self.u = torch.randn(N, TRUE_RANK, generator=g) / K ** 0.5
        self.v = torch.linalg.qr(torch.randn(D_IN, TRUE_RANK, generator=g))[0].T.contiguous()
        self.bias = torch.randn(D_IN, generator=g) * 0.1
        self.noise = 0.25 * float(self.signal(slice(0, 4096)).std())
        self.seed = seed

    def signal(self, part: slice) -> torch.Tensor:
        """The noiseless targets of tokens ``part``."""
        low = F.embedding_bag(self.indices[part].long(), self.u,
                              per_sample_weights=self.values[part], mode="sum")
        return low @ self.v + self.bias

    def chunks(self, tokens: int) -> Iterator[Chunk]:
        """The first ``tokens`` tokens in blocks: (values, ids, target)."""
        for b, s in enumerate(range(0, tokens, BLOCK)):
            part = slice(s, min(s + BLOCK, tokens))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            target = self.signal(part)
            target += self.noise * torch.randn(target.shape, generator=g)
            yield self.values[part], self.indices[part], target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256, help="pairs per row (256 = full)")
    parser.add_argument("--slice", type=float, default=0.1, help="share of tokens timed")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    tokens = args.pairs * TOKENS_PER_PAIR
    row = SyntheticRow(tokens)
    coverage = float((torch.bincount(row.indices.reshape(-1).long(), minlength=N) > 0)
                     .float().mean())
    baseline = psutil.Process().memory_full_info().uss
    start = time.perf_counter()
    with PeakUss() as peak:
        full = fit_row(lambda: row.chunks(tokens), N, D_IN, rank=RANK, device=args.device,
                       dtype=dtype)
    full_seconds = time.perf_counter() - start
    assert full is not None
    part = min(tokens, max(BLOCK, int(tokens * args.slice)))
    start = time.perf_counter()
    sol = fit_row(lambda: row.chunks(part), N, D_IN, rank=RANK, device=args.device,
                  dtype=dtype)
    slice_seconds = time.perf_counter() - start
    assert sol is not None
    # the slice's fitted edits against its noiseless targets
    truth = row.signal(slice(0, part))
    column = torch.full((N + 1,), -1, dtype=torch.int64)
    column[sol.features] = torch.arange(len(sol.features))
    ids = column[row.indices[:part].long()]
    vals = row.values[:part] * (ids >= 0)
    edits = F.embedding_bag(ids.clamp_min(0), sol.coef @ sol.basis, per_sample_weights=vals,
                            mode="sum") + sol.coef[-1] @ sol.basis
    r2 = 1.0 - float((edits - truth).pow(2).sum() / (truth - truth.mean(0)).pow(2).sum())
    result = {
        "bench": "fit_swap_memory", "threads": torch.get_num_threads(), "device": args.device,
        "dtype": args.dtype,
        "shape": {"n_latents": N, "d_in": D_IN, "k": K, "steps": STEPS, "pairs": args.pairs,
                  "tokens_per_row": tokens, "rank": RANK, "feature_coverage": round(coverage, 4)},
        "peak_uss_bytes": peak.peak, "baseline_uss_bytes": baseline,
        "dense_normal_equations_bytes_per_row": (N + 1) ** 2 * 8,
        "seconds_per_row_full": round(full_seconds, 2), "iterations_full": full.iterations,
        "slice_tokens": part, "seconds_per_row_slice": round(slice_seconds, 2),
        "iterations_slice": sol.iterations,
        "extrapolated_seconds_per_concept": round(STEPS * slice_seconds * tokens / part, 1),
        "extrapolated_from": "50 rows x (tokens / slice tokens) x seconds_per_row_slice",
        "extrapolated_seconds_per_concept_from_full_row": round(STEPS * full_seconds, 1),
        "fit_r2_slice": round(r2, 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
