"""Fit a learned concept swap (``steering.translation``) from paired runs of the pipeline.

For pairs (prompt with c, the same prompt with the anchor a instead, one seed), the hook
block's output is recorded on the swapped run; on the original run each token's SAE code z is
regressed, per denoising step, onto what turns its reconstruction into the swapped one,
SAE(x_swapped) − SAE(x): ridge regression with a bias, over both CFG halves (the edit is
applied to both). One or more on-policy rounds (DAgger) then run the original prompts with the
fitted edit applied and add the states the edited run actually visits, paired with the same
swapped targets, so the map also covers tokens that are already half swapped.

Memory: the normal equations are dense, (n + 1)² per step in float64 (n = 2048: 34 MB a
step); SD-scale SAEs need a sparser solver.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import Tensor

from steering.hooks import (
    StepTracker,
    attached,
    from_tokens,
    output_tensor,
    replace_output,
    to_tokens,
)
from steering.pipeline import SteeredPipeline
from steering.plan import gather_latents
from steering.sae import TopKSAE
from steering.translation import ConceptTranslation


@dataclass(frozen=True)
class SwapPair:
    """One training pair: the prompt asking for the concept, the same with the anchor, a seed."""

    prompt: str
    swapped: str
    seed: int


def pairs_from_prompts(prompts: Sequence[str], concept: str, anchor: str, seed_base: int = 0,
                       word: str | None = None, anchor_word: str | None = None
                       ) -> list[SwapPair]:
    """Pairs from prompts naming the concept: the twin has the anchor's word in its place
    (whole words, case kept as written); seeds ``seed_base + i``. Prompts not naming it are
    refused, since their twin would be the same prompt."""
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


class _BlockCall(ModelHook):
    """Calls ``fn(row, x)`` on the hooked block's output; a returned tensor replaces it."""

    def __init__(self, tracker: StepTracker, row_of: Callable[[int], int],
                 fn: Callable[[int, Tensor], Tensor | None]) -> None:
        super().__init__()
        self.tracker, self.row_of, self.fn = tracker, row_of, fn

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        y = self.fn(self.row_of(self.tracker.timestep), output_tensor(output))
        return output if y is None else replace_output(output, y)


class SwapRegression:
    """Normal equations per table row of Δ = [z, 1]·B, accumulated token by token."""

    def __init__(self, sae: TopKSAE, num_rows: int) -> None:
        self.sae = sae
        n, d = sae.num_latents, sae.d_in
        self.gram = torch.zeros(num_rows, n + 1, n + 1, dtype=torch.float64)
        self.cross = torch.zeros(num_rows, n + 1, d, dtype=torch.float64)
        self.count = torch.zeros(num_rows, n + 1, dtype=torch.int64)

    @torch.no_grad()
    def add(self, row: int, x: Tensor, x_swapped: Tensor) -> None:
        """Add every token of the block outputs x / x_swapped ([N, C, H, W]) at ``row``."""
        sae, n = self.sae, self.sae.num_latents
        tokens = to_tokens(x).to(sae.dtype)
        values, indices = sae.encode(tokens)
        target = (sae(to_tokens(x_swapped).to(sae.dtype)) - sae(tokens)).double().cpu()
        ones = torch.ones(len(values), 1, dtype=values.dtype, device=values.device)
        v = torch.cat([values, ones], 1).double().cpu()
        idx = torch.cat([indices, torch.full_like(indices[:, :1], n)], 1).cpu()
        pair = (idx.unsqueeze(2) * (n + 1) + idx.unsqueeze(1)).reshape(-1)
        self.gram[row].view(-1).index_add_(0, pair, (v.unsqueeze(2) * v.unsqueeze(1)).reshape(-1))
        flat = idx.reshape(-1)
        self.cross[row].index_add_(0, flat, (v.unsqueeze(2) * target.unsqueeze(1)).reshape(
            -1, target.shape[1]))
        self.count[row].index_add_(0, flat, torch.ones_like(flat))

    def solve(self, anchor: str, ridge: float = 1e-2, min_count: int = 4, rank: int = 16
              ) -> ConceptTranslation:
        """Ridge solution per row over the features active in ≥ ``min_count`` tokens (rarer
        ones are poorly determined and left out of the file), ``ridge`` relative to the mean
        diagonal of the normal equations; then reduced to the ``rank`` directions that carry
        most of the fitted edits' energy (reduced-rank regression)."""
        n, d = self.sae.num_latents, self.sae.d_in
        rank = min(rank, d)
        rows, feats, coefs = [], [], []
        basis = torch.zeros(self.gram.shape[0], rank, d)
        for r in range(self.gram.shape[0]):
            keep = self.count[r] >= min_count
            if not bool(keep[:n].any()):
                continue
            keep[n] = True  # the bias
            act = keep.nonzero().squeeze(1)
            g = self.gram[r][act][:, act]
            g = g + ridge * g.diagonal().mean() * torch.eye(len(act), dtype=g.dtype)
            b = torch.linalg.solve(g, self.cross[r][act])
            # directions of the fitted edits Zb: top eigenvectors of bᵀ (ZᵀZ) b
            _, vectors = torch.linalg.eigh(b.T @ self.gram[r][act][:, act] @ b)
            v = vectors[:, -rank:].T  # [rank, d]
            rows.append(torch.full((len(act),), r, dtype=torch.int64))
            feats.append(act)
            coefs.append((b @ v.T).float())
            basis[r] = v.float()
        if not rows:
            raise ValueError("no tokens were added; nothing to fit")
        return ConceptTranslation(anchor, torch.cat(rows), torch.cat(feats), torch.cat(coefs),
                                  basis)


