"""Open-world concept detectors: one present/absent decision per concept, with a calibrated
threshold.

The gate's probe (:mod:`steering.gate_probe`) ranks the concepts of a kind, so an image that
holds none of them still gets one, and a kind with one concept is always "present". Real
concepts ("nudity", an artist's style) appear in images whose prompt never names them and are
absent from most images, so each concept gets its own detector here. Per concept c and table
row t a linear score of the image's mean SAE code over tokens (cond half,
:func:`steering.readout.mean_codes`):

    s_{c,t}(image) = z̄_t · W_{c,t} + b_{c,t}

fitted on image-level labels (``training/detector_fit.py``: ridge towards 1 for images that
show c and 0 for every other image, then rescaled so that at every step the fitting runs
without c score mean 0 and standard deviation 1). The evidence at a step is a running mean
of s whose step weight never falls below ``alpha``:

    m_1 = s_1,    m_t = m_{t-1} + max(1/t, alpha) · (s_t − m_{t-1})

(alpha 0: the plain running mean; alpha > 0 forgets the early, noisy steps at that rate, so a
concept that the model only settles on late — a shape the prompt leaves unnamed — can still
raise the evidence). The image is "present" for c from the first step m reaches the
threshold τ_c, and stays so (the gate latches: steering/gate.py).

τ_c is calibrated on held-out runs: the smallest value that at most a fraction ``fpr`` of
the held-out images without c reach, in the statistic the gate's latch acts on — the maximum
over steps of m. The held-out precision and recall at τ_c are stored with it.

For reporting, an image's final detection score is p_c = sigmoid(max_t m_t − τ_c):
0.5 is exactly the calibrated threshold, and it is monotone in the evidence. It is a ranking
score around the decision, not a calibrated probability: one unit of score is one standard
deviation of the scores of images without the concept (files fitted before that rescaling:
the gap between the fitted targets of an image with and without it).

Stored as ``weight`` [C, steps, n] (float16), ``bias`` [C, steps] and ``threshold`` [C]
(float32), with the concept names (the bundle's, in its order), alpha, the target
false-positive rate, where the labels came from, the held-out figures and the fitting command
in the metadata (files without alpha were fitted with the plain running mean: alpha 0).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from steering.readout import LinearReadout

DETECTORS_FILE = "detectors.safetensors"
# where a fit's labels came from: a judge of the generated images, the runs file, the prompt
LABEL_SOURCES = ("judge", "given", "prompt")


def step_weight(step: int, alpha: float) -> float:
    """Weight of the ``step``-th score (1-based) in the evidence: max(1/step, alpha)."""
    return max(1.0 / step, alpha)


def running_means(scores: Tensor, alpha: float = 0.0) -> Tensor:
    """The gate's evidence m_t over steps (dim 0) of per-step scores [steps, ...]: a running
    mean whose step weight never falls below ``alpha`` (0: the plain running mean)."""
    out = [scores[0]]
    for t in range(1, scores.shape[0]):
        out.append(out[-1] + step_weight(t + 1, alpha) * (scores[t] - out[-1]))
    return torch.stack(out)


@dataclass
class ConceptDetectors(LinearReadout):
    """Per concept and table row, a linear score of the mean SAE code; per concept, τ."""

    threshold: Tensor  # [C]
    fpr: float = 0.01
    labels: str = "prompt"
    # concept -> held-out figures at τ: precision (None when nothing was flagged), recall,
    # positives, negatives
    heldout: dict[str, dict[str, Any]] = field(default_factory=dict)
    command: str = ""  # the command that fitted them (provenance)
    alpha: float = 0.0  # the evidence's smallest step weight (0: plain running mean)

    WHAT: ClassVar[str] = "detectors"
    REFIT: ClassVar[str] = "steer bundle fit-detector"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.threshold = self.threshold.detach().to(torch.float32)
        c = len(self.concepts)
        if self.threshold.shape != (c,):
            raise ValueError(f"detectors: weight {list(self.weight.shape)}, bias "
                             f"{list(self.bias.shape)}, threshold "
                             f"{list(self.threshold.shape)} and {c} concepts must be "
                             "[C, steps, n], [C, steps], [C] and C names")
        if self.labels not in LABEL_SOURCES:
            raise ValueError(f"detectors: labels {self.labels!r} must be one of "
                             f"{', '.join(LABEL_SOURCES)}")
        if not 0.0 < self.fpr < 1.0:
            raise ValueError(f"detectors: fpr {self.fpr} must be between 0 and 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"detectors: alpha {self.alpha} must be between 0 and 1")

    def scores(self, mean_code: Tensor, row: int, members: Sequence[int] | None = None
               ) -> Tensor:
        """[B, C'] this step's scores of concepts ``members`` (all when None) at table row
        ``row`` from mean codes [B, n]."""
        weight, bias = self.weight[:, row], self.bias[:, row]
        if members is not None:
            weight, bias = weight[list(members)], bias[list(members)]
        return mean_code @ weight.to(mean_code.device, mean_code.dtype).T + bias.to(mean_code)

    def statistic(self, codes: Tensor) -> Tensor:
        """[N, C] max over steps of the evidence m, from mean codes [steps, N, n]: what τ is
        calibrated on and the gate's latch compares with τ."""
        per_step = torch.stack([self.scores(codes[t].float(), t)
                                for t in range(codes.shape[0])])
        return running_means(per_step, self.alpha).max(0).values

    def probability(self, statistic: Tensor) -> Tensor:
        """Final detection score sigmoid(statistic − τ) per image and concept (0.5 at τ)."""
        return torch.sigmoid(statistic - self.threshold.to(statistic))

    def to(self, device: str | torch.device) -> ConceptDetectors:
        """The same detectors with their tensors on ``device``."""
        return ConceptDetectors(list(self.concepts), self.weight.to(device),
                                self.bias.to(device), self.threshold.to(device), self.fpr,
                                self.labels, dict(self.heldout), self.command, self.alpha)

    def save(self, path: str | Path) -> None:
        """One safetensors file; names, fpr, label source and held-out figures in metadata."""
        save_file({"weight": self.weight.contiguous().cpu(),
                   "bias": self.bias.contiguous().cpu(),
                   "threshold": self.threshold.contiguous().cpu()},
                  str(path), metadata={"concepts": json.dumps(self.concepts),
                                       "fpr": json.dumps(self.fpr),
                                       "alpha": json.dumps(self.alpha),
                                       "labels": self.labels,
                                       "heldout": json.dumps(self.heldout, sort_keys=True),
                                       "command": self.command})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ConceptDetectors:
        """Read a file written by :meth:`save`."""
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            missing = [k for k in ("concepts", "fpr", "labels") if k not in meta]
            if missing:
                raise ValueError(f"{path}: no {', '.join(missing)} in its metadata; not "
                                 "concept detectors")
            return cls(json.loads(meta["concepts"]), f.get_tensor("weight"),
                       f.get_tensor("bias"), f.get_tensor("threshold"),
                       float(json.loads(meta["fpr"])), meta["labels"],
                       json.loads(meta.get("heldout", "{}")), meta.get("command", ""),
                       float(json.loads(meta.get("alpha", "0"))))


class DetectorReadout:
    """The detectors' running evidence over one generation, per image and concept: fed each
    step's mean codes, it keeps the evidence m's maximum and whether it has reached τ.

    Tensor arithmetic only (no host synchronisation on CUDA), so the steering hook and the
    gate call it at every step. ``members`` restricts it to some concepts (indices into
    ``detectors.concepts``); column i of its outputs is ``members[i]``."""

    def __init__(self, detectors: ConceptDetectors, members: Sequence[int] | None = None
                 ) -> None:
        self.members = list(range(len(detectors.concepts))) if members is None else list(members)
        self.weight = detectors.weight[self.members]  # [M, steps, n]
        self.bias = detectors.bias[self.members]  # [M, steps]
        self.threshold = detectors.threshold[self.members]  # [M]
        self.alpha = detectors.alpha
        self.steps = 0
        self.mean: Tensor | None = None  # [B, M] the evidence m so far
        self.best: Tensor | None = None  # [B, M] max over steps of m
        self.found: Tensor | None = None  # [B, M] bool: reached τ at some step

    def update(self, mean_code: Tensor, row: int) -> None:
        """Add one step's scores from mean codes [B, n] at table row ``row``."""
        if self.weight.device != mean_code.device:  # once: device objects, no sync
            self.weight, self.bias, self.threshold = (
                t.to(mean_code.device) for t in (self.weight, self.bias, self.threshold))
        score = mean_code @ self.weight[:, row].float().T + self.bias[:, row]
        self.steps += 1
        mean = score if self.mean is None else (
            self.mean + step_weight(self.steps, self.alpha) * (score - self.mean))
        self.mean = mean
        now = mean >= self.threshold
        self.found = now if self.found is None else self.found | now
        self.best = mean if self.best is None else torch.maximum(self.best, mean)

    def probability(self) -> Tensor | None:
        """[B, M] sigmoid(max over steps of m − τ): 0.5 at the calibrated threshold (None
        before any step)."""
        if self.best is None:
            return None
        return torch.sigmoid(self.best - self.threshold)
