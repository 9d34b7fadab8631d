"""Per-concept, per-timestep feature importance from a concept-labelled activation store.

SAeUron, exactly: μ_{c,t,j} = mean over the prompts labelled c (each weighted equally) of the
mean over the prompt's tokens at step t of z_j; μ_{¬c,t,j} = the same over the prompts that carry
another concept of c's kind; score = μ_c / Σ_j μ_c − μ_¬c / Σ_j μ_¬c.

The store is streamed once: each token's k active codes go, weighted by 1 / (tokens of its
(prompt, step) record), straight into the running sums of every (concept, step) its prompt
is labelled with (``index_add_``, never an n-wide dense z per token), so memory is
O(concepts × steps × n) whatever the store size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from steering.importance_tables import ImportanceTables
from steering.sae import TopKSAE
from training.activations.prompts import concept_kinds
from training.activations.store import ActivationStore, IndexRecord, StoreError

DEFAULT_BATCH_ROWS = 8192


# -- the formula -----------------------------------------------------------------------------


def score_from_means(mu_c: Tensor, mu_not: Tensor) -> Tensor:
    """score = μ_c/Σ_j μ_c − μ_¬c/Σ_j μ_¬c over the last axis (a zero sum gives zeros)."""
    return _normalise(mu_c) - _normalise(mu_not)


def _normalise(mu: Tensor) -> Tensor:
    total = mu.sum(dim=-1, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, mu / safe, torch.zeros_like(mu))


def importance_from_sums(
    sums: Tensor, counts: Sequence[int], names: Sequence[str], kinds: Mapping[str, str],
    concepts: Sequence[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """(scores, μ) [C, S, n] for ``concepts`` from per-concept sums of prompt means.

    ``sums[i]`` is the sum over the prompts labelled ``names[i]`` of their [S, n] means and
    ``counts[i]`` the number of those prompts; ``kinds`` maps every name to its kind.
    """
    concepts = list(names if concepts is None else concepts)
    pos = {name: i for i, name in enumerate(names)}
    scores, mus = [], []
    for c in concepts:
        if c not in pos or c not in kinds:
            raise ValueError(f"concept {c!r} has no labelled prompts and no kind; known: "
                             f"{', '.join(names)}")
        if counts[pos[c]] == 0:
            raise ValueError(f"concept {c!r} has no prompts labelled with it; add prompts "
                             f'with "concepts": {{"{kinds[c]}": "{c}"}} to the prompt file')
        others = [pos[o] for o in names if o != c and kinds.get(o) == kinds[c]]
        n_not = sum(counts[i] for i in others)
        if n_not == 0:
            raise ValueError(
                f"concept {c!r}: no prompt carries another concept of kind {kinds[c]!r}, so "
                f"μ_¬c is undefined; add prompts labelled with other {kinds[c]!r} concepts")
        mu_c = sums[pos[c]] / counts[pos[c]]
        mu_not = sums[others].sum(dim=0) / n_not
        mus.append(mu_c)
        scores.append(score_from_means(mu_c, mu_not))
    return torch.stack(scores).float(), torch.stack(mus).float()


def importance_from_means(
    means: Tensor, labels: Sequence[Mapping[str, str]], concepts: Sequence[str],
    kinds: Mapping[str, str],
) -> tuple[Tensor, Tensor]:
    """(scores, μ) [C, S, n] from per-prompt means [P, S, n] and each prompt's {kind: name}."""
    if means.dim() != 3 or means.shape[0] != len(labels):
        raise ValueError(f"means must be [P, S, n] with P = {len(labels)} labels, got "
                         f"{list(means.shape)}")
    names = list(kinds)
    pos = {name: i for i, name in enumerate(names)}
    sums = means.new_zeros((len(names), *means.shape[1:]), dtype=torch.float64)
    counts = [0] * len(names)
    for p, lab in enumerate(labels):
        for kind, name in lab.items():
            if kinds.get(name) != kind:
                raise ValueError(f"prompt {p} is labelled {kind}={name!r} but kinds maps "
                                 f"{name!r} to {kinds.get(name)!r}")
            sums[pos[name]] += means[p].double()
            counts[pos[name]] += 1
    return importance_from_sums(sums, counts, names, kinds, concepts)


