"""What steering and detection do at one importance-table row, as small dense tensors.

Everything per token reduces to the SAE's top-k (values, indices): the latents of the chosen
features S are gathered from them, edited, and only the |S| decoder rows are touched:
``out = x + Σ_{j∈S} (z'_j − z_j) d_j`` (error-preserving).

Rows are built before the UNet runs (:meth:`SteeringPlan.prepare`) and kept in a
:class:`RowCache` that every request of a worker shares, so a second request with the same
edit builds nothing and the hook does tensor arithmetic only (no host synchronisation, which
on a GPU would stall the stream every step). Learned-swap and replacement rows are stored at
γ = 1 and scaled in the hook by a 0-dim tensor, so requests that differ only in γ share them.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from steering.edits import Direction, ResolvedEdit
from steering.importance_tables import ImportanceTables
from steering.recipe import PLAIN, SteeringRecipe
from steering.translation import ConceptTranslation, TranslationTables

PLAN_CACHE_ENV = "STEER_PLAN_CACHE_MB"
# 4 GiB: two suppressed concepts' learned swaps over all 50 steps at SD-1.4 scale in fp16
# (≈ 16k features × 1280 × 2 bytes ≈ 42 MB per concept and step); the toy's rows are ~1000×
# smaller.
DEFAULT_PLAN_CACHE_MB = 4096


def column_table(features: Tensor) -> Tensor:
    """Lookup [max id + 2]: feature id -> its column in ``features`` [m] (distinct ids), m for
    any other id; the last entry stands for every id above the largest (see
    :func:`feature_columns`). Reads ``features.max()`` on the host: build it once per row."""
    m = len(features)
    size = int(features.max()) + 2 if m else 1
    table = torch.full((size,), m, dtype=torch.long, device=features.device)
    table[features] = torch.arange(m, device=features.device)
    return table


def feature_columns(indices: Tensor, features: Tensor, table: Tensor | None = None) -> Tensor:
    """For each active code entry [..., k], its column in ``features``, or m where the feature
    is not one of them: a lookup, O(entries + m), where comparing every entry with every
    feature costs O(entries · m) (seconds per step for a 2k-feature swap). ``table``: the
    features' :func:`column_table`, when the caller keeps it (then no host sync)."""
    table = column_table(features) if table is None else table
    return table[indices.clamp(max=len(table) - 1)]


def gather_latents(values: Tensor, indices: Tensor, features: Tensor,
                   table: Tensor | None = None) -> Tensor:
    """z_j for j in ``features`` (distinct ids) from a top-k code: [..., k] × [m] -> [..., m]
    (0 if not active); ``table``: the features' :func:`column_table` if already built."""
    m = len(features)
    out = torch.zeros(*values.shape[:-1], m + 1, dtype=values.dtype, device=values.device)
    out.scatter_add_(-1, feature_columns(indices, features, table), values)
    return out[..., :m]


