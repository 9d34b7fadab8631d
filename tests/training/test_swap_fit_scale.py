"""The learned-swap fit at scale: the row solver against a dense oracle, its memory at
SD-1.4's n without the (n + 1)² normal equations, and `steer bundle fit-swap --pairs` with a
free-text counterfactual on a copy of the shipped toy bundle."""

import json
import shutil

import pytest
import torch
import typer
from typer.testing import CliRunner

from steering.bundle import SteeringBundle
from steering.translation import TranslationTables
from tests.conftest import ASSETS
from training.bundle_cli import register
from training.translation_fit import SwapRegression, fit_row, load_pairs


def problem(tokens: int, n: int, k: int, d: int, seed: int = 0):
    """Random top-k codes (distinct ids per token) and targets linear in them plus noise."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(tokens, n, generator=g).topk(k, dim=1).indices
    values = torch.rand(tokens, k, generator=g) + 0.1
    z = torch.zeros(tokens, n).scatter(1, indices, values)
    target = z @ torch.randn(n, d, generator=g) + 0.1 * torch.randn(tokens, d, generator=g)
    return values, indices, target, z


def dense_rrr(z, target, ridge, rank):
    """The dense oracle: ridge on [z, 1] over the active features, then the fitted edits'
    main ``rank`` directions; returns the reduced coefficients' edits [n + 1, d]."""
    x = torch.cat([z, torch.ones(len(z), 1)], 1).double()
    act = (x != 0).any(0)
    g = x[:, act].T @ x[:, act]
    g += ridge * g.diagonal().mean() * torch.eye(int(act.sum()), dtype=g.dtype)
    b = torch.linalg.solve(g, x[:, act].T @ target.double())
    _, vectors = torch.linalg.eigh(b.T @ (x[:, act].T @ x[:, act]) @ b)
    v = vectors[:, -rank:]
    out = torch.zeros(x.shape[1], target.shape[1], dtype=torch.float64)
    out[act] = b @ v @ v.T
    return out


def edits(sol, n, d):
    """A row solution as dense per-feature edits [n + 1, d]."""
    out = torch.zeros(n + 1, d)
    out[sol.features] = sol.coef @ sol.basis
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
@pytest.mark.parametrize("rank", [12, 4])
def test_row_fit_is_the_dense_reduced_rank_ridge_solution(dtype, tol, rank):
    n, k, d = 40, 5, 12
    values, indices, target, z = problem(300, n, k, d)
    sol = fit_row(lambda: [(values[:150], indices[:150], target[:150]),
                           (values[150:], indices[150:], target[150:])],
                  n, d, ridge=1e-3, min_count=1, rank=rank, work_rank=d, dtype=dtype)
    assert sol is not None and sol.tokens == 300 and sol.basis.shape == (rank, d)
    want = dense_rrr(z, target, 1e-3, rank).float()
    got = edits(sol, n, d)
    assert float((got - want).norm() / want.norm()) < tol


def test_a_work_space_above_the_rank_keeps_the_fit():
    """r' = 4·rank of the targets' directions (the default) against the full output space."""
    n, k, d = 60, 6, 48
    values, indices, target, z = problem(800, n, k, d, seed=1)
    g = torch.Generator().manual_seed(2)
    target = z @ torch.randn(n, 6, generator=g) @ torch.randn(6, d, generator=g) \
        + 0.3 * torch.randn(800, d, generator=g)
    full = fit_row(lambda: [(values, indices, target)], n, d, min_count=1, rank=4,
                   work_rank=d, dtype=torch.float64)
    reduced = fit_row(lambda: [(values, indices, target)], n, d, min_count=1, rank=4,
                      dtype=torch.float64)
    assert full is not None and reduced is not None
    a, b = edits(full, n, d), edits(reduced, n, d)
    assert float((a - b).norm() / a.norm()) < 1e-2


