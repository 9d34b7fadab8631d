"""Learned concept swaps: per step, what each SAE feature of a token should add to the output.

For a suppressed concept c with an anchor concept a (e.g. red → green), the tables hold, at
table row t, a linear map from a token's sparse code to the edit that turns the token into the
same token of the prompt with a instead of c:

    Δx = γ · (Σ_j z_j · D_{c,t,j} + b_{c,t})

fitted by ridge regression on paired runs (same prompt and seed, c swapped for a; see
``training/translation_fit.py``). γ = 1 is the fitted swap. Only the rows D_{c,t,j} of features
seen while fitting are stored (``feature`` ids; id ``n_latents`` is the bias b), and each
step's rows in a reduced rank, D_{c,t,j} = U_j · V_t with V_t [r, d_in] the directions the
fitted edits span (r = 16 keeps the toy's swaps and makes the file 4× smaller): ``{c}.row``
[R] (uint8), ``{c}.feature`` [R] (int16 below 32,768 latents), ``{c}.coef`` [R, r] (float16,
or int8 with ``{c}.scale`` [R] float16), ``{c}.basis`` [steps, r, d_in] (float16); anchors in
the metadata. Files of bundle formats 3–4 (int32 ids, float32 basis) load as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from steering.anchors import TRANSLATION_FILE

__all__ = ["TRANSLATION_FILE", "ConceptTranslation", "TranslationTables"]



def _index_dtype(largest: int) -> torch.dtype:
    """The smallest integer dtype on disk for ids in [0, largest] (uint8, int16, else int32)."""
    if largest <= 255:
        return torch.uint8
    return torch.int16 if largest <= 32767 else torch.int32


@dataclass
class ConceptTranslation:
    """The learned swap c → anchor: sparse rows (table row, feature) with their coefficients
    on each row's basis of edit directions.

    Coefficients are float16, or int8 with a float16 scale per entry (``scale`` [R];
    :meth:`quantized`). The basis is kept at float16 precision (upcast to float32 here), so
    the file stores it in float16 and reads back exactly what was saved."""

    anchor: str
    row: Tensor  # [R] long: importance-table row (denoising step)
    feature: Tensor  # [R] long: feature id, or n_latents for the bias
    coef: Tensor  # [R, r] float16, or int8 with ``scale``
    basis: Tensor  # [steps, r, d_in] float32 holding float16 values
    scale: Tensor | None = None  # [R] float16: coef_i = coef_int8_i · scale_i

    def __post_init__(self) -> None:
        self.row = self.row.detach().to(torch.int64)
        self.feature = self.feature.detach().to(torch.int64)
        if self.scale is None:
            self.coef = self.coef.detach().to(torch.float16)
        else:
            if self.coef.dtype != torch.int8:
                raise ValueError(f"translation to {self.anchor!r}: coefficients with a scale "
                                 f"must be int8, got {self.coef.dtype}; use quantized()")
            self.scale = self.scale.detach().to(torch.float16)
        self.basis = self.basis.detach().to(torch.float16).to(torch.float32)
        if not (self.row.ndim == self.feature.ndim == 1 and self.coef.ndim == 2
                and self.basis.ndim == 3 and self.basis.shape[1] == self.coef.shape[1]
                and len(self.row) == len(self.feature) == len(self.coef)
                and (self.scale is None or tuple(self.scale.shape) == (len(self.row),))):
            raise ValueError(f"translation to {self.anchor!r}: row {list(self.row.shape)}, "
                             f"feature {list(self.feature.shape)}, coef "
                             f"{list(self.coef.shape)}, basis {list(self.basis.shape)} and "
                             "scale must be [R], [R], [R, r], [steps, r, d_in] and [R]")

    @property
    def d_in(self) -> int:
        """Width of the edits (the SAE's d_in)."""
        return int(self.basis.shape[2])

    def coefficients(self, select: Tensor | slice = slice(None)) -> Tensor:
        """Float32 coefficients [.., r] of the selected entries (int8 ones times their scale)."""
        coef = self.coef[select].float()
        return coef if self.scale is None else coef * self.scale[select].float()[:, None]

    def factors(self, r: int, n_latents: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(features [m], coefficients [m, rank], basis [rank, d_in], bias [d_in]) of table
        row r (zero bias if none): the row's deltas are coefficients @ basis.

        Selecting the row's entries sizes tensors by the data (a host sync on a GPU): call it
        when building a plan, never per step (steering/plan.py caches what it returns)."""
        here = torch.nonzero(self.row == r).flatten()
        feats = self.feature[here]
        is_bias = feats == n_latents
        keep = here[torch.nonzero(~is_bias).flatten()]
        bias = (self.coefficients(here[is_bias]) @ self.basis[r]).sum(0)  # empty sum: zeros
        return self.feature[keep], self.coefficients(keep), self.basis[r], bias

    def at(self, r: int, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
        """(features [m], deltas [m, d_in], bias [d_in]) of table row r, deltas materialised
        from :meth:`factors` (for fitting and checks; serving keeps them factored)."""
        feats, coef, basis, bias = self.factors(r, n_latents)
        return feats, coef @ basis, bias

    def quantized(self) -> ConceptTranslation:
        """The same swap with int8 coefficients and a float16 scale per entry (half the
        coefficient bytes; each entry keeps ~1/254 of its largest coefficient's precision)."""
        if self.scale is not None:
            return self
        coef = self.coef.float()
        scale = (coef.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float16).tiny).half()
        q = torch.round(coef / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return ConceptTranslation(self.anchor, self.row, self.feature, q, self.basis, scale)

    def contributions(self, n_latents: int, weight: Tensor | None = None) -> Tensor:
        """Per entry [R]: ‖coef_i @ basis[row_i]‖ times ``weight[row_i, feature_i]`` when given
        (e.g. the feature's mean activation at that step, [steps, n]): the size of what the
        entry adds to a token. Bias entries (feature n_latents) get +inf."""
        size = torch.empty(len(self.row))
        for r in torch.unique(self.row).tolist():
            here = torch.nonzero(self.row == r).flatten()
            coef = self.coefficients(here)
            gram = self.basis[r] @ self.basis[r].T  # ‖u V‖² = u (V Vᵀ) uᵀ, no [m, d_in]
            size[here] = ((coef @ gram) * coef).sum(-1).clamp_min(0).sqrt()
        is_bias = self.feature == n_latents
        if weight is not None:
            w = weight[self.row, self.feature.clamp(max=n_latents - 1)].float()
            size = size * w
        return torch.where(is_bias, torch.inf, size)

    def pruned(self, mass: float, n_latents: int,
               weight: Tensor | None = None) -> ConceptTranslation:
        """The entries that carry ``mass`` (0–1] of each step's summed :meth:`contributions`,
        largest first; the bias entries always stay."""
        if not 0 < mass <= 1:
            raise ValueError(f"pruning mass must be in (0, 1], got {mass}")
        size = self.contributions(n_latents, weight)
        keep = torch.isinf(size)
        for r in torch.unique(self.row).tolist():
            here = torch.nonzero((self.row == r) & ~keep).flatten()
            if not len(here):
                continue
            s, order = torch.sort(size[here], descending=True)
            cum = torch.cumsum(s.double(), 0)
            n_keep = int(torch.searchsorted(cum, mass * cum[-1])) + 1
            keep[here[order[:n_keep]]] = True
        idx = torch.nonzero(keep).flatten()
        return ConceptTranslation(self.anchor, self.row[idx], self.feature[idx], self.coef[idx],
                                  self.basis, None if self.scale is None else self.scale[idx])


@dataclass
class TranslationTables:
    """Learned swaps of a bundle's concepts (a concept without one falls back to replacement)."""

    n_latents: int
    d_in: int
    num_steps: int
    concepts: dict[str, ConceptTranslation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, names: Iterable[str] | None = None) -> None:
        """Check every table against the SAE's sizes, the step count and (given) concept names.

        The anchor is a label of what the swap was fitted towards: a bundle concept, or free
        text for a counterfactual prompt that is none (e.g. "a person wearing clothes")."""
        known = None if names is None else set(names)
        for c, tr in self.concepts.items():
            where = f"translation of {c!r}"
            if known is not None and c not in known:
                raise ValueError(f"{where}: not a concept of the bundle ({sorted(known)})")
            if not tr.anchor.strip():
                raise ValueError(f"{where}: empty anchor label; name what it swaps towards")
            if tuple(tr.basis.shape[::2]) != (self.num_steps, self.d_in):
                raise ValueError(f"{where}: basis {list(tr.basis.shape)} is not "
                                 f"[{self.num_steps}, r, {self.d_in}]")
            if len(tr.row) and not (int(tr.row.min()) >= 0 and int(tr.row.max()) < self.num_steps):
                raise ValueError(f"{where}: rows outside [0, {self.num_steps})")
            if len(tr.feature) and not (int(tr.feature.min()) >= 0
                                        and int(tr.feature.max()) <= self.n_latents):
                raise ValueError(f"{where}: feature ids outside [0, {self.n_latents}]")

    def get(self, concept: str) -> ConceptTranslation | None:
        """The learned swap of ``concept``, or None."""
        return self.concepts.get(concept)

    def to(self, device: str | torch.device) -> TranslationTables:
        """The same tables on ``device``."""
        moved = {c: ConceptTranslation(t.anchor, t.row.to(device), t.feature.to(device),
                                       t.coef.to(device), t.basis.to(device),
                                       None if t.scale is None else t.scale.to(device))
                 for c, t in self.concepts.items()}
        return TranslationTables(self.n_latents, self.d_in, self.num_steps, moved)

    def quantized(self) -> TranslationTables:
        """The same tables with int8 coefficients (see :meth:`ConceptTranslation.quantized`)."""
        return TranslationTables(self.n_latents, self.d_in, self.num_steps,
                                 {c: t.quantized() for c, t in self.concepts.items()})

    def pruned(self, mass: float, weight: Tensor | None = None) -> TranslationTables:
        """The same tables keeping the entries that carry ``mass`` of each step's
        contributions (see :meth:`ConceptTranslation.pruned`)."""
        return TranslationTables(self.n_latents, self.d_in, self.num_steps,
                                 {c: t.pruned(mass, self.n_latents, weight)
                                  for c, t in self.concepts.items()})

    def save(self, path: str | Path) -> None:
        """One safetensors file, compact and exact: ids in the smallest integer type that
        holds them (rows uint8, features int16 below 32,768 latents), the basis in float16
        (the precision it is kept at), coefficients as held; sizes and anchors in metadata."""
        tensors: dict[str, Tensor] = {}
        row_dtype, feature_dtype = _index_dtype(self.num_steps - 1), _index_dtype(self.n_latents)
        for c, t in self.concepts.items():
            tensors[f"{c}.row"] = t.row.to(row_dtype).contiguous().cpu()  # int64 in RAM
            tensors[f"{c}.feature"] = t.feature.to(feature_dtype).contiguous().cpu()
            tensors[f"{c}.coef"] = t.coef.contiguous().cpu()
            tensors[f"{c}.basis"] = t.basis.to(torch.float16).contiguous().cpu()
            if t.scale is not None:
                tensors[f"{c}.scale"] = t.scale.contiguous().cpu()
        meta = {"anchors": json.dumps({c: t.anchor for c, t in self.concepts.items()}),
                "n_latents": str(self.n_latents), "d_in": str(self.d_in),
                "num_steps": str(self.num_steps)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TranslationTables:
        """Read a file written by ``save`` (any format: int32 ids and a float32 basis before
        bundle format 5), naming what is missing or mis-shaped."""
        path = Path(path)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            try:
                anchors = json.loads(meta["anchors"])
                sizes = [int(meta[k]) for k in ("n_latents", "d_in", "num_steps")]
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path.name}: metadata needs anchors, n_latents, d_in and "
                                 f"num_steps ({e})") from e
            if not isinstance(anchors, dict):
                raise ValueError(f"{path.name}: metadata 'anchors' must map concept to anchor")
            keys = set(f.keys())
            concepts = {}
            for c, anchor in anchors.items():
                parts = [f"{c}.row", f"{c}.feature", f"{c}.coef", f"{c}.basis"]
                missing = [p for p in parts if p not in keys]
                if missing:
                    raise ValueError(f"{path.name}: missing tensor(s) {missing}")
                row, feature, coef, basis = (f.get_tensor(p).to(device) for p in parts)
                scale = f.get_tensor(f"{c}.scale").to(device) if f"{c}.scale" in keys else None
                if (coef.dtype == torch.int8) != (scale is not None):
                    raise ValueError(f"{path.name}: {c}.coef is {coef.dtype} and {c}.scale is "
                                     f"{'present' if scale is not None else 'missing'}; int8 "
                                     "coefficients need their scale (re-save the swaps)")
                concepts[c] = ConceptTranslation(str(anchor), row, feature, coef, basis, scale)
        return cls(*sizes, concepts=concepts)
