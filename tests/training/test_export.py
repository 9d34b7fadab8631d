"""Bundle export from SAE + tables + store, add-concept, and the CLI of the chain's tail."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from typer.testing import CliRunner

from steering.bundle import MANIFEST_FILE, BundleError, SteeringBundle
from steering.fingerprint import pipeline_fingerprint
from steering.importance_tables import ImportanceTables
from steering.sae import SaeConfig, TopKSAE
from training.activations.collect import capture_activations, collect
from training.activations.prompts import PromptRecord, write_prompts
from training.activations.store import ActivationStore
from training.bundle_cli import register
from training.export import ConceptsSpec, add_concept, export_bundle
from training.importance import compute_importance

STEPS = 3
LABELS = [{"colour": c, "shape": s} for c in ("red", "green") for s in ("circle", "square")]


@dataclass
class Chain:
    pipe: StableDiffusionPipeline
    fingerprint: str
    store: Path
    sae: Path
    tables: Path


@pytest.fixture(scope="module")
def chain(tiny_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """A tiny collected store, a random SAE and its importance tables."""
    root = tmp_path_factory.mktemp("chain")
    prompts = [PromptRecord(i, f"a {lab['colour']} {lab['shape']}", lab, seed=i)
               for i, lab in enumerate(LABELS)]
    write_prompts(root / "prompts.jsonl", prompts)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    store = collect(pipe, root / "prompts.jsonl", root / "store", steps=STEPS, guidance=7.5,
                    height=32, width=32, prompts_per_shard=2, batch_size=4, command="test",
                    progress=False)
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(d_in=store.manifest.d_in, num_latents=32, k=4))
    sae.save_pretrained(root / "sae")
    compute_importance(sae, store, progress=False).save(root / "tables.safetensors")
    return Chain(pipe, pipeline_fingerprint(pipe.unet), root / "store", root / "sae",
                 root / "tables.safetensors")


def _export(chain: Chain, out: Path, spec: ConceptsSpec | None = None) -> SteeringBundle:
    return export_bundle(chain.sae, chain.tables, chain.store, out, spec, command="steer export")


def test_export_bundle_loads_for_the_tiny_pipeline(chain: Chain, tmp_path: Path) -> None:
    (tmp_path / "concepts.toml").write_text(
        "[defaults]\ndefault_gamma = 4.0\ngamma_range = [1.0, 40.0]\n"
        "[kinds.shape]\ndefault_percentile = 90.0\n"
        "[concepts.red]\ndefault_gamma = 20.0\n")
    spec = ConceptsSpec.load(tmp_path / "concepts.toml").with_defaults(gamma_range=(0.5, 30))
    _export(chain, tmp_path / "bundle", spec)
    bundle = SteeringBundle.load(tmp_path / "bundle", expected_fingerprint=chain.fingerprint)
    m = bundle.manifest
    assert bundle.concept_names == ["green", "red", "circle", "square"]
    assert [c.kind for c in m.concepts] == ["colour", "colour", "shape", "shape"]
    red, circle = bundle.concept("red"), bundle.concept("circle")
    assert (red.default_gamma, red.gamma_range, red.default_percentile) == (20.0, (0.5, 30.0),
                                                                            99.0)
    assert (circle.default_gamma, circle.default_percentile) == (4.0, 90.0)
    store = ActivationStore.open(chain.store).manifest
    assert (m.hook_point, m.steps, m.command) == (store.hook_point, STEPS, "steer export")
    assert m.scheduler == store.scheduler
    tables = ImportanceTables.load(chain.tables)
    # stored in float16 by default (half the size), loaded back to float32
    torch.testing.assert_close(bundle.tables.scores, tables.scores, rtol=1e-3, atol=1e-6)
    assert bundle.tables.scores.dtype == torch.float32 and bundle.sae.dtype == torch.float32
    for name in ("sae.safetensors", "importance.safetensors"):
        with safe_open(str(tmp_path / "bundle" / name), "pt") as f:
            stored = f.keys()  # a safe_open handle is not iterable
            assert {f.get_slice(k).get_dtype() for k in stored if k != "timesteps"} == {"F16"}


def test_export_refuses_a_bad_spec_or_store(chain: Chain, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"concept\(s\) \['blue'\]"):
        _export(chain, tmp_path / "a", ConceptsSpec(concepts={"blue": {"default_gamma": 1.0}}))
    with pytest.raises(ValueError, match=r"unknown field.*'gama'"):
        ConceptsSpec.from_dict({"kinds": {"colour": {"gama": 2}}})
    with pytest.raises(ValueError, match="outside gamma_range"):
        _export(chain, tmp_path / "b", ConceptsSpec().with_defaults(default_gamma=100.0))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a steering bundle"):
        _export(chain, tmp_path / "c")


def _dense_step_means(sae: TopKSAE, pipe: StableDiffusionPipeline, prompts: list) -> torch.Tensor:
    """Oracle: mean over prompts of each step's dense token-mean z, [S, n]."""
    out = torch.zeros(STEPS, sae.num_latents, dtype=torch.float64)
    for _, rows in capture_activations(pipe, prompts, STEPS, 7.5, 32, 32, None, 2):
        z = sae.dense_latents(*sae.encode(rows.float())).double()
        out += z.view(STEPS, -1, sae.num_latents).mean(1)
    return out / len(prompts)


def _norm(mu: torch.Tensor) -> torch.Tensor:
    return mu / mu.sum(-1, keepdim=True)


