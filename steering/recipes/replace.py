"""The replace recipe: a suppressed concept's features are removed from each token and the
mean code of its kind's other concepts is added, scaled by how strongly the token carried it."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from steering.recipes.base import RecipeRows, register
from steering.recipes.lookup import column_table, gather_latents

if TYPE_CHECKING:
    from steering.plan import SteeringPlan


@dataclass
class RowReplace:
    """Suppression by replacement at one row: per token, remove the concept's features S_c and
    add γ·s·μ̄ over the kind's other concepts' features S_o, where s = Σ_{S_c} z / Σ_{S_c} μ_c
    is how strongly the token carries the concept (see :mod:`steering.recipe`)."""

    features: Tensor  # [m] long: S_c
    concept_mass: Tensor  # [] Σ_{j∈S_c} μ_{c,t,j}
    directions: Tensor  # [m, d_in]
    target: Tensor  # [u]: mean over the other concepts of μ_{c',t,j}, j ∈ S_o (γ = 1)
    target_directions: Tensor  # [u, d_in]
    gamma: Tensor | float = 1.0  # the request's γ; the rows above do not depend on it

    def __post_init__(self) -> None:
        self._table = column_table(self.features)

    def scaled(self, gamma: Tensor | float) -> RowReplace:
        """The same rows (shared, not copied) with the request's γ."""
        out = copy.copy(self)
        out.gamma = gamma
        return out

    def delta(self, values: Tensor, indices: Tensor) -> Tensor:
        """Σ_j (z'_j − z_j) d_j for each token: [T, k] codes -> [T, d_in]."""
        z = gather_latents(values, indices, self.features, self._table)
        strength = z.sum(-1, keepdim=True) / self.concept_mass
        return ((-z) @ self.directions
                + (strength * (self.gamma * self.target)) @ self.target_directions)


@register
class ReplaceRecipe(RecipeRows):
    """Replacement rows, stored at γ = 1 and scaled per request."""

    name = "replace"

    def suppress(self, plan: SteeringPlan, i: int, r: int, gate: int | None) -> RowReplace:
        """Edit i's replacement at row r with the request's γ."""
        edit = plan.edits[i]
        part = plan.cache.get(
            plan.key("replace", edit.spec.name, edit.percentile, plan.before(i), r),
            functools.partial(self.build, plan, i, r))
        return part.scaled(plan.gamma(edit.gamma))

    def build(self, plan: SteeringPlan, i: int, r: int) -> RowReplace:
        """RowReplace (γ = 1) for suppressing edit i's concept at row r (cache misses only)."""
        t, edit = plan.tables, plan.edits[i]
        c = t.concept_index(edit.spec.name)
        idx = plan.chosen(i, r)
        others = [t.concept_index(n) for n in plan.kinds[edit.spec.kind] if n != edit.spec.name]
        if others:
            target_idx = torch.unique(torch.cat([t.selected_features(o, r, edit.percentile)
                                                 for o in others]))
            target = t.means[others][:, r, target_idx].mean(0)
        else:  # a kind with one concept: nothing to move towards, only removal
            target_idx = torch.zeros(0, dtype=torch.long, device=t.means.device)
            target = torch.zeros(0, device=t.means.device)
        device, dtype = plan.w_dec.device, plan.w_dec.dtype
        mass = t.means[c, r, idx].sum().clamp_min(torch.finfo(torch.float32).tiny)
        return RowReplace(
            features=idx.to(device),
            concept_mass=mass.to(device, dtype),
            directions=plan.w_dec[idx.to(device)],
            target=target.to(device, dtype),
            target_directions=plan.w_dec[target_idx.to(device)],
        )
