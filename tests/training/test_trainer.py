"""SAE trainer: maths against dense oracles, resume bit-exactness, learning, logs, presets."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from steering.sae import SaeConfig, TopKSAE
from training.activations.loader import TensorSource
from training.trainer import PRESETS, TrainConfig, evaluate_sae, get_preset, train_sae
from training.trainer.checkpoint import checkpoint_path
from training.trainer.distributed import DistEnv
from training.trainer.encode import topk_encode
from training.trainer.geometric_median import geometric_median
from training.trainer.loop import new_sae
from training.trainer.presets import describe, memory_estimate, time_estimate
from training.trainer.step import TrainStep, sae_losses

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

CPU = DistEnv(rank=0, world_size=1, device=torch.device("cpu"))


def planted(n_rows: int = 12_000, d: int = 16, atoms: int = 32, active: int = 3,
            seed: int = 0) -> torch.Tensor:
    """Rows that are sparse non-negative combinations of a few unit directions, plus an offset."""
    gen = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(atoms, d, generator=gen), dim=1)
    idx = torch.stack([torch.randperm(atoms, generator=gen)[:active] for _ in range(n_rows)])
    coef = torch.rand(n_rows, active, generator=gen) * 2 + 0.5
    offset = torch.randn(d, generator=gen)
    return (coef[:, :, None] * dirs[idx]).sum(1) + offset + 0.01 * torch.randn(
        n_rows, d, generator=gen)


def tiny_cfg(**kw: object) -> TrainConfig:
    base = dict(d_in=16, num_latents=64, k=4, total_steps=8, batch_size=128, lr=2e-3,
                warmup_steps=2, checkpoint_every=4, log_every=2, buffer_blocks=4,
                chunk_rows=256, geometric_median_rows=256, dead_tokens=2_000)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


# -- maths --------------------------------------------------------------------------------------


def test_geometric_median_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    pts = torch.cat([torch.randn(40, 2, generator=gen), torch.randn(8, 2, generator=gen) * 8 + 5])
    gm = geometric_median(pts, max_iter=500, tol=1e-9)

    def cost(m: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(pts.double()[None] - m[:, None], dim=-1).sum(-1)

    axis = torch.linspace(-3, 3, 601, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    best = grid[cost(grid).argmin()]
    assert torch.allclose(gm.double(), best, atol=0.02)
    assert cost(gm.double()[None]) <= cost(best[None]) + 1e-6
    # In one dimension the geometric median is the median.
    line = torch.tensor([[0.0], [1.0], [2.0], [10.0], [50.0]])
    assert geometric_median(line, max_iter=1000, tol=1e-10).item() == pytest.approx(2.0, abs=1e-3)


def _dense_reference(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor | None,
                     k_aux: int) -> torch.Tensor:
    """sparsify's loss written densely with plain autograd (the oracle)."""
    den = (x - x.mean(0)).pow(2).sum()
    pre = sae.pre_acts(x)
    values, indices = F.relu(pre).topk(sae.k, sorted=False)
    e = x - sae.decode(values, indices)
    loss = e.pow(2).sum() / den
    if dead is not None:
        mask = torch.zeros(sae.num_latents, dtype=torch.bool)
        mask[dead] = True
        k_eff = min(k_aux, dead.numel())
        aux_v, aux_i = torch.where(mask[None], pre, -torch.inf).topk(k_eff, sorted=False)
        e_hat = F.embedding_bag(aux_i, sae.W_dec, per_sample_weights=aux_v, mode="sum")
        scale = min(dead.numel() / k_aux, 1.0)
        loss = loss + (1 / 32) * scale * (e_hat - e.detach()).pow(2).sum() / den
    return loss


@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_encode_gradients_match_dense_autograd(with_dead: bool) -> None:
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(d_in=16, num_latents=64, k=4))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_(std=0.1)
    x = torch.randn(96, 16) + 0.5
    dead = torch.tensor([3, 10, 11, 40, 63]) if with_dead else None
    k_aux = 8

    ref = _dense_reference(sae, x, dead, k_aux)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad(set_to_none=True)

    den = (x - x.mean(0)).pow(2).sum()
    pre = torch.empty(96, 64)
    fvu, auxk, enc = sae_losses(sae, x, den, pre, dead, k_aux)
    (fvu + auxk / 32).backward()
    assert (fvu + auxk / 32).item() == pytest.approx(ref.item(), rel=1e-5)
    assert bool((enc.aux_indices.numel() > 0) == with_dead)
    for name, p in sae.named_parameters():
        assert torch.allclose(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6), name
    # Same latents and values as TopKSAE.encode (order aside).
    v, i = sae.encode(x)
    assert torch.equal(i.sort(dim=1).values, enc.indices.sort(dim=1).values)
    assert torch.allclose(v.sort(dim=1).values, enc.values.sort(dim=1).values, atol=1e-6)