def _footprint(part: object) -> int:
    """Bytes held by the tensors of a built row (views of one storage counted once)."""
    storages = {}
    for value in vars(part).values():
        if isinstance(value, Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


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


@dataclass
class RowTranslate:
    """Suppression by a learned swap at one row (:mod:`steering.translation`): per token,
    Δx = γ·(Σ_j z_j·D_j + b) over the features j the swap was fitted on."""

    features: Tensor  # [m] long
    deltas: Tensor  # [m, d_in]: D_j (γ = 1)
    bias: Tensor  # [d_in]: b (γ = 1)
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
        the k active entries (a feature outside the swap reads the zero row)."""
        k = values.shape[-1]
        columns = feature_columns(indices, self.features, self._table).reshape(-1, k)
        out = torch.nn.functional.embedding_bag(columns, self._rows, mode="sum",
                                                per_sample_weights=values.reshape(-1, k)
                                                .to(self._rows.dtype))
        return (out.view(*values.shape[:-1], -1) + self.bias) * self.gamma


RowPart = RowEdit | RowReplace | RowTranslate


class RowCache:
    """Built row parts, least recently used first out, bounded in bytes; one per worker.

    Keys name everything a part depends on (bundle, concept, direction, percentile, the edits
    before it, row, device, dtype; γ only for parts that fold it in), so requests share parts
    safely. A part larger than the whole budget is used by its request but not kept."""

    def __init__(self, max_bytes: int | None = DEFAULT_PLAN_CACHE_MB * 2**20) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"plan cache size must be ≥ 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes  # None: unbounded (a plan's private cache)
        self.bytes = 0
        self.builds = 0
        self.hits = 0
        self._entries: OrderedDict[Hashable, tuple[RowPart, int]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> RowCache:
        """A cache of ``STEER_PLAN_CACHE_MB`` MiB (default 4096; 0 turns caching off)."""
        raw = os.environ.get(PLAN_CACHE_ENV, "").strip()
        if not raw:
            return cls()
        try:
            mb = float(raw)
        except ValueError:
            raise ValueError(f"{PLAN_CACHE_ENV}={raw!r} is not a number: set it to the plan "
                             f"cache size in MiB (default {DEFAULT_PLAN_CACHE_MB}; 0: off)"
                             ) from None
        if mb < 0:
            raise ValueError(f"{PLAN_CACHE_ENV}={raw!r} must be ≥ 0 (MiB; 0 turns caching off)")
        return cls(int(mb * 2**20))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable, build: Callable[[], RowPart]) -> RowPart:
        """The part cached under ``key``, or ``build()``'s, kept if the budget allows."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return hit[0]
        part = build()  # outside the lock: building may take a while
        size = _footprint(part)
        with self._lock:
            self.builds += 1
            if key not in self._entries:
                self._entries[key] = (part, size)
                self.bytes += size
            while self.max_bytes is not None and self.bytes > self.max_bytes and self._entries:
                _, (_, freed) = self._entries.popitem(last=False)
                self.bytes -= freed
        return part

    def clear(self) -> None:
        """Drop every cached part (e.g. after loading another bundle)."""
        with self._lock:
            self._entries.clear()
            self.bytes = 0


@dataclass
class RowPlan:
    """The edits of one row: (gate concept index or None, edit); gated edits apply only to the
    images in which the gate finds that concept."""

    parts: list[tuple[int | None, RowPart]]


class SteeringPlan:
    """Per-row edits for a request's active edits under a recipe.

    Rows come from ``cache`` (shared by a worker's requests; ``scope`` names the bundle, e.g.
    its sha256, so parts of different bundles never mix) or, without one, from a cache private
    to this plan. Learned swaps are kept in ``swap_dtype`` (the serving dtype; default: the
    decoder's)."""

    def __init__(self, tables: ImportanceTables, w_dec: Tensor, edits: list[ResolvedEdit],
                 kinds: dict[str, list[str]], recipe: SteeringRecipe = PLAIN,
                 translations: TranslationTables | None = None, *,
                 cache: RowCache | None = None, scope: Hashable | None = None,
                 swap_dtype: torch.dtype | None = None) -> None:
        if cache is not None and scope is None:
            raise ValueError("a shared RowCache needs scope= naming the bundle (e.g. its "
                             "sha256), so rows of different bundles never mix")
        self.tables = tables
        self.translations = translations
        self.w_dec = w_dec
        self.edits = [e for e in edits if e.active]
        self.kinds = kinds
        self.recipe = recipe
        self.cache = cache if cache is not None else RowCache(max_bytes=None)
        self.scope = scope
        self.swap_dtype = swap_dtype if swap_dtype is not None else w_dec.dtype
        self._rows: dict[int, RowPlan] = {}
        self._gammas: dict[float, Tensor] = {}
        self._signature = tuple((e.spec.name, str(e.direction), e.gamma, e.percentile)
                                for e in self.edits)

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

    def prepare(self, rows: Iterable[int]) -> None:
        """Build (or take from the cache) every row a request will use, before the UNet runs,
        so building's host work (feature selection, lookups) never happens inside the hook."""
        for r in rows:
            self.row(r)

    def row(self, r: int) -> RowPlan:
        """The edits at table row r; a feature chosen by two edits takes the first's edit."""
        cached = self._rows.get(r)
        if cached is not None:
            return cached
        parts: list[tuple[int | None, RowPart]] = []
        merged: list[int] = []  # edits folded into one ungated RowEdit
        for i, edit in enumerate(self.edits):
            name = edit.spec.name
            if edit.direction is Direction.AMPLIFY:
                merged.append(i)
                continue
            gate = self.tables.concept_index(name) if self.recipe.gate else None
            learned = (self.translations.get(name)
                       if self.recipe.name == "translate" and self.translations else None)
            if learned is not None:
                part = self.cache.get(self._key("translate", name, r, self.swap_dtype),
                                      functools.partial(self._translate, learned, r))
                parts.append((gate, part.scaled(self._gamma(edit.gamma))))
            elif self.recipe.name in ("replace", "translate"):  # no learned swap: replacement
                part = self.cache.get(
                    self._key("replace", name, edit.percentile, self._before(i), r),
                    functools.partial(self._replace, i, r))
                parts.append((gate, part.scaled(self._gamma(edit.gamma))))
            elif gate is None:
                merged.append(i)
            else:
                parts.append((gate, self.cache.get(
                    self._key("edit", self._signature[: i + 1], r),
                    functools.partial(self._row_edit, [i], r))))
        if merged:
            parts.insert(0, (None, self.cache.get(
                self._key("merged", self._signature[: merged[-1] + 1], tuple(merged), r),
                functools.partial(self._row_edit, merged, r))))
        plan = RowPlan(parts)
        self._rows[r] = plan
        return plan

    # -- building (cache misses only) ------------------------------------------------------

    def _key(self, *what: Hashable) -> tuple[Hashable, ...]:
        """Cache key: the bundle, what the part depends on, and where it lives."""
        return (self.scope, *what, str(self.w_dec.device), self.w_dec.dtype)

    def _before(self, i: int) -> tuple[tuple[str, float], ...]:
        """What edit i's features depend on besides its own: the edits before it (theirs go
        first)."""
        return tuple((e.spec.name, e.percentile) for e in self.edits[:i])

    def _gamma(self, gamma: float) -> Tensor:
        """γ as a 0-dim tensor on the decoder's device, made once per plan (outside the hook)."""
        out = self._gammas.get(gamma)
        if out is None:
            out = torch.tensor(gamma, dtype=torch.float32, device=self.w_dec.device)
            self._gammas[gamma] = out
        return out

    def _chosen(self, i: int, r: int) -> Tensor:
        """Edit i's selected features at row r less those of the edits before it."""
        t = self.tables
        taken: set[int] = set()
        for e in self.edits[:i]:
            taken.update(t.selected_features(e.spec.name, r, e.percentile).tolist())
        edit = self.edits[i]
        chosen = [j for j in t.selected_features(edit.spec.name, r, edit.percentile).tolist()
                  if j not in taken]
        return torch.tensor(chosen, dtype=torch.long, device=t.means.device)

    def _piece(self, i: int, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(features, threshold, scale, shift) of a plain edit i at row r."""
        t, edit = self.tables, self.edits[i]
        c = t.concept_index(edit.spec.name)
        idx = self._chosen(i, r)
        mu = t.means[c, r, idx]
        if edit.direction is Direction.AMPLIFY:
            return idx, torch.full_like(mu, -torch.inf), torch.zeros_like(mu), edit.gamma * mu
        kind = [t.concept_index(n) for n in self.kinds[edit.spec.kind]]
        return (idx, t.means[kind][:, r, idx].mean(0), -edit.gamma * mu - 1.0,
                torch.zeros_like(mu))

    def _row_edit(self, edits: list[int], r: int) -> RowEdit:
        """One RowEdit of the plain edits ``edits`` (indices) at row r."""
        pieces = [self._piece(i, r) for i in edits]
        device, dtype = self.w_dec.device, self.w_dec.dtype
        features = torch.cat([p[0] for p in pieces]).to(device)
        return RowEdit(
            features=features,
            threshold=torch.cat([p[1] for p in pieces]).to(device, dtype),
            scale=torch.cat([p[2] for p in pieces]).to(device, dtype),
            shift=torch.cat([p[3] for p in pieces]).to(device, dtype),
            directions=self.w_dec[features],
        )

    def _translate(self, learned: ConceptTranslation, r: int) -> RowTranslate:
        """The learned swap's rows at row r (γ = 1), in the serving dtype."""
        feats, deltas, bias = learned.at(r, self.tables.num_latents)
        device, dtype = self.w_dec.device, self.swap_dtype
        return RowTranslate(feats.to(device), deltas.to(device, dtype), bias.to(device, dtype))

    def _replace(self, i: int, r: int) -> RowReplace:
        """RowReplace (γ = 1) for suppressing edit i's concept at row r."""
        t, edit = self.tables, self.edits[i]
        c = t.concept_index(edit.spec.name)
        idx = self._chosen(i, r)
        others = [t.concept_index(n) for n in self.kinds[edit.spec.kind] if n != edit.spec.name]
        if others:
            target_idx = torch.unique(torch.cat([t.selected_features(o, r, edit.percentile)
                                                 for o in others]))
            target = t.means[others][:, r, target_idx].mean(0)
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
    """Per-row detection of every bundle concept at its default percentile.

    score_c at a step = Σ_{j∈S_c} mean-over-tokens z_j / Σ_{j∈S_c} μ_{c,t,j};
    the request's score is the mean over steps: ≈ 1 for a typical prompt of c, ≈ 0 without c.
    Rows are built once (:meth:`prepare`, before the UNet runs) and kept for the pipeline's
    life, so :meth:`score` is tensor arithmetic only.
    """

    def __init__(self, tables: ImportanceTables, percentiles: list[float], device: torch.device):
        self.tables = tables
        self.percentiles = percentiles
        self.device = device
        self._rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._lookups: dict[int, Tensor] = {}

    def prepare(self, rows: Iterable[int]) -> None:
        """Build every row a request will use before the UNet runs."""
        for r in rows:
            self.row(r)

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
        self._lookups[r] = column_table(out[0])
        return out

    def score(self, values: Tensor, indices: Tensor, r: int) -> Tensor:
        """Per-image scores [B, C] at row r from cond-half codes [B, tokens, k]."""
        union, member, denom = self.row(r)
        z = gather_latents(values.float(), indices, union, self._lookups[r]).mean(1)
        return (z @ member) / denom
