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

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from steering import recipes
from steering.edits import Direction, ResolvedEdit
from steering.importance_tables import ImportanceTables
from steering.recipe import PLAIN, SteeringRecipe
from steering.recipes.lookup import column_table, feature_columns, gather_latents
from steering.recipes.plain import RowEdit
from steering.recipes.replace import RowReplace
from steering.recipes.translate import RowTranslate
from steering.translation import TranslationTables

__all__ = ["DetectionPlan", "RowCache", "RowEdit", "RowPart", "RowPlan", "RowReplace",
           "RowTranslate", "SteeringPlan", "column_table", "feature_columns",
           "gather_latents"]

PLAN_CACHE_ENV = "STEER_PLAN_CACHE_MB"
# 4 GiB: learned swaps are cached factored (≈ 16k features × rank 16 per step, under 1 MB per
# concept and step at SD-1.4 scale with the lookup), so this holds every concept's rows of a
# bundle many times over; plain and replacement rows ([m, d_in] decoder rows) are the larger.
DEFAULT_PLAN_CACHE_MB = 4096


def _footprint(part: object) -> int:
    """Bytes held by the tensors of a built row (views of one storage counted once)."""
    storages = {}
    for value in vars(part).values():
        if isinstance(value, Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


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
        # what each edit is, in order: plain parts depend on every edit up to theirs
        self.signature = tuple((e.spec.name, str(e.direction), e.gamma, e.percentile)
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
        """The edits at table row r; a feature chosen by two edits takes the first's edit.

        Each suppression's part comes from the recipe registered under the recipe's name
        (:mod:`steering.recipes`); amplifications and ungated plain suppressions fold into one
        plain edit that goes first."""
        cached = self._rows.get(r)
        if cached is not None:
            return cached
        recipe = recipes.get(self.recipe.name)
        parts: list[tuple[int | None, RowPart]] = []
        merged: list[int] = []  # edits folded into one ungated RowEdit
        for i, edit in enumerate(self.edits):
            if edit.direction is Direction.AMPLIFY:
                merged.append(i)
                continue
            gate = self.tables.concept_index(edit.spec.name) if self.recipe.gate else None
            part = recipe.suppress(self, i, r, gate)
            if part is None:
                merged.append(i)
            else:
                parts.append((gate, part))
        if merged:
            plain = cast(recipes.plain.PlainRecipe, recipes.get("plain"))
            parts.insert(0, (None, plain.merged(self, merged, r)))
        plan = RowPlan(parts)
        self._rows[r] = plan
        return plan

    # -- what recipes build rows from (cache misses only) -----------------------------------

    def key(self, *what: Hashable) -> tuple[Hashable, ...]:
        """Cache key: the bundle, what the part depends on, and where it lives."""
        return (self.scope, *what, str(self.w_dec.device), self.w_dec.dtype)

    def before(self, i: int) -> tuple[tuple[str, float], ...]:
        """What edit i's features depend on besides its own: the edits before it (theirs go
        first)."""
        return tuple((e.spec.name, e.percentile) for e in self.edits[:i])

    def gamma(self, gamma: float) -> Tensor:
        """γ as a 0-dim tensor on the decoder's device, made once per plan (outside the hook)."""
        out = self._gammas.get(gamma)
        if out is None:
            out = torch.tensor(gamma, dtype=torch.float32, device=self.w_dec.device)
            self._gammas[gamma] = out
        return out

    def chosen(self, i: int, r: int) -> Tensor:
        """Edit i's selected features at row r less those of the edits before it."""
        t = self.tables
        taken: set[int] = set()
        for e in self.edits[:i]:
            taken.update(t.selected_features(e.spec.name, r, e.percentile).tolist())
        edit = self.edits[i]
        chosen = [j for j in t.selected_features(edit.spec.name, r, edit.percentile).tolist()
                  if j not in taken]
        return torch.tensor(chosen, dtype=torch.long, device=t.means.device)


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