def test_add_concept_appends_a_concept(chain: Chain, tmp_path: Path) -> None:
    _export(chain, tmp_path / "bundle")
    old = SteeringBundle.load(tmp_path / "bundle")
    blue = [PromptRecord(0, "a blue circle", {"colour": "blue"}, seed=5),
            PromptRecord(1, "a blue square", {"colour": "blue"}, seed=6)]
    red = [PromptRecord(2, "a red circle", {"colour": "red"}, seed=7)]
    write_prompts(tmp_path / "blue.jsonl", blue + red)
    add_concept(tmp_path / "bundle", chain.pipe, tmp_path / "blue.jsonl", tmp_path / "new",
                "blue", "colour", command="steer importance --add-concept blue")
    new = SteeringBundle.load(tmp_path / "new", expected_fingerprint=chain.fingerprint)
    assert new.concept_names == [*old.concept_names, "blue"]
    assert new.concept("blue").kind == "colour"
    assert new.concept("blue").default_gamma == old.concept("green").default_gamma
    assert new.manifest.command.endswith("&& steer importance --add-concept blue")
    torch.testing.assert_close(new.tables.scores[:4], old.tables.scores)
    mu_c = _dense_step_means(new.sae, chain.pipe, blue)
    mu_not = _dense_step_means(new.sae, chain.pipe, red)
    torch.testing.assert_close(new.tables.means[4], mu_c.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(new.tables.scores[4], (_norm(mu_c) - _norm(mu_not)).float(),
                               atol=1e-5, rtol=1e-4)

    # Unlabelled prompts: all are the concept's; μ_¬c = mean of the bundle's colour μ.
    plain = [PromptRecord(0, "a blue circle", {}, seed=5)]
    write_prompts(tmp_path / "plain.jsonl", plain)
    add_concept(tmp_path / "new", chain.pipe, tmp_path / "plain.jsonl", tmp_path / "new2",
                "navy", "colour", command="x")
    new2 = SteeringBundle.load(tmp_path / "new2")
    mu_c = _dense_step_means(new2.sae, chain.pipe, plain)
    mu_not = new.tables.means[[0, 1, 4]].double().mean(0)  # green, red, blue
    torch.testing.assert_close(new2.tables.scores[5], (_norm(mu_c) - _norm(mu_not)).float(),
                               atol=1e-5, rtol=1e-4)


def test_add_concept_refuses_another_pipeline(chain: Chain, tmp_path: Path) -> None:
    _export(chain, tmp_path / "bundle")
    path = tmp_path / "bundle" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["pipeline_fingerprint"] = "0" * 64
    path.write_text(json.dumps(manifest))
    write_prompts(tmp_path / "p.jsonl", [PromptRecord(0, "a blue circle", {}, seed=1)])
    with pytest.raises(BundleError, match="fingerprint"):
        add_concept(tmp_path / "bundle", chain.pipe, tmp_path / "p.jsonl", tmp_path / "new",
                    "blue", "colour")
    with pytest.raises(BundleError, match="already in"):
        manifest["pipeline_fingerprint"] = chain.fingerprint
        path.write_text(json.dumps(manifest))
        add_concept(tmp_path / "bundle", chain.pipe, tmp_path / "p.jsonl", tmp_path / "new",
                    "red", "colour")
    assert not (tmp_path / "new").exists()


def test_cli_importance_export_and_sparsify(
    chain: Chain, tiny_pipeline_dir: Path, tmp_path: Path
) -> None:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """steer"""

    register(app)
    run = CliRunner().invoke

    def ok(*args: str) -> str:
        res = run(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return res.output

    ok("importance", "--sae", chain.sae, "--store", chain.store, "--out",
       tmp_path / "t.safetensors", "--plots", tmp_path / "plots")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "circle.png", "green.png", "red.png", "square.png"]
    ok("export", "--sae", chain.sae, "--importance", tmp_path / "t.safetensors", "--store",
       chain.store, "--out", tmp_path / "bundle", "--gamma", "3", "--gamma-range", "1", "9",
       "--closed-kind", "colour", "--closed-kind", "shape")
    bundle = SteeringBundle.load(tmp_path / "bundle", expected_fingerprint=chain.fingerprint)
    assert bundle.concept("red").gamma_range == (1.0, 9.0)
    assert bundle.manifest.closed_kinds == ["colour", "shape"]
    assert bundle.manifest.command.startswith("steer ")
    write_prompts(tmp_path / "p.jsonl", [PromptRecord(0, "a blue circle", {}, seed=1)])
    ok("importance", "--add-concept", "blue", "--kind", "colour", "--bundle",
       tmp_path / "bundle", "--pipeline", tiny_pipeline_dir, "--prompts", tmp_path / "p.jsonl",
       "--out", tmp_path / "bundle2")
    assert SteeringBundle.load(tmp_path / "bundle2").concept_names[-1] == "blue"
    ok("bundle", "export", "--format", "sparsify", tmp_path / "bundle2", "--out", tmp_path / "sp")
    ok("bundle", "import", "--format", "sparsify", tmp_path / "sp", "--out", tmp_path / "sae2")
    torch.testing.assert_close(TopKSAE.from_pretrained(tmp_path / "sae2").W_dec,
                               bundle.sae.W_dec)
    res = run(app, ["importance", "--add-concept", "x", "--out", str(tmp_path / "z")])
    assert res.exit_code == 2 and "--kind, --bundle, --pipeline, --prompts" in res.output
    res = run(app, ["export", "--sae", str(chain.sae), "--importance", str(chain.tables),
                    "--store", str(tmp_path), "--out", str(tmp_path / "z")])
    assert res.exit_code == 2 and "not an activation store" in res.output
    res = run(app, ["export", "--sae", str(chain.sae), "--importance", str(chain.tables),
                    "--store", str(chain.store), "--out", str(tmp_path / "z"),
                    "--closed-kind", "size"])
    assert res.exit_code == 2 and "closed_kinds names ['size']" in res.output
    assert "colour, shape" in res.output
