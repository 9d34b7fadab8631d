"""Fitting learned swaps: the regression against a dense ridge oracle, its reduced rank, and
the toy build (`steer toyworld translations`) end to end on a copy of the shipped bundle."""

import json
import shutil

import pytest
import torch

from steering.bundle import SteeringBundle
from steering.pipeline import SteeredPipeline
from steering.recipe import GATED_TRANSLATE
from steering.sae import SaeConfig, TopKSAE
from steering.translation import TRANSLATION_FILE
from tests.conftest import ASSETS
from training.toyworld.translations import swap_pairs
from training.translation_fit import SwapRegression, apply_translation, fit_translation

D, N, K = 6, 16, 3


@pytest.fixture
def sae():
    torch.manual_seed(0)
    return TopKSAE(SaeConfig(D, N, K))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, D, 3, 3, generator=g)


def oracle(sae, pairs, ridge):
    """Dense ridge regression of SAE(x') − SAE(x) on [z, 1] over every token."""
    zs, ys = [], []
    for x, x2 in pairs:
        t, t2 = (a.permute(0, 2, 3, 1).reshape(-1, D) for a in (x, x2))
        z = sae.dense_latents(*sae.encode(t))
        zs.append(torch.cat([z, torch.ones(len(z), 1)], 1))
        ys.append(sae(t2) - sae(t))
    z, y = torch.cat(zs).double(), torch.cat(ys).double()
    act = (z != 0).any(0)
    g = z[:, act].T @ z[:, act]
    g += ridge * g.diagonal().mean() * torch.eye(int(act.sum()), dtype=g.dtype)
    b = torch.zeros(N + 1, D, dtype=torch.float64)
    b[act] = torch.linalg.solve(g, z[:, act].T @ y)
    return b, z, act


