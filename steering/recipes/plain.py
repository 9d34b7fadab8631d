"""The plain SAeUron recipe: where a chosen feature is on, z' = −γ·μ·z (suppression), and
amplification z' = z + γ·μ; both as one masked multiplicative :class:`RowEdit` per row."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from steering.edits import Direction
from steering.recipes.base import RecipeRows, register
from steering.recipes.lookup import column_table, gather_latents

if TYPE_CHECKING:
    from steering.plan import SteeringPlan


@dataclass
class RowEdit:
    """Edits of one row: for feature S_i, where z > threshold_i, z' − z = scale_i·z + shift_i."""

    features: Tensor  # [m] long
    threshold: Tensor  # [m]; −inf for amplification (no mask)
    scale: Tensor  # [m]; −γμ − 1 for suppression, 0 for amplification
    shift: Tensor  # [m]; 0 for suppression, γμ for amplification
    directions: Tensor  # [m, d_in]: the decoder rows d_j of S

    def __post_init__(self) -> None:
        self._table = column_table(self.features)  # built once: the lookup reads max() on host

    def delta(self, values: Tensor, indices: Tensor) -> Tensor:
        """Σ_j (z'_j − z_j) d_j for each token: [T, k] codes -> [T, d_in]."""
        z = gather_latents(values, indices, self.features, self._table)
        dz = torch.where(z > self.threshold, self.scale * z + self.shift, torch.zeros_like(z))
        return dz @ self.directions


@register
class PlainRecipe(RecipeRows):
    """Plain edits: ungated ones (and every amplification) merge into one RowEdit per row."""

    name = "plain"

    def suppress(self, plan: SteeringPlan, i: int, r: int, gate: int | None) -> RowEdit | None:
        """A gated suppression gets its own RowEdit; an ungated one merges (None)."""
        if gate is None:
            return None
        return plan.cache.get(plan.key("edit", plan.signature[: i + 1], r),
                              functools.partial(self.build, plan, [i], r))

    def merged(self, plan: SteeringPlan, edits: list[int], r: int) -> RowEdit:
        """The one ungated RowEdit of the plain edits ``edits`` (indices) at row r."""
        return plan.cache.get(
            plan.key("merged", plan.signature[: edits[-1] + 1], tuple(edits), r),
            functools.partial(self.build, plan, edits, r))

    def build(self, plan: SteeringPlan, edits: list[int], r: int) -> RowEdit:
        """One RowEdit of the plain edits ``edits`` (indices) at row r (cache misses only)."""
        pieces = [self._piece(plan, i, r) for i in edits]
        device, dtype = plan.w_dec.device, plan.w_dec.dtype
        features = torch.cat([p[0] for p in pieces]).to(device)
        return RowEdit(
            features=features,
            threshold=torch.cat([p[1] for p in pieces]).to(device, dtype),
            scale=torch.cat([p[2] for p in pieces]).to(device, dtype),
            shift=torch.cat([p[3] for p in pieces]).to(device, dtype),
            directions=plan.w_dec[features],
        )

    @staticmethod
    def _piece(plan: SteeringPlan, i: int, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(features, threshold, scale, shift) of a plain edit i at row r."""
        t, edit = plan.tables, plan.edits[i]
        c = t.concept_index(edit.spec.name)
        idx = plan.chosen(i, r)
        mu = t.means[c, r, idx]
        if edit.direction is Direction.AMPLIFY:
            return idx, torch.full_like(mu, -torch.inf), torch.zeros_like(mu), edit.gamma * mu
        kind = [t.concept_index(n) for n in plan.kinds[edit.spec.kind]]
        return (idx, t.means[kind][:, r, idx].mean(0), -edit.gamma * mu - 1.0,
                torch.zeros_like(mu))
