"""Fit a learned concept swap (``steering.translation``) from paired runs of the pipeline.

A pair is a prompt asking for the concept c, a counterfactual prompt (c's word replaced by an
anchor, c left out, or any safe description) and one seed. The hook block's output is
recorded on the counterfactual's run; on the prompt's run each token's SAE code z is
regressed, per denoising step (table row), onto what turns its reconstruction into the
counterfactual's, Δ = SAE(x_counterfactual) − SAE(x): ridge regression with a bias, over
both CFG halves (the edit is applied to both). One or more on-policy rounds (DAgger) then
run the prompts with the fitted edit applied and add the states the edited run actually
visits, paired with the same counterfactual targets, so the map also covers tokens that are
already half swapped.

Memory does not grow with n²: the runs' codes (k values and ids per token, for the prompt
and for the counterfactual) are written per row under a work folder, and the rows are solved
one at a time by :func:`fit_row`, reduced-rank regression done in a reduced output space:
the top r' directions V' of the targets' second moment ΔᵀΔ; ridge regression of y = Δ V'ᵀ
on [z, 1] by conjugate gradients with the sparse codes as the operator (ZᵀZ is never
formed: memory O(tokens · (k + r') + m · r')); then the fitted edits' main directions
within V'. With r' = d_in this is exactly the dense ridge solve followed by the reduced rank.
SD-1.4 shapes (n 20,480, d_in 1,280, k 32, 131k tokens a row): see bench/fit_swap_memory.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from steering.hooks import from_tokens, to_tokens
from steering.pipeline import SteeredPipeline
from steering.plan import gather_latents
from steering.recording import BlockFn, generate_with
from steering.sae import TopKSAE
from steering.translation import ConceptTranslation
from training.jsonl import is_seed, read_objects


@dataclass(frozen=True)
class SwapPair:
    """One training pair: the prompt asking for the concept, its counterfactual, a seed."""

    prompt: str
    counterfactual: str
    seed: int


def pairs_from_prompts(prompts: Sequence[str], concept: str, anchor: str, seed_base: int = 0,
                       word: str | None = None, anchor_word: str | None = None
                       ) -> list[SwapPair]:
    """Pairs from prompts naming the concept: the counterfactual has the anchor's word in its
    place (whole words, case kept as written); seeds ``seed_base + i``. Prompts not naming it
    are refused, since their twin would be the same prompt."""
    find = re.compile(rf"\b{re.escape(word or concept)}\b", re.IGNORECASE)
    out, missing = [], []
    for i, prompt in enumerate(prompts):
        if not find.search(prompt):
            missing.append(prompt)
            continue
        out.append(SwapPair(prompt, find.sub(anchor_word or anchor, prompt), seed_base + i))
    if missing:
        raise ValueError(f"{len(missing)} prompt(s) do not name {word or concept!r} (e.g. "
                         f"{missing[0]!r}); every prompt must, so that its twin differs")
    return out


def load_pairs(path: str | Path) -> list[SwapPair]:
    """Pairs from a JSONL file, one ``{"prompt", "counterfactual", "seed"}`` object a line
    (blank lines skipped); errors name the line to fix."""
    out = []
    for where, item in read_objects(path, "an object with prompt, counterfactual and seed"):
        missing = [k for k in ("prompt", "counterfactual", "seed") if k not in item]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (each line needs prompt, "
                             "counterfactual and seed)")
        prompt, counterfactual, seed = item["prompt"], item["counterfactual"], item["seed"]
        if not (isinstance(prompt, str) and prompt.strip() and isinstance(counterfactual, str)
                and counterfactual.strip()):
            raise ValueError(f"{where}: prompt and counterfactual must be non-empty strings")
        if not is_seed(seed):
            raise ValueError(f"{where}: seed must be a non-negative integer, got {seed!r}")
        if prompt.strip() == counterfactual.strip():
            raise ValueError(f"{where}: the counterfactual is the prompt itself; it must "
                             "differ (the concept replaced, removed or described safely)")
        out.append(SwapPair(prompt, counterfactual, seed))
    return out


Chunk = tuple[Tensor, Tensor, Tensor]
"""One block of a row's fit tokens: values [t, k], feature ids [t, k], targets Δ [t, d_in]."""