def test_memory_does_not_grow_with_n_squared(tmp_path):
    n, k, d = 20_480, 32, 8
    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(512)])
    values = torch.rand(512, k, generator=g)
    target = torch.randn(512, d, generator=g)
    sol = fit_row(lambda: [(values, indices, target)], n, d, min_count=1, rank=4)
    assert sol is not None and len(sol.features) > 0.5 * n
    dense = (n + 1) ** 2 * 8
    assert sol.state_bytes < dense / 500, (sol.state_bytes, dense)
    # the regression object itself holds no per-feature tensors: tokens live on disk
    from steering.sae import SaeConfig, TopKSAE

    fit = SwapRegression(TopKSAE(SaeConfig(d, n, k)), num_rows=50, work_dir=tmp_path)
    held = [v for v in vars(fit).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() * t.element_size() for t in held) == 0


def test_translation_tables_keep_a_free_text_anchor(tmp_path):
    from tests.steering.test_translation import KINDS, swap, tables_of

    tables = tables_of(red=swap("a person wearing clothes"))
    tables.validate(n for ns in KINDS.values() for n in ns)
    tables.save(tmp_path / "t.safetensors")
    back = TranslationTables.load(tmp_path / "t.safetensors")
    assert back.get("red").anchor == "a person wearing clothes"


def write_pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_pairs_names_the_line_to_fix(tmp_path):
    good = {"prompt": "a red circle", "counterfactual": "a circle", "seed": 3}
    assert load_pairs(write_pairs(tmp_path / "p.jsonl", [good]))[0].counterfactual == "a circle"
    for bad, match in [({"prompt": "a red circle", "seed": 1}, "missing counterfactual"),
                       ({**good, "counterfactual": "a red circle"}, "prompt itself"),
                       ({**good, "seed": -1}, "seed must be")]:
        with pytest.raises(ValueError, match=match) as e:
            load_pairs(write_pairs(tmp_path / "p.jsonl", [good, bad]))
        assert "p.jsonl:2" in str(e.value)


@pytest.fixture
def cli(tmp_path):
    app = typer.Typer()
    register(app)
    bundle = tmp_path / "bundle"
    shutil.copytree(ASSETS / "toy-bundle", bundle)
    pairs = write_pairs(tmp_path / "pairs.jsonl", [
        {"prompt": "a red circle on a plain background",
         "counterfactual": "a circle on a plain background", "seed": 11},
        {"prompt": "a red square, striped", "counterfactual": "a grey square, striped",
         "seed": 12}])
    base = ["bundle", "fit-swap", str(bundle), "--pipeline", str(ASSETS / "toy-pipeline"),
            "--concept", "red"]
    return app, bundle, pairs, base


def test_fit_swap_from_jsonl_pairs_with_a_free_text_anchor_resumes(cli, tmp_path):
    app, bundle, pairs, base = cli
    work = tmp_path / "work"
    args = [*base, "--pairs", str(pairs), "--anchor-label", "no colour", "--steps", "4",
            "--guidance", "4", "--rounds", "1", "--work-dir", str(work), "--dtype", "float64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "red → no colour (2 prompt pairs" in result.output
    loaded = SteeringBundle.load(bundle)
    swap = loaded.translations.get("red")
    assert swap.anchor == "no colour" and len(swap.row) > 0
    solved = sorted((work / "solved").rglob("*.pt"))
    assert {p.parent.name for p in solved} == {"j0", "j1"}
    stamps = [p.stat().st_mtime_ns for p in solved]
    again = CliRunner().invoke(app, args)  # every run and row is on disk: nothing is redone
    assert again.exit_code == 0, again.output
    assert [p.stat().st_mtime_ns for p in solved] == stamps
    changed = CliRunner().invoke(app, [*args[:-4], "--rounds", "0", "--work-dir", str(work),
                                       "--guidance", "5"])
    assert changed.exit_code == 2 and "other guidance" in changed.output


@pytest.mark.parametrize("extra, message", [
    ([], "pass --prompts"),
    (["--pairs", "P", "--prompts", "P"], "not both"),
    (["--pairs", "P", "--anchor", "green", "--anchor-label", "x"], "--anchor or --anchor-label"),
    (["--pairs", "P", "--anchor", "circle"], "--anchor 'circle'"),
    (["--pairs", "P", "--dtype", "float16"], "--dtype 'float16'"),
])
def test_fit_swap_errors_name_the_option(cli, extra, message):
    app, _, pairs, base = cli
    extra = [str(pairs) if a == "P" else a for a in extra]
    result = CliRunner().invoke(app, [*base, *extra])
    assert result.exit_code == 2 and message in result.output, result.output