@torch.no_grad()
def test_full_rank_solution_is_the_dense_ridge_solution(sae):
    fit = SwapRegression(sae, num_rows=2)
    pairs = [(batch(1), batch(2)), (batch(3), batch(4))]
    for x, x2 in pairs:
        fit.add(1, x, x2)
    swap = fit.solve("green", ridge=1e-3, min_count=1, rank=D)
    want, _, _ = oracle(sae, pairs, 1e-3)
    feats, deltas, bias = swap.at(1, N)
    assert set(swap.row.tolist()) == {1}  # row 0 saw no tokens: nothing stored
    torch.testing.assert_close(deltas, want[feats].float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(bias, want[N].float(), rtol=2e-3, atol=2e-3)


@torch.no_grad()
def test_reduced_rank_keeps_the_main_directions_of_the_fitted_edits(sae):
    fit = SwapRegression(sae, num_rows=1)
    pairs = [(batch(5), batch(6))]
    fit.add(0, *pairs[0])
    full, z, _ = oracle(sae, pairs, 1e-2)
    fitted = (z @ full).float()  # the full solution's edits on the training tokens
    errors = []
    for rank in (1, 3, D):
        swap = fit.solve("green", ridge=1e-2, min_count=1, rank=rank)
        assert swap.basis.shape == (1, rank, D)
        # orthonormal up to the float16 the basis is stored in
        torch.testing.assert_close(swap.basis[0] @ swap.basis[0].T, torch.eye(rank),
                                   atol=2e-3, rtol=0)
        feats, deltas, bias = swap.at(0, N)
        dense = torch.zeros(N + 1, D)
        dense[feats], dense[N] = deltas, bias
        errors.append(float((z.float() @ dense - fitted).norm() / fitted.norm()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 5e-3, errors


def test_rare_features_are_left_out(sae):
    fit = SwapRegression(sae, num_rows=1)
    fit.add(0, batch(7), batch(8))
    seen = fit.counts(0)
    few = int(seen[seen > 0].min())
    swap = fit.solve("green", min_count=few + 1, rank=2)
    kept = set(swap.feature.tolist()) - {N}
    assert kept == {j for j in range(N) if seen[j] >= few + 1}


@pytest.fixture(scope="module")
def toy():
    return SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", ASSETS / "toy-bundle")


def test_swap_pairs_differ_only_in_the_concept_and_use_their_own_seeds():
    pairs = swap_pairs("red", "green", 6, 3_000_000)
    assert len({p.seed for p, _ in pairs}) == 6
    for p, asked in pairs:
        assert asked["colour"] == "red" and "red" in p.prompt and "green" in p.counterfactual
        assert p.prompt.replace("red", "green") == p.counterfactual
    assert swap_pairs("red", "blue", 1, 3_000_000)[0][0].seed != pairs[0][0].seed
    with pytest.raises(ValueError, match="another concept"):
        swap_pairs("red", "circle", 1, 0)


def test_fit_on_the_toy_pipeline_changes_the_concepts_images(toy):
    pairs = [p for p, _ in swap_pairs("red", "green", 2, 3_000_000)]
    seen = []
    swap = fit_translation(toy, "green", pairs, steps=20, batch_size=2, rounds=1,
                           progress=seen.append)
    assert seen == [4, 2] and swap.anchor == "green"
    assert set(swap.row.tolist()) == set(range(toy.bundle.tables.num_steps))
    x = torch.randn(4, toy.sae.d_in, 8, 8)
    edit = apply_translation(swap, toy.sae)
    assert not torch.equal(edit(0, 0, 5, x), x)
    assert torch.equal(apply_translation(swap, toy.sae, gamma=0.0)(0, 0, 5, x), x)


def test_toyworld_translations_cli_builds_and_resumes(tmp_path):
    from typer.testing import CliRunner

    from training.toyworld.cli import app

    bundle = tmp_path / "bundle"
    shutil.copytree(ASSETS / "toy-bundle", bundle)
    work = tmp_path / "work"
    args = ["translations", "--bundle", str(bundle), "--work-dir", str(work),
            "--concepts", "striped", "--n-fit", "2", "--n-check", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = SteeringBundle.load(bundle)
    assert loaded.manifest.recipe == GATED_TRANSLATE
    assert loaded.translations.get("striped").anchor in ("plain", "dotted")
    assert TRANSLATION_FILE in loaded.manifest.files
    report = (bundle / "TRANSLATIONS.md").read_text()
    assert "| striped | " in report and "**" in report
    assert "| 2 / 1 / 2 |" in report  # how striped was fitted this time
    assert "| red | **green** |" in report  # earlier builds' concepts are kept
    merged = json.loads((bundle / "TRANSLATIONS.json").read_text())
    assert merged["striped"]["fit"] == {"pairs": 2, "rounds": 1, "judged_pairs": 2}
    assert len(merged) == 11
    done = sorted(work.glob("*.json"))
    assert [p.stem for p in done] == ["striped-dotted-n2-r1", "striped-plain-n2-r1"]
    figures = json.loads(done[0].read_text())
    assert set(figures) == {"1", "1.5", "score"}
    stamps = [p.stat().st_mtime_ns for p in work.iterdir()]
    again = CliRunner().invoke(app, args)  # every fit is on disk: nothing is refitted
    assert again.exit_code == 0, again.output
    assert [p.stat().st_mtime_ns for p in work.iterdir()] == stamps


def test_pairs_from_prompts_swap_the_whole_word_and_refuse_prompts_without_it():
    from training.translation_fit import pairs_from_prompts

    pairs = pairs_from_prompts(["a Red circle", "red, on reddish dots"], "red", "green", 7)
    assert [(p.counterfactual, p.seed) for p in pairs] == [("a green circle", 7),
                                                    ("green, on reddish dots", 8)]
    with pytest.raises(ValueError, match="do not name 'red'"):
        pairs_from_prompts(["a blue circle"], "red", "green")


def test_bundle_fit_swap_cli_adds_a_swap_to_a_bundle(tmp_path):
    import typer
    from typer.testing import CliRunner

    from training.bundle_cli import register

    app = typer.Typer()
    register(app)
    bundle = tmp_path / "bundle"
    shutil.copytree(ASSETS / "toy-bundle", bundle)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a plain background\n\na red square, striped\n")
    args = ["bundle", "fit-swap", str(bundle), "--pipeline", str(ASSETS / "toy-pipeline"),
            "--concept", "red", "--anchor", "blue", "--prompts", str(prompts),
            "--guidance", "4", "--rounds", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = SteeringBundle.load(bundle)
    assert loaded.translations.get("red").anchor == "blue"
    assert loaded.manifest.recipe == GATED_TRANSLATE
    assert loaded.concept("red").default_gamma == 1.0
    bad = CliRunner().invoke(app, [*args[:7], "--anchor", "circle", *args[9:]])
    assert bad.exit_code == 2 and "another concept of 'red'" in bad.output
