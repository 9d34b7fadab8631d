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
from steering.recipe import PLAIN, SteeringRecipe
from steering.translation import TranslationTables


def column_table(features: Tensor) -> Tensor:
    """Lookup [max id + 2]: feature id -> its column in ``features`` [m] (distinct ids), m for
    any other id; the last entry stands for every id above the largest (see
    :func:`feature_columns`)."""
    m = len(features)
    size = int(features.max()) + 2 if m else 1
    table = torch.full((size,), m, dtype=torch.long, device=features.device)
    table[features] = torch.arange(m, device=features.device)
    return table


def feature_columns(indices: Tensor, features: Tensor, table: Tensor | None = None) -> Tensor:
    """For each active code entry [..., k], its column in ``features``, or m where the feature
    is not one of them: a lookup, O(entries + m), where comparing every entry with every
    feature costs O(entries · m) (seconds per step for a 2k-feature swap). ``table``: the
    features' :func:`column_table`, when the caller keeps it."""
    table = column_table(features) if table is None else table
    return table[indices.clamp(max=len(table) - 1)]


def gather_latents(values: Tensor, indices: Tensor, features: Tensor) -> Tensor:
    """z_j for j in ``features`` (distinct ids) from a top-k code: [..., k] × [m] -> [..., m]
    (0 if not active)."""
    m = len(features)
    out = torch.zeros(*values.shape[:-1], m + 1, dtype=values.dtype, device=values.device)
    out.scatter_add_(-1, feature_columns(indices, features), values)
    return out[..., :m]


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


@dataclass
class RowReplace:
    """Suppression by replacement at one row: per token, remove the concept's features S_c and
    add γ·s·μ̄ over the kind's other concepts' features S_o, where s = Σ_{S_c} z / Σ_{S_c} μ_c
    is how strongly the token carries the concept (see :mod:`steering.recipe`)."""

    features: Tensor  # [m] long: S_c
    concept_mass: Tensor  # [] Σ_{j∈S_c} μ_{c,t,j}
    directions: Tensor  # [m, d_in]
    target: Tensor  # [u]: γ · mean over the other concepts of μ_{c',t,j}, j ∈ S_o
    target_directions: Tensor  # [u, d_in]

    def delta(self, values: Tensor, indices: Tensor) -> Tensor:
        """Σ_j (z'_j − z_j) d_j for each token: [T, k] codes -> [T, d_in]."""
        z = gather_latents(values, indices, self.features)
        strength = z.sum(-1, keepdim=True) / self.concept_mass
        return (-z) @ self.directions + (strength * self.target) @ self.target_directions


@dataclass
class RowTranslate:
    """Suppression by a learned swap at one row (:mod:`steering.translation`): per token,
    Δx = γ·(Σ_j z_j·D_j + b) over the features j the swap was fitted on."""

    features: Tensor  # [m] long
    deltas: Tensor  # [m, d_in]: γ·D_j
    bias: Tensor  # [d_in]: γ·b

    def __post_init__(self) -> None:
        # built once per plan row, not per step: the lookup and the rows with a zero row
        # appended for every feature outside the swap
        self._table = column_table(self.features)
        self._rows = torch.cat([self.deltas, self.deltas.new_zeros(1, self.deltas.shape[1])])

    def delta(self, values: Tensor, indices: Tensor) -> Tensor:
        """The learned edit for each token: [T, k] codes -> [T, d_in], summed straight from
        the k active entries (a feature outside the swap reads the zero row)."""
        k = values.shape[-1]
        columns = feature_columns(indices, self.features, self._table).reshape(-1, k)
        out = torch.nn.functional.embedding_bag(columns, self._rows, mode="sum",
                                                per_sample_weights=values.reshape(-1, k)
                                                .to(self._rows.dtype))
        return out.view(*values.shape[:-1], -1) + self.bias


RowPart = RowEdit | RowReplace | RowTranslate


@dataclass
class RowPlan:
    """The edits of one row: (gate concept index or None, edit); gated edits apply only to the
    images in which the gate finds that concept."""

    parts: list[tuple[int | None, RowPart]]


