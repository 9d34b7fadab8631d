"""Fit the detection gate's probe (steering/gate_probe.py) from labelled, unedited runs.

Each labelled prompt (``steer collect``'s JSONL: prompt, concepts by kind, seed) is generated
without steering while the hook block's output is encoded: its mean SAE code over tokens, cond
half, at every step. Then, per kind and step, ridge regression maps the standardised code to
the one-hot label of the prompt's concept of that kind (a prompt that names none of the kind is
left out of that kind's fit); the standardisation is folded into the stored weights, so serving
is one matrix product. Ridge in its dual form: there are far fewer prompts than features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from steering.gate_probe import GateProbe, mean_codes
from steering.hooks import cond_half, to_tokens
from steering.pipeline import SteeredPipeline
from training.translation_fit import generate_with


def record_mean_codes(steered: SteeredPipeline, prompts: Sequence[str], seeds: Sequence[int],
                      steps: int, guidance: float, batch_size: int = 64,
                      progress: Callable[[int], None] | None = None) -> Tensor:
    """[steps, len(prompts), n] float16: each unedited run's mean SAE code over tokens at the
    hook (the cond half under guidance), per table row."""
    sae = steered.sae
    out: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        rows: dict[int, Tensor] = {}

        def record(r: int, x: Tensor, rows: dict[int, Tensor] = rows) -> None:
            x = cond_half(x, guidance > 1.0)
            b, _, h, w = x.shape
            values, indices = sae.encode(to_tokens(x).to(sae.dtype))
            codes = mean_codes(values.view(b, h * w, -1), indices.view(b, h * w, -1),
                               sae.num_latents)
            rows[r] = codes.half().cpu()

        end = min(start + batch_size, len(prompts))
        generate_with(steered, prompts[start:end], seeds[start:end], steps, guidance, record)
        if len(rows) != steered.bundle.tables.num_steps:  # type: ignore[union-attr]
            raise ValueError(f"the runs visited {len(rows)} table rows, the bundle has "
                             f"{steered.bundle.tables.num_steps}: use the bundle's step count")
        out.append(torch.stack([rows[r] for r in sorted(rows)]))
        if progress is not None:
            progress(end - start)
    return torch.cat(out, dim=1)


def fit_bundle_gate(steered: SteeredPipeline, prompts: Sequence[str], seeds: Sequence[int],
                    labels: Sequence[Mapping[str, str]], guidance: float,
                    steps: int | None = None, batch_size: int = 64, ridge: float = 1.0,
                    progress: Callable[[int], None] | None = None) -> GateProbe:
    """Record the labelled runs with ``steered``'s bundle and fit its probe."""
    bundle = steered.bundle
    if bundle is None:
        raise ValueError("fitting the gate's probe needs a pipeline loaded with its bundle")
    m = bundle.manifest
    codes = record_mean_codes(steered, prompts, seeds, steps or m.steps, guidance, batch_size,
                              progress)
    kinds = {kind: bundle.concepts_of_kind(kind) for kind in dict.fromkeys(
        c.kind for c in m.concepts)}
    return fit_gate_probe(codes, labels, kinds, [c.name for c in m.concepts], ridge)


def fit_gate_probe(codes: Tensor, labels: Sequence[Mapping[str, str]],
                   kinds: Mapping[str, Sequence[str]], concepts: Sequence[str],
                   ridge: float = 1.0) -> GateProbe:
    """The probe for ``concepts`` (the bundle's, in order) from mean codes [steps, N, n] and
    each run's labels (kind -> concept). Every concept needs labelled runs."""
    steps, _, n = codes.shape
    index = {c: i for i, c in enumerate(concepts)}
    weight = torch.zeros(len(concepts), steps, n, dtype=torch.float64)
    bias = torch.zeros(len(concepts), steps, dtype=torch.float64)
    for kind, members in kinds.items():
        runs = [i for i, lab in enumerate(labels) if lab.get(kind) in members]
        named = {labels[i][kind] for i in runs}
        missing = [c for c in members if c not in named]
        if missing:
            raise ValueError(f"no labelled prompt names {missing} (kind {kind!r}): the probe "
                             "needs runs of every concept of a kind")
        target = torch.zeros(len(runs), len(members), dtype=torch.float64)
        for row, i in enumerate(runs):
            target[row, list(members).index(labels[i][kind])] = 1.0
        target_mean = target.mean(0)
        rows = [index[c] for c in members]
        for t in range(steps):
            w, b = _ridge(codes[t, runs].double(), target - target_mean, ridge)
            weight[rows, t] = w.T
            bias[rows, t] = b + target_mean
    return GateProbe(list(concepts), weight, bias.float())


def _ridge(x: Tensor, y: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Ridge from standardised x [N, n] to centred y [N, K], folded back to raw x:
    returns (w [n, K], b [K]) with x @ w + b ≈ y."""
    if len(x) < 2:
        raise ValueError("the probe needs at least two labelled runs per kind")
    mean, std = x.mean(0), x.std(0)
    # a constant feature becomes a zero column and gets weight 0; the floor keeps a feature
    # seen in one run from getting a weight that explodes wherever it is strong
    std = std.clamp_min(1e-2 * float(std.mean()) + 1e-12)
    xs = (x - mean) / std
    gram = xs @ xs.T + ridge * len(x) * torch.eye(len(x), dtype=x.dtype)
    w = xs.T @ torch.linalg.solve(gram, y) / std.unsqueeze(1)
    return w, -(mean @ w)


def probe_accuracy(probe: GateProbe, codes: Tensor, labels: Sequence[Mapping[str, str]],
                   kinds: Mapping[str, Sequence[str]]) -> dict[str, list[float]]:
    """Per kind, per step: the share of labelled runs whose highest-scoring concept of the
    kind (this step's scores alone) is the one the prompt names."""
    out: dict[str, list[float]] = {}
    for kind, members in kinds.items():
        runs = [i for i, lab in enumerate(labels) if lab.get(kind) in members]
        if not runs:
            continue
        truth = torch.tensor([list(members).index(labels[i][kind]) for i in runs])
        idx = [probe.concepts.index(c) for c in members]
        out[kind] = [float((probe.scores(codes[t, runs].float(), idx, t).argmax(1) == truth)
                           .float().mean()) for t in range(codes.shape[0])]
    return out
