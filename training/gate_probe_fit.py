"""Fit the detection gate's probe (steering/gate_probe.py) from labelled, unedited runs.

Each labelled prompt (``steer collect``'s JSONL: prompt, concepts by kind, seed) is generated
without steering while the hook block's output is encoded: its mean SAE code over tokens, cond
half, at every step. Then, per kind and step, ridge regression maps the standardised code to
the one-hot label of the prompt's concept of that kind (a prompt that names none of the kind is
left out of that kind's fit); the standardisation is folded into the stored weights, so serving
is one matrix product. Ridge in its dual form: there are far fewer prompts than features.
Recording and the ridge are shared with the open-world detectors (training/detector_fit.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from steering.gate_probe import GateProbe
from steering.pipeline import SteeredPipeline
from training.detector_fit import record_mean_codes, ridge_readout

__all__ = ["fit_bundle_gate", "fit_gate_probe", "probe_accuracy", "record_mean_codes"]


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
            w, b = ridge_readout(codes[t, runs].double(), target - target_mean, ridge)
            weight[rows, t] = w.T
            bias[rows, t] = b + target_mean
    return GateProbe(list(concepts), weight, bias.float())


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
