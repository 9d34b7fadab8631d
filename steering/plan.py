"""What steering and detection do at one importance-table row, as small dense tensors.

Everything per token reduces to the SAE's top-k (values, indices): the latents of the chosen
features S are gathered from them, edited, and only the |S| decoder rows are touched:
``out = x + Σ_{j∈S} (z'_j − z_j) d_j`` (DESIGN §3, error-preserving).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from steering.edits import Direction, ResolvedEdit
from steering.importance_tables import ImportanceTables


def gather_latents(values: Tensor, indices: Tensor, features: Tensor) -> Tensor:
    """z_j for j in ``features`` from a top-k code: [..., k] × [m] -> [..., m] (0 if not active)."""
    match = indices.unsqueeze(-1) == features
    return (values.unsqueeze(-1) * match).sum(-2)


@dataclass
class RowEdit:
    """Edits of one row: for feature S_i, where z > threshold_i, z' − z = scale_i·z + shift_i."""

    features: Tensor  # [m] long
    threshold: Tensor  # [m]; −inf for amplification (no mask)
    scale: Tensor  # [m]; −γμ − 1 for suppression, 0 for amplification
    shift: Tensor  # [m]; 0 for suppression, γμ for amplification
    directions: Tensor  # [m, d_in]: the decoder rows d_j of S

    def delta(self, values: Tensor, indices: Tensor) -> Tensor:
        """Σ_j (z'_j − z_j) d_j for each token: [T, k] codes -> [T, d_in]."""
        z = gather_latents(values, indices, self.features)
        dz = torch.where(z > self.threshold, self.scale * z + self.shift, torch.zeros_like(z))
        return dz @ self.directions


class SteeringPlan:
    """Per-row RowEdits for a request's active edits, built lazily and cached."""

    def __init__(self, tables: ImportanceTables, w_dec: Tensor, edits: list[ResolvedEdit],
                 kinds: dict[str, list[str]]) -> None:
        self.tables = tables
        self.w_dec = w_dec
        self.edits = [e for e in edits if e.active]
        self.kinds = kinds
        self._rows: dict[int, RowEdit] = {}

    def __bool__(self) -> bool:
        return bool(self.edits)

    def row(self, r: int) -> RowEdit:
        """The RowEdit at table row r; a feature chosen by two edits takes the first's edit."""
        cached = self._rows.get(r)
        if cached is not None:
            return cached
        t = self.tables
        seen: set[int] = set()
        feats, thr, scale, shift = [], [], [], []
        for edit in self.edits:
            c = t.concept_index(edit.spec.name)
            chosen = [j for j in t.selected_features(c, r, edit.percentile).tolist()
                      if j not in seen]
            seen.update(chosen)
            idx = torch.tensor(chosen, dtype=torch.long, device=t.means.device)
            mu = t.means[c, r, idx]
            if edit.direction is Direction.SUPPRESS:
                kind = [t.concept_index(n) for n in self.kinds[edit.spec.kind]]
                thr.append(t.means[kind][:, r, idx].mean(0))
                scale.append(-edit.gamma * mu - 1.0)
                shift.append(torch.zeros_like(mu))
            else:
                thr.append(torch.full_like(mu, -torch.inf))
                scale.append(torch.zeros_like(mu))
                shift.append(edit.gamma * mu)
            feats.append(idx)
        device, dtype = self.w_dec.device, self.w_dec.dtype
        features = torch.cat(feats).to(device)
        edit = RowEdit(
            features=features,
            threshold=torch.cat(thr).to(device, dtype),
            scale=torch.cat(scale).to(device, dtype),
            shift=torch.cat(shift).to(device, dtype),
            directions=self.w_dec[features],
        )
        self._rows[r] = edit
        return edit


class DetectionPlan:
    """Per-row detection of every bundle concept at its default percentile (DESIGN §3).

    score_c at a step = Σ_{j∈S_c} mean-over-tokens z_j / Σ_{j∈S_c} μ_{c,t,j};
    the request's score is the mean over steps: ≈ 1 for a typical prompt of c, ≈ 0 without c.
    """

    def __init__(self, tables: ImportanceTables, percentiles: list[float], device: torch.device):
        self.tables = tables
        self.percentiles = percentiles
        self.device = device
        self._rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def row(self, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """(union of features U [u], membership [u, C], denominators [C]) at row r."""
        cached = self._rows.get(r)
        if cached is not None:
            return cached
        t = self.tables
        sets = [t.selected_features(c, r, p) for c, p in enumerate(self.percentiles)]
        union = torch.unique(torch.cat(sets)) if sets else torch.zeros(0, dtype=torch.long)
        member = torch.stack([torch.isin(union, s) for s in sets], dim=1).float()
        denom = torch.stack([t.means[c, r, s].sum() for c, s in enumerate(sets)])
        out = (union.to(self.device), member.to(self.device),
               denom.clamp_min(torch.finfo(torch.float32).tiny).to(self.device))
        self._rows[r] = out
        return out

    def score(self, values: Tensor, indices: Tensor, r: int) -> Tensor:
        """Per-image scores [B, C] at row r from cond-half codes [B, tokens, k]."""
        union, member, denom = self.row(r)
        z = gather_latents(values.float(), indices, union).mean(1)
        return (z @ member) / denom
