"""Lookups on top-k SAE codes shared by every recipe's rows and by detection: which of a row's
features each active entry is, without comparing every entry with every feature."""

from __future__ import annotations

import torch
from torch import Tensor


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
