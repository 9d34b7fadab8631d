"""The learned swap's per-step edit: the lookup + embedding_bag path vs comparing every entry.

``RowTranslate.delta`` maps each token's top-k code to its edit through the swap's m feature
rows. Comparing every active entry with every swap feature (``indices[..., None] == features``,
what steering/plan.py did before) costs O(tokens · k · m); the lookup costs O(tokens · k + m).
Both run round-robin on the same random codes, at the toy world's shapes (64 images with CFG,
16×16 tokens at the hook, n = 2048, k = 8, a 1,800-feature swap) and at SD-1.4's (one image with
CFG, 32×32 tokens at up_blocks.1, n = 20,480, k = 32, a 5,000-feature swap), and the median
wall time of each and their ratio are printed as one JSON line (written to ``--out``).

Run: ``.venv/bin/python bench/translate_delta.py`` (``--repeats 1`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from steering.plan import RowTranslate

SHAPES = {  # tokens, d_in, n, k, m
    "toy_64_images": (2 * 64 * 16 * 16, 64, 2048, 8, 1800),
    "sd14_1_image": (2 * 32 * 32, 1280, 20480, 32, 5000),
}


def compare_all(row: RowTranslate, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The former path: a [tokens, k, m] comparison, then a [tokens, m] @ [m, d_in] product."""
    z = (values.unsqueeze(-1) * (indices.unsqueeze(-1) == row.features)).sum(-2)
    return z @ row.deltas + row.bias


def measure(tokens: int, d_in: int, n: int, k: int, m: int, repeats: int) -> dict[str, float]:
    """Median seconds of both paths on one random code and swap, and their ratio."""
    g = torch.Generator().manual_seed(0)
    values = torch.rand(tokens, k, generator=g)
    indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(64)])
    indices = indices[torch.randint(0, 64, (tokens,), generator=g)]
    row = RowTranslate(torch.randperm(n, generator=g)[:m], torch.randn(m, d_in, generator=g),
                       torch.randn(d_in, generator=g))
    torch.testing.assert_close(row.delta(values, indices), compare_all(row, values, indices),
                               rtol=1e-3, atol=1e-3)
    times: dict[str, list[float]] = {"lookup": [], "compare_all": []}
    for _ in range(repeats):
        for name, fn in (("lookup", row.delta), ("compare_all",
                                                 lambda v, i: compare_all(row, v, i))):
            start = time.perf_counter()
            fn(values, indices)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"lookup_s": med["lookup"], "compare_all_s": med["compare_all"],
            "speedup": med["compare_all"] / med["lookup"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/translate_delta.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"bench": "translate_delta", "threads": torch.get_num_threads(),
              **{name: measure(*shape, repeats=args.repeats) for name, shape in SHAPES.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