def generate_with(steered: SteeredPipeline, prompts: Sequence[str], seeds: Sequence[int],
                  steps: int, guidance: float, fn: Callable[[int, Tensor], Tensor | None]
                  ) -> list:
    """One batched pipeline call with ``fn(row, x)`` on the hook block's output at every step
    (a returned tensor replaces the output); returns the images."""
    tables = steered.bundle.tables if steered.bundle is not None else None
    if tables is None:
        raise ValueError("fitting a learned swap needs a pipeline loaded with its bundle")
    tracker = StepTracker()
    hook = _BlockCall(tracker, tables.row_for_timestep, fn)
    pipe, size = steered.pipe, steered.default_size()
    generators = [torch.Generator(pipe.device).manual_seed(int(s)) for s in seeds]
    with torch.no_grad(), attached([(pipe.unet, "fit_tracker", tracker),
                                    (steered.block, "fit_swap", hook)]):
        return pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance,
                    generator=generators, height=size, width=size).images


def apply_translation(translation: ConceptTranslation, sae: TopKSAE, gamma: float = 1.0
                      ) -> Callable[[int, Tensor], Tensor]:
    """The swap as a block-output function (every image, both CFG halves): for fitting and
    checks; the service applies it through ``SteeringPlan`` with the detection gate."""
    n = sae.num_latents
    rows: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def fn(row: int, x: Tensor) -> Tensor:
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
                    progress: Callable[[int], None] | None = None) -> ConceptTranslation:
    """Fit the swap towards ``anchor`` on ``pairs``: the paired runs, then ``rounds`` on-policy
    rounds. Generates (2 + rounds) images per pair; ``progress(images)`` after each call."""
    if steered.bundle is None:
        raise ValueError("fitting a learned swap needs a pipeline loaded with its bundle")
    sae = steered.sae
    fit = SwapRegression(sae, steered.bundle.tables.num_steps)
    batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    swapped_runs: list[dict[int, Tensor]] = []
    for batch in batches:
        seeds = [p.seed for p in batch]
        recorded: dict[int, Tensor] = {}

        def record(r: int, x: Tensor, rec: dict[int, Tensor] = recorded) -> None:
            rec[r] = x.clone()

        generate_with(steered, [p.swapped for p in batch], seeds, steps, guidance, record)
        swapped_runs.append(recorded)
        generate_with(steered, [p.prompt for p in batch], seeds, steps, guidance,
                  lambda r, x, rec=recorded: fit.add(r, x, rec[r]))
        if progress is not None:
            progress(2 * len(batch))
    translation = fit.solve(anchor, ridge, min_count, rank)
    for _ in range(rounds):
        for batch, recorded in zip(batches, swapped_runs, strict=True):
            edit = apply_translation(translation, sae)

            def on_policy(r: int, x: Tensor, rec=recorded, edit=edit) -> Tensor:
                fit.add(r, x, rec[r])
                return edit(r, x)

            generate_with(steered, [p.prompt for p in batch], [p.seed for p in batch], steps,
                      guidance, on_policy)
            if progress is not None:
                progress(len(batch))
        translation = fit.solve(anchor, ridge, min_count, rank)
    return translation