# -- streaming the store through the SAE -----------------------------------------------------


@torch.no_grad()
def accumulate_codes(sae: TopKSAE, x: Tensor, slots: Tensor, weights: Tensor, out: Tensor
                     ) -> None:
    """out[slot] += weight · z(x_row) for every row and each of its slots (−1 = none).

    x [R, d_in]; slots [R, K] int64; weights [R]; out [num_slots, n], contiguous. Uses the
    k (value, index) pairs per row with ``index_add_``; z is never materialised densely.
    """
    values, indices = sae.encode(x.to(sae.device))
    vals = values.to(out.dtype) * weights.to(out.device, out.dtype)[:, None]
    n = out.shape[1]
    flat = out.view(-1)
    slots = slots.to(out.device)
    indices = indices.to(out.device)
    for col in range(slots.shape[1]):
        s = slots[:, col]
        keep = s >= 0
        if not bool(keep.any()):
            continue
        flat.index_add_(0, (s[keep, None] * n + indices[keep]).flatten(),
                        vals[keep].flatten())


def _stream_store(
    sae: TopKSAE, store: ActivationStore, slots_of: Callable[[IndexRecord], Sequence[int]],
    num_slots: int, batch_rows: int, progress: bool, desc: str,
) -> Tensor:
    """Sum over the store of mean-over-record z into each record's slots: [num_slots, n]."""
    device = sae.device
    out = torch.zeros(num_slots, sae.num_latents, dtype=torch.float64, device=device)
    records = store.records()
    width = max((len(slots_of(r)) for r in records), default=0)
    bar = tqdm(total=store.num_rows, unit="tok", unit_scale=True, desc=desc,
               disable=not progress, dynamic_ncols=True)
    with bar:
        for shard, group in groupby(records, key=lambda r: r.shard):
            recs = list(group)
            starts = np.array([r.row_start for r in recs])
            slot_mat = torch.full((len(recs), max(width, 1)), -1, dtype=torch.int64)
            for i, r in enumerate(recs):
                s = list(slots_of(r))
                slot_mat[i, :len(s)] = torch.tensor(s, dtype=torch.int64)
            weight = torch.tensor([1.0 / (r.row_end - r.row_start) for r in recs],
                                  dtype=torch.float64)
            array = store.shard_array(shard)
            for a in range(0, array.shape[0], batch_rows):
                b = min(a + batch_rows, array.shape[0])
                rec = torch.from_numpy(np.searchsorted(starts, np.arange(a, b), side="right") - 1)
                row_slots = slot_mat[rec]
                used = (row_slots >= 0).any(dim=1)
                if bool(used.any()):
                    x = torch.from_numpy(np.asarray(array[a:b], dtype=np.float32))[used]
                    accumulate_codes(sae, x, row_slots[used], weight[rec][used], out)
                bar.update(b - a)
    return out


def _step_positions(store: ActivationStore) -> dict[int, int]:
    return {step: i for i, step in enumerate(store.manifest.captured_steps)}


def prompt_step_means(
    sae: TopKSAE, store: ActivationStore, batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: bool = True,
) -> tuple[list[int], Tensor]:
    """(prompt ids, means [P, S, n]): each committed (prompt, captured step)'s token-mean z."""
    prompt_ids = sorted({r.prompt_id for r in store.records()})
    ppos = {p: i for i, p in enumerate(prompt_ids)}
    spos = _step_positions(store)
    s = len(spos)
    sums = _stream_store(sae, store, lambda r: [ppos[r.prompt_id] * s + spos[r.step]],
                         len(prompt_ids) * s, batch_rows, progress, "prompt means")
    return prompt_ids, sums.view(len(prompt_ids), s, -1).float()