def test_bf16_scratch_runs_the_gemm_in_bf16_and_keeps_float32_gradients() -> None:
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(d_in=16, num_latents=64, k=4))
    x = torch.randn(32, 16)
    den = (x - x.mean(0)).pow(2).sum()
    ref_fvu, _, ref = sae_losses(sae, x, den, torch.empty(32, 64), None, 8)
    fvu, _, enc = sae_losses(sae, x, den, torch.empty(32, 64, dtype=torch.bfloat16), None, 8)
    fvu.backward()
    assert enc.values.dtype == torch.float32 and sae.encoder.weight.grad.dtype == torch.float32
    assert fvu.item() == pytest.approx(ref_fvu.item(), rel=0.05)
    same = (enc.indices.sort(1).values == ref.indices.sort(1).values).float().mean()
    assert same > 0.9


def test_decoder_gradient_orthogonal_and_rows_unit_norm_after_steps() -> None:
    cfg = tiny_cfg()
    trainer = TrainStep(cfg, new_sae(cfg, "cpu"), CPU)
    data = planted(n_rows=cfg.batch_size * 5)
    for x in data.split(cfg.batch_size):
        trainer.forward_backward(x)
        sae = trainer.sae
        sae.remove_gradient_parallel_to_decoder_directions()
        along = (sae.W_dec.grad * sae.W_dec.data).sum(dim=1)
        assert along.abs().max() < 1e-6 * (1 + sae.W_dec.grad.abs().max())
        trainer.optimizer.step()
        trainer.scheduler.step()
        sae.set_decoder_norm_to_unit_norm()
        norms = torch.linalg.vector_norm(sae.W_dec, dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_auxk_only_with_dead_latents() -> None:
    cfg = tiny_cfg(dead_tokens=1_000, aux_k=64)  # k_aux >= #dead: every dead latent is used
    trainer = TrainStep(cfg, new_sae(cfg, "cpu"), CPU)
    x = planted(n_rows=cfg.batch_size)
    stats = trainer.forward_backward(x)
    assert stats.num_dead == 0 and stats.auxk.item() == 0.0
    # Latents the batch never fires get no encoder gradient without AuxK ...
    fired = torch.zeros(cfg.num_latents, dtype=torch.bool)
    enc = topk_encode(x, trainer.sae.b_dec, trainer.sae.encoder.weight, trainer.sae.encoder.bias,
                      cfg.k, torch.empty(cfg.batch_size, cfg.num_latents))
    fired[enc.indices[enc.values > 0]] = True
    silent = torch.nonzero(~fired).squeeze(1)
    assert silent.numel() > 0
    assert trainer.sae.encoder.weight.grad[silent].abs().sum() == 0
    # ... and get one once they have been silent for more than dead_tokens tokens.
    trainer.tokens_since_fired.zero_()
    trainer.tokens_since_fired[silent] = cfg.dead_tokens + 1
    stats = trainer.forward_backward(x)
    assert stats.num_dead == silent.numel() and stats.auxk.item() > 0
    assert trainer.sae.encoder.weight.grad[silent].abs().sum(dim=1).gt(0).all()
    # The counters: fired latents reset, the others grow by the global batch.
    assert trainer.tokens_since_fired[fired].eq(0).all()
    assert trainer.tokens_since_fired[silent].eq(cfg.dead_tokens + 1 + cfg.batch_size).all()


# -- the loop -----------------------------------------------------------------------------------


def test_fvu_drops_on_planted_sparse_structure(tmp_path: Path) -> None:
    data = planted(atoms=24, active=2)
    cfg = tiny_cfg(num_latents=64, k=4, total_steps=300, batch_size=256, lr=1e-2,
                   warmup_steps=10, checkpoint_every=300, log_every=50)
    sae = train_sae(cfg, TensorSource(data[:10_000], 256), tmp_path, progress=False)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["fvu"] > 3 * lines[-1]["fvu"]
    held = evaluate_sae(sae, TensorSource(data[10_000:], 500), max_rows=2_000)
    assert held["fvu"] < 0.1, held
    assert 0 < held["l0"] <= cfg.k and held["rows"] == 2_000
    assert TopKSAE.from_pretrained(tmp_path / "sae").num_latents == cfg.num_latents


def _state(sae: TopKSAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def test_resume_is_bit_exact_and_logs_are_written(tmp_path: Path) -> None:
    data = planted(n_rows=4_000)
    cfg = tiny_cfg(num_latents=512, k=2, total_steps=12, checkpoint_every=6, log_every=3,
                   dead_tokens=300)
    source = TensorSource(data, 256)
    whole = _state(train_sae(cfg, source, tmp_path / "whole", progress=False))

    part = tmp_path / "part"
    train_sae(cfg, source, part, stop_after=6, progress=False)
    assert torch.load(checkpoint_path(part), weights_only=False)["step"] == 6
    assert not (part / "sae").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train_sae(cfg, source, part, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_sae(replace(cfg, lr=1e-2), source, part, resume=True, progress=False)
    resumed = _state(train_sae(cfg, source, part, resume=True, progress=False))
    for key, value in whole.items():
        assert torch.equal(value, resumed[key]), key
    # AuxK was active, so the dead counters and aux path were part of what resumed exactly.
    log = [json.loads(s) for s in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6, 9, 12]
    assert {"fvu", "l0", "dead_pct", "lr", "tokens_per_s", "auxk"} <= set(log[0])
    assert any(r["dead_pct"] > 0 for r in log) and any(r["auxk"] > 0 for r in log)
    assert list((part / "tb").glob("events.out.tfevents.*"))
    assert TopKSAE.from_pretrained(part / "sae").k == cfg.k


# -- presets ------------------------------------------------------------------------------------


def test_presets_and_overrides() -> None:
    assert {"smoke", "toy", "sd14-a100", "sd14-h100"} <= set(PRESETS)
    toy = get_preset("toy").config()
    assert (toy.d_in, toy.num_latents, toy.k, toy.batch_size) == (64, 2048, 8, 4096)
    sd = get_preset("sd14-h100").config(total_steps=10)
    assert (sd.d_in, sd.num_latents, sd.k, sd.bf16, sd.total_steps) == (1280, 20480, 32, True, 10)
    assert get_preset("toy").config(d_in=32, num_latents=100, lr=None).num_latents == 100
    with pytest.raises(ValueError, match="smoke"):
        get_preset("huge")
    mem = memory_estimate(get_preset("sd14-h100").config())
    params = 2 * 20480 * 1280 + 20480 + 1280
    assert mem["params"] == 4 * params and mem["adam"] == 8 * params
    gpu = time_estimate(get_preset("sd14-h100"), get_preset("sd14-h100").config())
    assert "estimate" in gpu.how and math.isfinite(gpu.total) and gpu.total > 0
    text = describe(get_preset("smoke"), get_preset("smoke").config(d_in=16))
    assert "expected memory" in text and "measured" in text


# -- steer train --------------------------------------------------------------------------------


def _train_app() -> typer.Typer:
    from training.trainer.cli import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None: ...

    return app


def test_cli_trains_from_stores_resumes_and_evaluates(tmp_path: Path) -> None:
    from tests.training.test_loader import write_store

    write_store(tmp_path / "train", num_prompts=40)
    write_store(tmp_path / "held", num_prompts=6, first_row=5)
    app, run = _train_app(), tmp_path / "run"
    args = ["train", "--store", str(tmp_path / "train"), "--out", str(run), "--preset", "smoke",
            "--steps", "6", "--batch-size", "64", "--checkpoint-every", "3"]
    first = CliRunner().invoke(app, [*args, "--eval-store", str(tmp_path / "held")])
    assert first.exit_code == 0, first.output
    assert "preset smoke" in first.output and "expected memory" in first.output
    result = json.loads((run / "eval.json").read_text())
    assert set(result) == {"fvu", "l0", "dead_pct", "rows"} and result["rows"] == 6 * 32
    assert TopKSAE.from_pretrained(run / "sae").d_in == 4
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "--resume" in again.output
    bigger = CliRunner().invoke(app, [*args[:-4], "--steps", "8", "--resume"])
    assert bigger.exit_code == 1 and "total_steps" in bigger.output
    dry = CliRunner().invoke(app, ["train", "--store", str(tmp_path / "nowhere"), "--out",
                                   str(tmp_path / "x"), "--preset", "smoke"])
    assert dry.exit_code != 0 and "nowhere" in dry.output


def test_cli_online_mode_trains_from_the_pipeline(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    from training.activations.prompts import PromptRecord, write_prompts

    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, [PromptRecord(i, f"a red circle {i}", {}, i) for i in range(4)])
    run = tmp_path / "online"
    out = CliRunner().invoke(_train_app(), [
        "train", "--from-pipeline", str(tiny_pipeline_dir), "--prompts", str(prompts),
        "--out", str(run), "--preset", "smoke", "--steps", "3", "--batch-size", "32",
        "--gen-steps", "2", "--capture-steps", "1", "--prompts-per-block", "1",
        "--gen-batch-size", "1", "--size", "32"])
    assert out.exit_code == 0, out.output
    assert "nothing is stored" in out.output
    assert TopKSAE.from_pretrained(run / "sae").d_in == 64
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "metrics.jsonl", "sae", "tb", "train_config.json"]
