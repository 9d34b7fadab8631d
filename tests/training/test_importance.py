"""Importance tables against the formula computed by hand, and the store stream."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from steering.importance_tables import ImportanceTables
from steering.sae import SaeConfig, TopKSAE
from training.activations.prompts import PromptRecord, write_prompts
from training.activations.store import (
    MANIFEST,
    PROMPTS,
    ActivationStore,
    ShardWriter,
    StoreError,
    StoreManifest,
)
from training.importance import (
    compute_importance,
    heatmap_png,
    importance_from_means,
    prompt_step_means,
    write_heatmaps,
)

KINDS = {"blue": "colour", "green": "colour", "red": "colour", "circle": "shape",
         "square": "shape"}
LABELS = [
    {"colour": "red", "shape": "circle"},
    {"colour": "red"},
    {"colour": "green", "shape": "square"},
    {"colour": "blue", "shape": "circle"},
    {},
    {"colour": "green"},
    {"shape": "square"},
    {"colour": "red", "shape": "square"},
]


def _hand_importance(means: list, labels: list, concept: str) -> tuple[list, list]:
    """scores[t][j], mu[t][j] for one concept with explicit loops, straight from the formula."""
    kind = KINDS[concept]
    pos = [p for p, lab in enumerate(labels) if lab.get(kind) == concept]
    neg = [p for p, lab in enumerate(labels) if kind in lab and lab[kind] != concept]
    steps, n = len(means[0]), len(means[0][0])
    scores, mus = [], []
    for t in range(steps):
        mu_c = [sum(means[p][t][j] for p in pos) / len(pos) for j in range(n)]
        mu_n = [sum(means[p][t][j] for p in neg) / len(neg) for j in range(n)]
        sc, sn = sum(mu_c), sum(mu_n)
        scores.append([mu_c[j] / sc - mu_n[j] / sn for j in range(n)])
        mus.append(mu_c)
    return scores, mus


def test_importance_from_means_equals_the_formula_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    means = torch.rand(len(LABELS), 3, 6, generator=gen, dtype=torch.float64)
    concepts = list(KINDS)
    scores, mu = importance_from_means(means, LABELS, concepts, KINDS)
    assert scores.shape == mu.shape == (5, 3, 6)
    for i, c in enumerate(concepts):
        want_s, want_mu = _hand_importance(means.tolist(), LABELS, c)
        torch.testing.assert_close(scores[i], torch.tensor(want_s, dtype=torch.float32))
        torch.testing.assert_close(mu[i], torch.tensor(want_mu, dtype=torch.float32))
    # Each concept's normalised μ rows sum to 1, so every score row sums to 0.
    torch.testing.assert_close(scores.sum(-1), torch.zeros(5, 3), atol=1e-6, rtol=0)
    # A subset keeps the same rows (μ_¬c still uses every concept of the kind).
    sub, _ = importance_from_means(means, LABELS, ["square", "blue"], KINDS)
    torch.testing.assert_close(sub, scores[[4, 0]])


def test_unusable_concepts_are_clear_errors() -> None:
    means = torch.rand(3, 2, 4)
    kinds = {"red": "colour", "green": "colour", "circle": "shape"}
    labels = [{"colour": "red", "shape": "circle"}, {"colour": "green"}, {}]
    with pytest.raises(ValueError, match=r"'circle'.*no prompt carries another concept"):
        importance_from_means(means, labels, ["circle"], kinds)
    with pytest.raises(ValueError, match="'blue' has no labelled prompts"):
        importance_from_means(means, labels, ["blue"], kinds)
    with pytest.raises(ValueError, match="'green' has no prompts labelled"):
        importance_from_means(means, [*labels[:1], {}, {}], ["green"], kinds)


# -- a hand-written store --------------------------------------------------------------------


def _write_store(directory: Path, labels: list, d_in: int = 8, tokens: int = 4,
                 captured: tuple[int, ...] = (0, 2, 4), per_shard: int = 3) -> ActivationStore:
    """A small complete store of random activations written with the store's own writer."""
    prompts = [PromptRecord(i, f"prompt {i}", dict(lab), seed=i) for i, lab in enumerate(labels)]
    directory.mkdir(parents=True)
    write_prompts(directory / PROMPTS, prompts)
    timesteps = [801, 601, 401, 201, 1]
    manifest = StoreManifest(
        format_version=1, d_in=d_in, dtype="float16", hook_point="up_blocks.1.attentions.1",
        pipeline_fingerprint="0" * 64, scheduler={"class_name": "DDIMScheduler", "config": {}},
        num_inference_steps=5, guidance_scale=7.5, height=32, width=32, tokens_per_step=tokens,
        timesteps=timesteps, captured_steps=list(captured),
        prompts_sha256=hashlib.sha256((directory / PROMPTS).read_bytes()).hexdigest(),
        num_prompts=len(prompts), prompts_per_shard=per_shard,
        num_shards=-(-len(prompts) // per_shard), command="test")
    (directory / MANIFEST).write_text(manifest.to_json())
    rng = np.random.default_rng(0)
    for shard in range(manifest.num_shards):
        writer = ShardWriter(directory, manifest, shard)
        for pid in manifest.shard_prompts(shard):
            writer.write_prompt(pid, rng.normal(size=(manifest.rows_per_prompt, d_in)))
        writer.commit()
    return ActivationStore.open(directory)


def _small_sae(d_in: int = 8, n: int = 24, k: int = 3) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(d_in=d_in, num_latents=n, k=k))
    with torch.no_grad():
        sae.encoder.bias.copy_(0.5 + 0.1 * torch.randn(n))  # most tokens fire k features
    return sae


def _dense_prompt_means(sae: TopKSAE, store: ActivationStore) -> torch.Tensor:
    """Oracle [P, S, n]: dense z of every token, averaged per (prompt, captured step)."""
    m = store.manifest
    out = torch.zeros(m.num_prompts, len(m.captured_steps), sae.num_latents)
    for r in store.records():
        x = torch.from_numpy(np.asarray(store.shard_array(r.shard)[r.row_start:r.row_end],
                                        dtype=np.float32))
        z = sae.dense_latents(*sae.encode(x))
        out[r.prompt_id, m.captured_steps.index(r.step)] = z.mean(0)
    return out


def test_store_stream_matches_the_dense_oracle(tmp_path: Path) -> None:
    store = _write_store(tmp_path / "store", LABELS)
    sae = _small_sae()
    oracle = _dense_prompt_means(sae, store)
    # batch_rows=5 cuts through (prompt, step) records and shard ends.
    ids, means = prompt_step_means(sae, store, batch_rows=5, progress=False)
    assert ids == list(range(len(LABELS)))
    torch.testing.assert_close(means, oracle, atol=1e-5, rtol=1e-5)
    tables = compute_importance(sae, store, batch_rows=5, progress=False)
    assert tables.concepts == ["blue", "green", "red", "circle", "square"]
    assert tables.timesteps.tolist() == [801, 401, 1]
    want_scores, want_mu = importance_from_means(oracle, LABELS, tables.concepts, KINDS)
    torch.testing.assert_close(tables.scores, want_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tables.means, want_mu, atol=1e-5, rtol=1e-5)


def test_incomplete_store_is_refused(tmp_path: Path) -> None:
    store = _write_store(tmp_path / "store", LABELS)
    for p in (tmp_path / "store" / "shards").glob("00001.*"):
        p.unlink()
    with pytest.raises(StoreError, match=r"incomplete \(2 of 3 shards.*steer collect"):
        compute_importance(_small_sae(), ActivationStore.open(store.directory), progress=False)


def test_heatmaps_are_pngs(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tables = ImportanceTables(["red", "a/b"], torch.randn(2, 7, 40, generator=gen),
                              torch.rand(2, 7, 40, generator=gen),
                              torch.arange(7) * 140 + 1)
    heatmap_png(tables, "red", tmp_path / "red.png", top=16)
    with Image.open(tmp_path / "red.png") as img:
        assert img.format == "PNG" and img.width > 7 * 10 and img.height > 16 * 10
    paths = write_heatmaps(tables, tmp_path / "plots", top=50)
    assert [p.name for p in paths] == ["red.png", "a_b.png"]


def test_collected_tiny_store_gives_tables_and_plots(
    tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    from training.activations.collect import collect

    rnd = random.Random(0)
    labels = [{"colour": c, "shape": s} for c in ("red", "green") for s in ("circle", "square")]
    prompts = [PromptRecord(i, f"a {lab['colour']} {lab['shape']}", lab, seed=rnd.randrange(99))
               for i, lab in enumerate(labels)]
    write_prompts(tmp_path / "prompts.jsonl", prompts)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    store = collect(pipe, tmp_path / "prompts.jsonl", tmp_path / "store", steps=3, guidance=7.5,
                    height=32, width=32, captured_steps=None, prompts_per_shard=2,
                    batch_size=2, command="test", progress=False)
    sae = TopKSAE(SaeConfig(d_in=store.manifest.d_in, num_latents=32, k=4))
    tables = compute_importance(sae, store, progress=False)
    assert tables.concepts == ["green", "red", "circle", "square"]
    assert tables.scores.shape == (4, 3, 32)
    assert tables.timesteps.tolist() == store.manifest.timesteps
    (path,) = write_heatmaps(tables, tmp_path / "plots")[:1]
    assert path.stat().st_size > 0