class SteeringPlan:
    """Per-row edits for a request's active edits under a recipe, built lazily and cached."""

    def __init__(self, tables: ImportanceTables, w_dec: Tensor, edits: list[ResolvedEdit],
                 kinds: dict[str, list[str]], recipe: SteeringRecipe = PLAIN,
                 translations: TranslationTables | None = None) -> None:
        self.tables = tables
        self.translations = translations
        self.w_dec = w_dec
        self.edits = [e for e in edits if e.active]
        self.kinds = kinds
        self.recipe = recipe
        self._rows: dict[int, RowPlan] = {}

    def __bool__(self) -> bool:
        return bool(self.edits)

    @property
    def gate_margins(self) -> dict[str, float]:
        """Gate margin of each concept whose edit is detection-gated under this recipe."""
        if not self.recipe.gate:
            return {}
        return {e.spec.name: e.gate_margin for e in self.edits
                if e.direction is Direction.SUPPRESS}

    @property
    def gate_anchors(self) -> dict[str, str]:
        """With a latching recipe: the anchor of each gated suppression that has a learned swap
        (the gate keeps such an image while it looks like the anchor)."""
        if not (self.recipe.latch and self.recipe.gate and self.translations is not None):
            return {}
        out = {}
        for name in self.gate_margins:
            swap = self.translations.get(name)
            if swap is not None:
                out[name] = swap.anchor
        return out

    def row(self, r: int) -> RowPlan:
        """The edits at table row r; a feature chosen by two edits takes the first's edit."""
        cached = self._rows.get(r)
        if cached is not None:
            return cached
        t = self.tables
        seen: set[int] = set()
        merged: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        parts: list[tuple[int | None, RowPart]] = []
        for edit in self.edits:
            c = t.concept_index(edit.spec.name)
            chosen = [j for j in t.selected_features(c, r, edit.percentile).tolist()
                      if j not in seen]
            seen.update(chosen)
            idx = torch.tensor(chosen, dtype=torch.long, device=t.means.device)
            if edit.direction is Direction.AMPLIFY:
                mu = t.means[c, r, idx]
                merged.append((idx, torch.full_like(mu, -torch.inf), torch.zeros_like(mu),
                               edit.gamma * mu))
                continue
            gate = c if self.recipe.gate else None
            learned = (self.translations.get(edit.spec.name)
                       if self.recipe.name == "translate" and self.translations else None)
            if learned is not None:
                feats, deltas, bias = learned.at(r, t.num_latents)
                device, dtype = self.w_dec.device, self.w_dec.dtype
                parts.append((gate, RowTranslate(feats.to(device),
                                                 (edit.gamma * deltas).to(device, dtype),
                                                 (edit.gamma * bias).to(device, dtype))))
                continue
            if self.recipe.name in ("replace", "translate"):  # no learned swap: replacement
                parts.append((gate, self._replace(edit, c, r, idx)))
                continue
            kind = [t.concept_index(n) for n in self.kinds[edit.spec.kind]]
            mu = t.means[c, r, idx]
            one = (idx, t.means[kind][:, r, idx].mean(0), -edit.gamma * mu - 1.0,
                   torch.zeros_like(mu))
            if gate is None:
                merged.append(one)
            else:
                parts.append((gate, self._row_edit([one])))
        if merged:
            parts.insert(0, (None, self._row_edit(merged)))
        plan = RowPlan(parts)
        self._rows[r] = plan
        return plan

    def _row_edit(self, pieces: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> RowEdit:
        """One RowEdit from (features, threshold, scale, shift) pieces."""
        device, dtype = self.w_dec.device, self.w_dec.dtype
        features = torch.cat([p[0] for p in pieces]).to(device)
        return RowEdit(
            features=features,
            threshold=torch.cat([p[1] for p in pieces]).to(device, dtype),
            scale=torch.cat([p[2] for p in pieces]).to(device, dtype),
            shift=torch.cat([p[3] for p in pieces]).to(device, dtype),
            directions=self.w_dec[features],
        )

    def _replace(self, edit: ResolvedEdit, c: int, r: int, idx: Tensor) -> RowReplace:
        """RowReplace for suppressing concept index c (features idx) at row r."""
        t = self.tables
        others = [t.concept_index(n) for n in self.kinds[edit.spec.kind] if n != edit.spec.name]
        if others:
            target_idx = torch.unique(torch.cat([t.selected_features(o, r, edit.percentile)
                                                 for o in others]))
            target = edit.gamma * t.means[others][:, r, target_idx].mean(0)
        else:  # a kind with one concept: nothing to move towards, only removal
            target_idx = torch.zeros(0, dtype=torch.long, device=t.means.device)
            target = torch.zeros(0, device=t.means.device)
        device, dtype = self.w_dec.device, self.w_dec.dtype
        mass = t.means[c, r, idx].sum().clamp_min(torch.finfo(torch.float32).tiny)
        return RowReplace(
            features=idx.to(device),
            concept_mass=mass.to(device, dtype),
            directions=self.w_dec[idx.to(device)],
            target=target.to(device, dtype),
            target_directions=self.w_dec[target_idx.to(device)],
        )


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
