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
[R], ``{c}.feature`` [R], ``{c}.coef`` [R, r] (float16), ``{c}.basis`` [steps, r, d_in];
anchors in the metadata.
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

TRANSLATION_FILE = "translation.safetensors"


@dataclass
class ConceptTranslation:
    """The learned swap c → anchor: sparse rows (table row, feature) with their coefficients
    on each row's basis of edit directions."""

    anchor: str
    row: Tensor  # [R] long: importance-table row (denoising step)
    feature: Tensor  # [R] long: feature id, or n_latents for the bias
    coef: Tensor  # [R, r] float16
    basis: Tensor  # [steps, r, d_in] float32

    def __post_init__(self) -> None:
        self.row = self.row.detach().to(torch.int64)
        self.feature = self.feature.detach().to(torch.int64)
        self.coef = self.coef.detach().to(torch.float16)
        self.basis = self.basis.detach().to(torch.float32)
        if not (self.row.ndim == self.feature.ndim == 1 and self.coef.ndim == 2
                and self.basis.ndim == 3 and self.basis.shape[1] == self.coef.shape[1]
                and len(self.row) == len(self.feature) == len(self.coef)):
            raise ValueError(f"translation to {self.anchor!r}: row {list(self.row.shape)}, "
                             f"feature {list(self.feature.shape)}, coef "
                             f"{list(self.coef.shape)} and basis {list(self.basis.shape)} must "
                             "be [R], [R], [R, r], [steps, r, d_in]")

    @property
    def d_in(self) -> int:
        """Width of the edits (the SAE's d_in)."""
        return int(self.basis.shape[2])

    def at(self, r: int, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
        """(features [m], deltas [m, d_in], bias [d_in]) of table row r (zero bias if none).

        Selecting the row's entries sizes tensors by the data (a host sync on a GPU): call it
        when building a plan, never per step (steering/plan.py caches what it returns)."""
        here = torch.nonzero(self.row == r).flatten()
        feats = self.feature[here]
        is_bias = feats == n_latents
        keep = torch.nonzero(~is_bias).flatten()
        bias = (self.coef[here[is_bias]].float() @ self.basis[r]).sum(0)  # empty sum: zeros
        return feats[keep], self.coef[here[keep]].float() @ self.basis[r], bias


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
                                       t.coef.to(device), t.basis.to(device))
                 for c, t in self.concepts.items()}
        return TranslationTables(self.n_latents, self.d_in, self.num_steps, moved)

    def save(self, path: str | Path) -> None:
        """One safetensors file; sizes and anchors in its metadata."""
        tensors: dict[str, Tensor] = {}
        for c, t in self.concepts.items():
            tensors[f"{c}.row"] = t.row.to(torch.int32).contiguous().cpu()  # int64 in RAM
            tensors[f"{c}.feature"] = t.feature.to(torch.int32).contiguous().cpu()
            tensors[f"{c}.coef"] = t.coef.contiguous().cpu()
            tensors[f"{c}.basis"] = t.basis.contiguous().cpu()
        meta = {"anchors": json.dumps({c: t.anchor for c, t in self.concepts.items()}),
                "n_latents": str(self.n_latents), "d_in": str(self.d_in),
                "num_steps": str(self.num_steps)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TranslationTables:
        """Read a file written by ``save``, naming what is missing or mis-shaped."""
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
                concepts[c] = ConceptTranslation(str(anchor), row, feature, coef, basis)
        return cls(*sizes, concepts=concepts)