@dataclass
class RowSolution:
    """One table row's learned swap: feature ids (the last is the bias, id n) with their
    coefficients on the row's basis of edit directions."""

    features: Tensor  # [m + 1] long
    coef: Tensor  # [m + 1, rank] float32
    basis: Tensor  # [rank, d_in] float32
    tokens: int
    iterations: int  # conjugate-gradient iterations the solve took
    state_bytes: int = 0  # bytes of the tensors the fit held at its largest (not the chunks)


def _conjugate_gradients(apply: Callable[[Tensor], Tensor], b: Tensor, inverse_diag: Tensor,
                         tol: float, max_iter: int) -> tuple[Tensor, int]:
    """Solve A X = B for every column of B at once (A symmetric positive definite, given as
    ``apply``) with Jacobi-preconditioned conjugate gradients; returns X and the iterations."""
    x = torch.zeros_like(b)
    r = b.clone()
    goal = tol * b.norm(dim=0)
    z = inverse_diag.unsqueeze(1) * r
    p = z.clone()
    rz = (r * z).sum(0)
    it = 0
    while it < max_iter and bool((r.norm(dim=0) > goal).any()):
        ap = apply(p)
        curv = (p * ap).sum(0)
        alpha = torch.where(curv > 0, rz / curv.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
        x.addcmul_(alpha.unsqueeze(0), p)
        r.addcmul_(alpha.unsqueeze(0), ap, value=-1.0)
        z = inverse_diag.unsqueeze(1) * r
        rz_next = (r * z).sum(0)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
        p = z + beta.unsqueeze(0) * p
        rz = rz_next
        it += 1
    return x, it


@torch.no_grad()
def fit_row(chunks: Callable[[], Iterable[Chunk]], n: int, d: int, ridge: float = 1e-2,
            min_count: int = 4, rank: int = 16, work_rank: int | None = None,
            device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            tol: float | None = None, max_iter: int = 5000) -> RowSolution | None:
    """Reduced-rank ridge regression of one row's targets on [z, 1], never forming the
    (n + 1)² normal equations; the entry point for codes and targets from anywhere.

    ``chunks()`` is called twice (two passes over the row's tokens). Pass 1 counts features
    and accumulates ΔᵀΔ, whose top ``work_rank`` (default 4·rank, at most d) eigenvectors V'
    span the targets; pass 2 keeps each token's code (features seen in ≥ ``min_count``
    tokens, plus the bias) and y = Δ V'ᵀ. Conjugate gradients on (ZᵀZ + λI) C = Zᵀy with Z as
    the operator (``ridge`` relative to the mean diagonal, as the dense solve), then the
    ``rank`` main directions of the fitted edits Z C within V'. None when no feature is kept.
    ``dtype`` float32 (default) runs the sparse products several times faster than float64 on
    CPU and agrees with the dense float64 solve to ≈ 1e-4 on the tests' problems.
    """
    rank = min(rank, d)
    width = min(d, max(work_rank if work_rank is not None else 4 * rank, rank))
    if tol is None:
        tol = 1e-9 if dtype == torch.float64 else 1e-6
    count = torch.zeros(n, dtype=torch.int64, device=device)
    moment = torch.zeros(d, d, dtype=dtype, device=device)
    for _, indices, target in chunks():
        count += torch.bincount(indices.to(device).reshape(-1).long(), minlength=n)[:n]
        t = target.to(device, dtype)
        moment.addmm_(t.T, t)
    act = (count >= min_count).nonzero().squeeze(1)
    m = len(act)
    if m == 0:
        return None
    _, vectors = torch.linalg.eigh(moment)
    del moment
    project = vectors[:, -width:]  # [d, width], V'ᵀ
    column = torch.full((n,), -1, dtype=torch.int64, device=device)
    column[act] = torch.arange(m, device=device)
    cols, vals, ys = [], [], []
    for values, indices, target in chunks():
        c = column[indices.to(device).long()]
        v = values.to(device, dtype) * (c >= 0)
        ones = torch.ones(len(c), 1, dtype=dtype, device=device)
        cols.append(torch.cat([c.clamp_min(0), torch.full_like(c[:, :1], m)], 1))
        vals.append(torch.cat([v, ones], 1))
        ys.append(target.to(device, dtype) @ project)
    col, val, y = torch.cat(cols), torch.cat(vals), torch.cat(ys)
    del cols, vals, ys
    tokens = len(col)
    # Zᵀ as bags of tokens per column (for Zᵀ W), Z as bags of columns per token (for Z U)
    flat = col.reshape(-1)
    order = flat.argsort(stable=True)
    token_of = order // col.shape[1]
    weight_t = val.reshape(-1)[order]
    offsets = torch.zeros(m + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.bincount(flat, minlength=m + 1).cumsum(0)[:-1]
    del flat, order

    def z_times(u: Tensor) -> Tensor:
        return F.embedding_bag(col, u, per_sample_weights=val, mode="sum")

    def zt_times(w: Tensor) -> Tensor:
        return F.embedding_bag(token_of, w, offsets, per_sample_weights=weight_t, mode="sum")

    diag = torch.zeros(m + 1, dtype=dtype, device=device).index_add_(
        0, col.reshape(-1), val.reshape(-1) ** 2)
    lam = ridge * diag.mean()
    b = zt_times(y)
    del y
    coef, iterations = _conjugate_gradients(lambda u: zt_times(z_times(u)) + lam * u, b,
                                            1.0 / (diag + lam), tol, max_iter)
    fitted = z_times(coef)
    held = (count, column, col, val, token_of, weight_t, offsets, diag, b, coef, fitted)
    state_bytes = (sum(t.numel() * t.element_size() for t in held)
                   + 5 * coef.numel() * coef.element_size() + 2 * d * d * dtype.itemsize)
    _, mix = torch.linalg.eigh(fitted.T @ fitted)
    mix = mix[:, -rank:]  # [width, rank]: the fitted edits' main directions within V'
    features = torch.cat([act, torch.tensor([n], device=device)])
    return RowSolution(features.cpu(), (coef @ mix).float().cpu(),
                       (project @ mix).T.float().cpu(), tokens, iterations, state_bytes)


class SwapRegression:
    """The paired runs' codes recorded per table row under a work folder (off the GPU: k
    values and ids per token, for the prompt's run and the counterfactual's), solved row by
    row with :func:`fit_row`, so that the fit holds one row's tokens at a time."""

    def __init__(self, sae: TopKSAE, num_rows: int, work_dir: str | Path | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 work_rank: int | None = None, chunk_tokens: int = 8192) -> None:
        self.sae, self.num_rows, self.work_rank = sae, num_rows, work_rank
        self.device = torch.device(device) if device is not None else sae.device
        self.dtype, self.chunk_tokens = dtype, chunk_tokens
        self._tmp = tempfile.TemporaryDirectory(prefix="fit-swap-") if work_dir is None else None
        self.root = Path(self._tmp.name if self._tmp is not None else work_dir)  # type: ignore[arg-type]
        self._added = 0

    def _row_dir(self, row: int, part: str) -> Path:
        path = self.root / "rows" / f"r{row:04d}" / part
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        values, indices = self.sae.encode(to_tokens(x).to(self.sae.dtype))
        return values.cpu(), indices.to(torch.int32).cpu()

    @torch.no_grad()
    def record_counterfactual(self, row: int, key: str, x: Tensor) -> None:
        """Keep the codes of a counterfactual run's block output x ([N, C, H, W]) at ``row``."""
        values, indices = self._encode(x)
        torch.save({"values": values, "indices": indices}, self._row_dir(row, "cf") / f"{key}.pt")

    @torch.no_grad()
    def add_run(self, row: int, key: str, tag: str, x: Tensor) -> None:
        """Add the tokens of block output x at ``row``, paired with counterfactual ``key``;
        ``tag`` names the round (rerunning a round overwrites its tokens)."""
        if not (self._row_dir(row, "cf") / f"{key}.pt").is_file():
            raise ValueError(f"no counterfactual {key!r} recorded at row {row}")
        values, indices = self._encode(x)
        torch.save({"values": values, "indices": indices},
                   self._row_dir(row, "x") / f"{key}@{tag}.pt")

    @torch.no_grad()
    def add(self, row: int, x: Tensor, x_swapped: Tensor) -> None:
        """Add every token of the block outputs x / x_swapped ([N, C, H, W]) at ``row``."""
        key = f"a{self._added:06d}"
        self._added += 1
        self.record_counterfactual(row, key, x_swapped)
        self.add_run(row, key, "j0", x)

    def _files(self, row: int, tags: Sequence[str] | None) -> list[tuple[Path, Path]]:
        folder = self.root / "rows" / f"r{row:04d}"
        out = []
        for path in sorted((folder / "x").glob("*.pt")):
            key, tag = path.stem.rsplit("@", 1)
            if tags is None or tag in tags:
                out.append((path, folder / "cf" / f"{key}.pt"))
        return out

    def chunks(self, row: int, tags: Sequence[str] | None = None
               ) -> Callable[[], Iterator[Chunk]]:
        """The row's tokens (of rounds ``tags``, default all) as :func:`fit_row` reads them:
        the prompt run's codes and targets SAE(x_counterfactual) − SAE(x), decoded block by
        block on the SAE's device."""
        files, sae, step = self._files(row, tags), self.sae, self.chunk_tokens

        def read() -> Iterator[Chunk]:
            for x_path, cf_path in files:
                x, cf = (torch.load(p, weights_only=True) for p in (x_path, cf_path))
                if x["values"].shape[0] != cf["values"].shape[0]:
                    raise ValueError(f"{x_path} and {cf_path} hold different token counts: "
                                     "the prompt and counterfactual runs must match")
                for s in range(0, x["values"].shape[0], step):
                    v, i = (x[k][s:s + step].to(sae.device) for k in ("values", "indices"))
                    cv, ci = (cf[k][s:s + step].to(sae.device) for k in ("values", "indices"))
                    target = sae.decode(cv, ci.long()) - sae.decode(v, i.long())
                    yield v, i, target

        return read

    def counts(self, row: int) -> Tensor:
        """How many recorded tokens of ``row`` have each feature active ([n])."""
        count = torch.zeros(self.sae.num_latents, dtype=torch.int64)
        for path, _ in self._files(row, None):
            ids = torch.load(path, weights_only=True)["indices"].reshape(-1).long()
            count += torch.bincount(ids, minlength=self.sae.num_latents)
        return count

    def solve(self, anchor: str, ridge: float = 1e-2, min_count: int = 4, rank: int = 16,
              tags: Sequence[str] | None = None, cache: str | None = None
              ) -> ConceptTranslation:
        """Ridge solution per row over the features active in ≥ ``min_count`` tokens (rarer
        ones are poorly determined and left out of the file), ``ridge`` relative to the mean
        diagonal of the normal equations, reduced to the ``rank`` directions that carry most
        of the fitted edits' energy (reduced-rank regression); one row in memory at a time.
        With ``cache``, each row's solution is kept under the work folder and reused."""
        n, d = self.sae.num_latents, self.sae.d_in
        rank = min(rank, d)
        rows, feats, coefs = [], [], []
        basis = torch.zeros(self.num_rows, rank, d)
        for r in range(self.num_rows):
            saved = None if cache is None else self.root / "solved" / cache / f"r{r:04d}.pt"
            if saved is not None and saved.is_file():
                got = torch.load(saved, weights_only=True)
                sol = None if not got else RowSolution(**got)
            else:
                sol = fit_row(self.chunks(r, tags), n, d, ridge, min_count, rank,
                              self.work_rank, self.device, self.dtype)
                if saved is not None:
                    saved.parent.mkdir(parents=True, exist_ok=True)
                    torch.save({} if sol is None else dataclasses.asdict(sol), saved)
            if sol is None:
                continue
            rows.append(torch.full((len(sol.features),), r, dtype=torch.int64))
            feats.append(sol.features)
            coefs.append(sol.coef)
            basis[r] = sol.basis
        if not rows:
            raise ValueError("no tokens were added; nothing to fit")
        return ConceptTranslation(anchor, torch.cat(rows), torch.cat(feats), torch.cat(coefs),
                                  basis)


def apply_translation(translation: ConceptTranslation, sae: TopKSAE, gamma: float = 1.0
                      ) -> BlockFn:
    """The swap as a block-output function (every image, both CFG halves): for fitting and
    checks; the service applies it through ``SteeringPlan`` with the detection gate."""
    n = sae.num_latents
    rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def fn(step: int, timestep: int, row: int | None, x: Tensor) -> Tensor:
        assert row is not None  # generate_with gives rows when a bundle is loaded
        if row not in rows:
            rows[row] = translation.at(row, n)
        feats, deltas, bias = rows[row]
        values, indices = sae.encode(to_tokens(x).to(sae.dtype))
        z = gather_latents(values, indices, feats.to(indices.device))
        d = gamma * (z @ deltas.to(z) + bias.to(z))
        return x + from_tokens(d, x).to(x.dtype)

    return fn


def fit_translation(steered: SteeredPipeline, anchor: str, pairs: Sequence[SwapPair],
                    steps: int = 20, guidance: float = 4.0, batch_size: int = 64,
                    rounds: int = 1, ridge: float = 1e-2, min_count: int = 4, rank: int = 16,
                    progress: Callable[[int], None] | None = None,
                    work_dir: str | Path | None = None, device: str | torch.device | None = None,
                    dtype: torch.dtype = torch.float32, work_rank: int | None = None
                    ) -> ConceptTranslation:
    """Fit the swap labelled ``anchor`` on ``pairs``: the paired runs, then ``rounds``
    on-policy rounds. Generates (2 + rounds) images per pair; ``progress(images)`` after each
    call. Codes are recorded under ``work_dir`` (a temporary folder if None); with a kept
    folder a rerun skips the runs and rows already done. The rows are solved on ``device``
    (default: the SAE's) in ``dtype``."""
    if steered.bundle is None:
        raise ValueError("fitting a learned swap needs a pipeline loaded with its bundle")
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="fit-swap-") as tmp:
            return fit_translation(steered, anchor, pairs, steps, guidance, batch_size, rounds,
                                   ridge, min_count, rank, progress, tmp, device, dtype,
                                   work_rank)
    sae = steered.sae
    root = Path(work_dir)
    settings = {"pairs": [dataclasses.asdict(p) for p in pairs], "steps": steps,
                "guidance": guidance, "batch_size": batch_size, "n_latents": sae.num_latents,
                "d_in": sae.d_in, "ridge": ridge, "min_count": min_count, "rank": rank,
                "work_rank": work_rank}
    _check_settings(root, settings)
    fit = SwapRegression(sae, steered.bundle.tables.num_steps, root, device, dtype, work_rank)
    batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]

    def run(j: int, b: int, batch: Sequence[SwapPair], edit: BlockFn | None) -> None:
        done = root / "done" / f"j{j}-b{b}"
        if done.is_file():
            return
        seeds = [p.seed for p in batch]
        if j == 0:
            cf_visits: dict[int, int] = {}

            def record(step: int, t: int, r: int | None, x: Tensor) -> None:
                assert r is not None  # checked above: the bundle is loaded
                cf_visits[r] = cf_visits.get(r, 0) + 1
                fit.record_counterfactual(r, f"b{b:05d}-v{cf_visits[r] - 1}", x)

            generate_with(steered, [p.counterfactual for p in batch], seeds, steps, guidance,
                          record)
        visits: dict[int, int] = {}

        def add(step: int, t: int, r: int | None, x: Tensor) -> Tensor | None:
            assert r is not None
            visits[r] = visits.get(r, 0) + 1
            fit.add_run(r, f"b{b:05d}-v{visits[r] - 1}", f"j{j}", x)
            return None if edit is None else edit(step, t, r, x)

        generate_with(steered, [p.prompt for p in batch], seeds, steps, guidance, add)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()

    for b, batch in enumerate(batches):
        run(0, b, batch, None)
        if progress is not None:
            progress(2 * len(batch))
    translation = fit.solve(anchor, ridge, min_count, rank, ["j0"], cache="j0")
    for j in range(1, rounds + 1):
        edit = apply_translation(translation, sae)
        for b, batch in enumerate(batches):
            run(j, b, batch, edit)
            if progress is not None:
                progress(len(batch))
        translation = fit.solve(anchor, ridge, min_count, rank,
                                [f"j{i}" for i in range(j + 1)], cache=f"j{j}")
    return translation


def _check_settings(root: Path, settings: dict[str, Any]) -> None:
    """Refuse a work folder left by a fit with other pairs or settings (its runs would mix)."""
    path = root / "settings.json"
    root.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            raise ValueError(f"the work folder {root} holds a fit with other {', '.join(differ)};"
                             " use another work folder (or delete it to start over)")
    else:
        path.write_text(json.dumps(settings))
