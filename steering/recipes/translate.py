"""The translate recipe: a learned swap (:mod:`steering.translation`) per feature and step;
a concept without one falls back to replacement.

Rows stay factored as the swap stores them: each feature's coordinates [m, r] on the step's
basis [r, d_in], so a cached row is m·r numbers (≈ 0.5 MB per step at SD-1.4 scale, where
materialised deltas [m, d_in] were ≈ 42 MB) and the hook sums r-wide rows per token and
multiplies once by the basis."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from steering.recipes.base import RecipeRows, get, register
from steering.recipes.lookup import column_table, feature_columns
from steering.recipes.replace import RowReplace

if TYPE_CHECKING:
    from steering.plan import SteeringPlan
    from steering.translation import ConceptTranslation


@dataclass
class RowTranslate:
    """Suppression by a learned swap at one row: per token, Δx = γ·(Σ_j z_j·D_j + b) over the
    features j the swap was fitted on, with D_j = deltas_j @ basis (deltas_j itself when
    there is no basis)."""

    features: Tensor  # [m] long
    deltas: Tensor  # [m, r]: D_j's coordinates on ``basis`` (γ = 1); [m, d_in] without one
    bias: Tensor  # [d_in]: b (γ = 1)
    basis: Tensor | None = None  # [r, d_in]: the step's edit directions
    gamma: Tensor | float = 1.0  # the request's γ; the rows above do not depend on it

    def __post_init__(self) -> None:
        # built once per row: the lookup, and the rows with a zero row appended for every
        # feature outside the swap; ``deltas`` becomes a view of them (one copy in memory)
        self._table = column_table(self.features)
        self._rows = torch.cat([self.deltas, self.deltas.new_zeros(1, self.deltas.shape[1])])
        self.deltas = self._rows[:-1]

    def scaled(self, gamma: Tensor | float) -> RowTranslate:
        """The same rows (shared, not copied) with the request's γ."""
        out = copy.copy(self)
        out.gamma = gamma
        return out

    def delta(self, values: Tensor, indices: Tensor) -> Tensor:
        """The learned edit for each token: [T, k] codes -> [T, d_in], summed straight from
        the k active entries (a feature outside the swap reads the zero row), then one
        [T, r] @ [r, d_in] product with the basis."""
        k = values.shape[-1]
        columns = feature_columns(indices, self.features, self._table).reshape(-1, k)
        out = torch.nn.functional.embedding_bag(columns, self._rows, mode="sum",
                                                per_sample_weights=values.reshape(-1, k)
                                                .to(self._rows.dtype))
        if self.basis is not None:  # a Python attribute, not a tensor value: no host sync
            out = out @ self.basis
        return (out.view(*values.shape[:-1], -1) + self.bias) * self.gamma


@register
class TranslateRecipe(RecipeRows):
    """Learned-swap rows in the serving dtype, stored at γ = 1 and scaled per request."""

    name = "translate"

    def suppress(self, plan: SteeringPlan, i: int, r: int,
                 gate: int | None) -> RowTranslate | RowReplace:
        """Edit i's learned swap at row r, or its replacement when the bundle has no swap."""
        edit = plan.edits[i]
        learned = plan.translations.get(edit.spec.name) if plan.translations else None
        if learned is None:
            return get("replace").suppress(plan, i, r, gate)
        part = plan.cache.get(plan.key("translate", edit.spec.name, r, plan.swap_dtype),
                              functools.partial(self.build, plan, learned, r))
        return part.scaled(plan.gamma(edit.gamma))

    def build(self, plan: SteeringPlan, learned: ConceptTranslation, r: int) -> RowTranslate:
        """The learned swap's factored rows at row r (γ = 1), in the serving dtype."""
        feats, coef, basis, bias = learned.factors(r, plan.tables.num_latents)
        device, dtype = plan.w_dec.device, plan.swap_dtype
        return RowTranslate(feats.to(device), coef.to(device, dtype), bias.to(device, dtype),
                            basis.to(device, dtype, copy=True))  # not a view of all steps