def compute_importance(
    sae: TopKSAE, store: ActivationStore, batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: bool = True,
) -> ImportanceTables:
    """Importance tables of every labelled concept (concept_kinds order) over captured steps."""
    m = store.manifest
    if not store.complete:
        raise StoreError(
            f"store {store.directory} is incomplete ({len(store.shard_ids())} of "
            f"{m.num_shards} shards committed); rerun `steer collect` to finish it first")
    if sae.d_in != m.d_in:
        raise ValueError(f"the SAE reads d_in={sae.d_in} but store {store.directory} holds "
                         f"d_in={m.d_in} activations; pass the SAE trained on this hook point")
    prompts = {p.id: p for p in store.prompts()}
    kinds = concept_kinds(list(prompts.values()))
    if not kinds:
        raise ValueError(f"{store.directory}/prompts.jsonl has no concept labels; importance "
                         'needs prompts labelled like {"concepts": {"colour": "red"}}')
    names = list(kinds)
    cpos = {name: i for i, name in enumerate(names)}
    spos = _step_positions(store)
    s = len(spos)
    counts = [0] * len(names)
    for p in prompts.values():
        for name in p.concepts.values():
            counts[cpos[name]] += 1

    def slots_of(r: IndexRecord) -> list[int]:
        return [cpos[name] * s + spos[r.step] for name in prompts[r.prompt_id].concepts.values()]

    sums = _stream_store(sae, store, slots_of, len(names) * s, batch_rows, progress,
                         "importance")
    scores, mu = importance_from_sums(sums.view(len(names), s, -1).cpu(), counts, names, kinds)
    timesteps = torch.tensor([m.timesteps[step] for step in m.captured_steps], dtype=torch.int64)
    return ImportanceTables(concepts=names, scores=scores, means=mu, timesteps=timesteps)


# -- heat maps -------------------------------------------------------------------------------


def heatmap_png(tables: ImportanceTables, concept: str, path: str | Path, top: int = 16,
                cell: int = 14) -> None:
    """PNG of the ``top`` features (by max score over rows) × table rows, blue−white−red."""
    from PIL import Image, ImageDraw, ImageFont

    c = tables.concept_index(concept)
    scores = tables.scores[c]  # [T, n]
    top = min(top, tables.num_latents)
    feats = torch.topk(scores.max(dim=0).values, top).indices
    grid = scores[:, feats].T  # [top, T]
    scale = float(grid.abs().max()) or 1.0
    font = ImageFont.load_default()
    left, right, title_h, bottom = 44, 8, 18, 40
    t = tables.num_steps
    img = Image.new("RGB", (left + t * cell + right, title_h + top * cell + bottom), "white")
    draw = ImageDraw.Draw(img)
    for i in range(top):
        for j in range(t):
            x0, y0 = left + j * cell, title_h + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1],
                           fill=_diverging(float(grid[i, j]) / scale))
        draw.text((2, title_h + i * cell + 1), f"#{int(feats[i])}", fill="black", font=font)
    label_every = max(1, -(-24 // cell))  # keep 3-digit timestep labels from overlapping
    y_lab = title_h + top * cell + 2
    for j in range(0, t, label_every):
        draw.text((left + j * cell, y_lab), str(int(tables.timesteps[j])), fill="black",
                  font=font)
    draw.text((left, y_lab + 14), f"timestep (row); |score| max {scale:.3g}", fill="black",
              font=font)
    draw.text((2, 3), f"{concept}: top {top} features", fill="black", font=font)
    img.save(path, format="PNG")


def _diverging(v: float) -> tuple[int, int, int]:
    """−1 → blue, 0 → white, +1 → red."""
    v = max(-1.0, min(1.0, v))
    fade = round(255 * (1 - abs(v)))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


def write_heatmaps(tables: ImportanceTables, out_dir: str | Path, top: int = 16) -> list[Path]:
    """One heat-map PNG per concept in ``out_dir`` (named <concept>.png); returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in tables.concepts:
        path = out_dir / f"{_safe_name(name)}.png"
        heatmap_png(tables, name, path, top=top)
        paths.append(path)
    return paths


def _safe_name(name: str) -> str:
    """A concept name usable as a file name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "concept"
