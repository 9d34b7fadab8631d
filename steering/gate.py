"""Detection gate: per image, is a concept present, judged from the SAE code at the hook.

Each call adds, for every kind, the cosine between the image's mean code over tokens (cond
half) and each concept's mean code μ_{c,t} at that step. An image "has" concept c while c has
the highest running sum of its kind, or is within the concept's margin (in mean cosine) of
it: a margin trades a little in-domain retention for recall, since a missed image is not
edited at all. Nearest-centroid over all n latents uses the tables the bundle already has and
was far more reliable on the toy world than the sparse detection score.

With ``anchors`` (the latching translate recipe), an image found with c stays "present" while
its nearest concept is c's anchor: the edit itself makes the trajectory look like the anchor,
and without the latch the gate would let go of the images it is swapping.

With a ``probe`` (bundle format 4, :mod:`steering.gate_probe`) the evidence per step is the
probe's score of the image's mean code instead of the cosine to the means: fitted on labelled
runs, it finds the concept from the first step, where nearest-centroid guesses. Margins are
then in the probe's units (1 = the gap between a one-hot target and zero).

With ``detectors`` (bundle format 5, :mod:`steering.detector`) the gate is open-world: each
gated concept is decided on its own, present from the first step the running mean of its
detector's score reaches its calibrated threshold τ_c, and latched for the rest of the run
(the edit makes the trajectory look like the counterfactual, and the gate must not let go of
an image it is editing). Nothing is ranked within a kind, so a kind may hold one concept and
an image may hold none of its kind; margins and anchors do not apply. ``update`` and
``present`` are tensor arithmetic only, with no host synchronisation on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steering.detector import ConceptDetectors, DetectorReadout
from steering.gate_probe import GateProbe
from steering.importance_tables import ImportanceTables
from steering.readout import mean_codes


class ConceptGate:
    """Running decision per image for the gated concepts: by calibrated detectors when the
    bundle has them, else nearest concept of the kind (centroids or the probe)."""

    def __init__(self, tables: ImportanceTables, kinds: dict[str, list[str]],
                 margins: dict[str, float], anchors: dict[str, str] | None = None,
                 probe: GateProbe | None = None,
                 detectors: ConceptDetectors | None = None) -> None:
        self.tables = tables
        self.probe = probe
        self.detectors = detectors
        # the anchor latch needs the anchor to be a concept of the bundle (a free-text
        # counterfactual has no evidence to read) and does not apply to detectors
        self.anchors = {} if detectors is not None else {
            tables.concept_index(c): tables.concept_index(a)
            for c, a in (anchors or {}).items() if a in tables.concepts}
        self.latched: dict[int, Tensor] = {}
        self.margins = {tables.concept_index(c): m for c, m in margins.items()}
        self.steps = 0
        self.groups: dict[str, list[int]] = {}
        self.kind_of: dict[int, str] = {}
        for kind, names in kinds.items():
            if any(c in names for c in margins):
                self.groups[kind] = [tables.concept_index(n) for n in names]
        for kind, members in self.groups.items():
            for c in members:
                self.kind_of[c] = kind
        self.running: dict[str, Tensor] = {}
        self._weights = {kind: self._slice_kind(members) for kind, members in self.groups.items()
                         } if detectors is None else {}
        if detectors is not None:
            self._init_detectors(detectors, list(margins))

    def _init_detectors(self, detectors: ConceptDetectors, gated: list[str]) -> None:
        """Open-world mode: the gated concepts' detectors, sliced once (no per-step indexing)."""
        self.gated = [self.tables.concept_index(c) for c in gated]
        self.slot = {c: i for i, c in enumerate(self.gated)}
        self.readout = DetectorReadout(detectors, self.gated)

    def detection(self) -> dict[int, Tensor]:
        """Open-world mode: concept index -> [B] final detection score sigmoid(max running
        mean − τ), 0.5 at the threshold (for reporting); empty before any step or otherwise."""
        p = self.readout.probability() if self.detectors is not None else None
        if p is None:
            return {}
        return {c: p[:, i] for c, i in self.slot.items()}

    def update(self, values: Tensor, indices: Tensor, row: int) -> None:
        """Add one step's evidence from cond-half codes [B, tokens, k]."""
        self.steps += 1
        mean_code = mean_codes(values, indices, self.tables.num_latents)
        if self.detectors is not None:
            self.readout.update(mean_code, row)
            return
        for kind in self.groups:
            evidence = self._evidence(mean_code, kind, row)
            prev = self.running.get(kind)
            self.running[kind] = evidence if prev is None else prev + evidence
        for c, a in self.anchors.items():
            now = self._near(c, c)
            before = self.latched.get(c)
            self.latched[c] = now if before is None else now | (before & self._near(c, a))

    def _slice_kind(self, members: list[int]) -> tuple[Tensor, Tensor | None]:
        """A kind's (weights [M, steps, n], bias [M, steps] or None), sliced once when the
        gate is made, so no step indexes with a Python list (an upload, a sync on GPU): the
        probe's, or the concepts' unit-norm mean codes for the cosine."""
        if self.probe is not None:
            return self.probe.weight[members], self.probe.bias[members]
        means = self.tables.means[members].float()
        return torch.nn.functional.normalize(means, dim=2), None

    def _evidence(self, mean_code: Tensor, kind: str, row: int) -> Tensor:
        """[B, len(members)] this step's evidence for each concept of a kind: the probe's
        scores, or the cosine between the mean code and each concept's mean."""
        weight, bias = self._weights[kind]
        if bias is not None:
            return mean_code @ weight[:, row].to(mean_code).T + bias[:, row].to(mean_code)
        return torch.nn.functional.normalize(mean_code, dim=1) @ weight[:, row].to(mean_code).T

    def _near(self, concept_index: int, candidate: int) -> Tensor:
        """[B] bool: ``candidate``'s running sum is within ``concept_index``'s margin of the
        best of its kind."""
        kind = self.kind_of[concept_index]
        run = self.running[kind]
        score = run[:, self.groups[kind].index(candidate)]
        return score >= run.max(1).values - self.margins.get(concept_index, 0.0) * self.steps

    def present(self, concept_index: int) -> Tensor:
        """[B] bool: the images whose running nearest concept of its kind is this one (or,
        latched, its anchor since the image was found with it); with detectors, the images
        whose running mean has reached the concept's threshold at some step."""
        if self.detectors is not None:
            if self.readout.found is None:
                raise RuntimeError("ConceptGate.present before any update: the gate has not "
                                   "seen a step yet")
            return self.readout.found[:, self.slot[concept_index]]
        latched = self.latched.get(concept_index)
        return latched if latched is not None else self._near(concept_index, concept_index)
