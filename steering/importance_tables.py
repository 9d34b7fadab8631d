"""Per-concept, per-timestep feature importance scores and mean activations μ.

``scores[c, t, j]`` ranks feature j for concept c at table row t (a denoising step);
``means[c, t, j]`` is μ_{c,t,j}, in activation units, used by steering; ``timesteps[t]`` is
the scheduler timestep of row t, so requests with another step count can map each of their
timesteps to the nearest row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor


class UnknownConceptError(KeyError):
    """Raised for a concept name not in the tables; its message lists the known ones."""

    def __str__(self) -> str:
        """Show the plain message instead of KeyError's quoted repr."""
        return str(self.args[0]) if self.args else ""


@dataclass
class ImportanceTables:
    """Score and μ tables [C, T, n] with their concept names and per-row timesteps."""

    concepts: list[str]
    scores: Tensor
    means: Tensor
    timesteps: Tensor
    _cache: dict[tuple[int, int, float], Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # dtype of scores and means on disk (None: float32); float16 halves the file, loading
    # upcasts to float32 as always
    storage_dtype: torch.dtype | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Normalise dtypes (float32 tables, int64 timesteps) and check shapes."""
        self.concepts = list(self.concepts)
        self.scores = self.scores.detach().to(torch.float32)
        self.means = self.means.detach().to(torch.float32)
        self.timesteps = self.timesteps.detach().to(torch.int64)
        self.validate()

    # -- shape -------------------------------------------------------------------------------

    @property
    def num_concepts(self) -> int:
        """Number of concepts C."""
        return len(self.concepts)

    @property
    def num_steps(self) -> int:
        """Number of table rows T (denoising steps the tables were made for)."""
        return int(self.timesteps.shape[0])

    @property
    def num_latents(self) -> int:
        """Number of SAE features n."""
        return int(self.scores.shape[-1])

    def validate(self) -> None:
        """Check scores [C,T,n], means [C,T,n], timesteps [T] and C == len(concepts)."""
        if self.scores.dim() != 3:
            raise ValueError(f"scores must be [C, T, n], got shape {list(self.scores.shape)}")
        c, t, _ = self.scores.shape
        if tuple(self.means.shape) != tuple(self.scores.shape):
            raise ValueError(
                f"means has shape {list(self.means.shape)} but scores has shape "
                f"{list(self.scores.shape)}; both must be [C, T, n]"
            )
        if tuple(self.timesteps.shape) != (t,):
            raise ValueError(
                f"timesteps has shape {list(self.timesteps.shape)} but scores has shape "
                f"{list(self.scores.shape)}; timesteps must be [T] = [{t}]"
            )
        if len(self.concepts) != c:
            raise ValueError(
                f"concepts lists {len(self.concepts)} names but scores has shape "
                f"{list(self.scores.shape)}; C must equal the number of concepts"
            )
        if len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"concept names must be unique, got {self.concepts}")

    # -- lookup ------------------------------------------------------------------------------

    def concept_index(self, name: str) -> int:
        """Return the index of concept ``name``; unknown names list the known ones."""
        try:
            return self.concepts.index(name)
        except ValueError:
            raise UnknownConceptError(
                f"unknown concept {name!r}; known concepts: {', '.join(self.concepts)}"
            ) from None

    def row_for_timestep(self, t: int) -> int:
        """Index of the row whose timestep is nearest to t (ties go to the first row)."""
        if self.num_steps == 0:
            raise ValueError("importance tables have no rows")
        dist = (self.timesteps - int(t)).abs()
        return int(torch.argmin(dist).item())  # argmin returns the first minimum

    def rows_for_timesteps(self, timesteps: Sequence[int]) -> list[int]:
        """Nearest table row for each timestep of a request's schedule."""
        return [self.row_for_timestep(int(t)) for t in timesteps]

    def selected_features(self, concept: str | int, row: int, percentile: float) -> Tensor:
        """Sorted indices j with scores[c,row,j] above the percentile quantile (linear), cached."""
        c = self.concept_index(concept) if isinstance(concept, str) else int(concept)
        if not 0 <= c < self.num_concepts:
            raise IndexError(f"concept index {c} out of range [0, {self.num_concepts})")
        if not 0 <= row < self.num_steps:
            raise IndexError(f"row {row} out of range [0, {self.num_steps})")
        percentile = float(percentile)
        if not 0.0 <= percentile < 100.0:
            raise ValueError(f"percentile must be in [0, 100), got {percentile}")
        key = (c, int(row), percentile)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        s = self.scores[c, row].float()
        q = torch.quantile(s, percentile / 100.0, interpolation="linear")
        idx = torch.nonzero(s > q, as_tuple=False).flatten().to(torch.int64)
        idx = torch.sort(idx).values
        self._cache[key] = idx
        return idx

    # -- storage -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write one safetensors file: scores, means (in ``storage_dtype``), timesteps; concept
        names in metadata."""
        self.validate()
        stored = self.storage_dtype or torch.float32
        save_file(
            {
                "scores": self.scores.to(stored).contiguous().cpu(),
                "means": self.means.to(stored).contiguous().cpu(),
                "timesteps": self.timesteps.contiguous().cpu(),
            },
            str(path),
            metadata={"concepts": json.dumps(self.concepts)},
        )

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ImportanceTables:
        """Read a file written by ``save``, naming what is missing or mis-shaped."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path.name} not found at {path}")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
            for key in ("scores", "means", "timesteps"):
                if key not in keys:
                    raise ValueError(f"{path.name}: missing tensor {key!r} (has {sorted(keys)})")
            tensors = {k: f.get_tensor(k) for k in ("scores", "means", "timesteps")}
        if "concepts" not in meta:
            raise ValueError(f"{path.name}: metadata has no 'concepts' entry")
        try:
            names = json.loads(meta["concepts"])
        except json.JSONDecodeError as e:
            raise ValueError(f"{path.name}: metadata 'concepts' is not JSON ({e})") from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path.name}: metadata 'concepts' must be a JSON list of strings")
        try:
            stored = tensors["scores"].dtype
            return cls(
                concepts=names,
                scores=tensors["scores"].to(device),
                means=tensors["means"].to(device),
                timesteps=tensors["timesteps"].to(device),
                storage_dtype=None if stored == torch.float32 else stored,
            )
        except ValueError as e:
            raise ValueError(f"{path.name}: {e}") from e
