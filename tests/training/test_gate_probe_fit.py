"""Fitting the gate's probe: the folded ridge against the standardised oracle, labels and
refusals, recording the mean codes on the toy pipeline, and both CLIs."""

import json
import shutil

import pytest
import torch

from steering.bundle import SteeringBundle
from steering.hooks import to_tokens
from steering.pipeline import SteeredPipeline
from tests.conftest import ASSETS
from training.gate_probe_fit import fit_gate_probe, probe_accuracy, record_mean_codes

KINDS = {"k": ["a", "b"], "o": ["c", "d", "e"]}
CONCEPTS = ["a", "b", "c", "d", "e"]


def labelled_codes(n_runs=30, steps=2, n=12, seed=0):
    """Codes where feature 0 says a/b and features 1-3 say c/d/e, plus noise features."""
    g = torch.Generator().manual_seed(seed)
    labels = [{"k": "ab"[i % 2], "o": "cde"[i % 3]} for i in range(n_runs)]
    codes = torch.rand(steps, n_runs, n, generator=g)
    for i, lab in enumerate(labels):
        codes[:, i, 0] += 3.0 * (lab["k"] == "a")
        codes[:, i, 1 + "cde".index(lab["o"])] += 3.0
    return codes, labels


def test_folded_weights_score_like_the_standardised_ridge():
    codes, labels = labelled_codes()
    probe = fit_gate_probe(codes, labels, KINDS, CONCEPTS, ridge=0.1)
    x = codes[1].double()
    xs = (x - x.mean(0)) / x.std(0)
    y = torch.tensor([[lab["k"] == "a", lab["k"] == "b"] for lab in labels]).double()
    w = torch.linalg.solve(xs.T @ xs + 0.1 * len(x) * torch.eye(x.shape[1], dtype=x.dtype),
                           xs.T @ (y - y.mean(0)))
    want = xs @ w + y.mean(0)  # the primal ridge on standardised codes
    got = probe.scores(codes[1].float(), [0, 1], row=1)
    torch.testing.assert_close(got, want.float(), rtol=1e-2, atol=1e-2)  # float16 weights
    assert probe_accuracy(probe, codes, labels, KINDS) == {"k": [1.0, 1.0], "o": [1.0, 1.0]}


def test_runs_that_do_not_name_a_kind_are_left_out_and_every_concept_is_needed():
    codes, labels = labelled_codes()
    partial = [{"k": lab["k"]} if i % 4 == 0 else lab for i, lab in enumerate(labels)]
    probe = fit_gate_probe(codes, partial, KINDS, CONCEPTS)
    assert probe_accuracy(probe, codes, labels, KINDS)["o"] == [1.0, 1.0]
    no_e = [lab for lab in labels if lab["o"] != "e"]
    keep = [i for i, lab in enumerate(labels) if lab["o"] != "e"]
    with pytest.raises(ValueError, match=r"no labelled prompt names \['e'\]"):
        fit_gate_probe(codes[:, keep], no_e, KINDS, CONCEPTS)


@pytest.fixture(scope="module")
def toy():
    return SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", ASSETS / "toy-bundle")


@torch.no_grad()
def test_recorded_codes_are_the_cond_halfs_mean_code_per_row(toy):
    seen = {}

    def spy(module, args, output):  # the hook block's output, both CFG halves
        seen.setdefault(len(seen), output[0] if isinstance(output, tuple) else output)

    handle = toy.block.register_forward_hook(spy)
    try:
        codes = record_mean_codes(toy, ["a red circle", "a blue square"], [1, 2], 20, 4.0)
    finally:
        handle.remove()
    assert codes.shape == (20, 2, toy.sae.num_latents) and codes.dtype == torch.float16
    x = seen[0].chunk(2)[1]  # step 0, cond half
    dense = toy.sae.dense_latents(*toy.sae.encode(to_tokens(x)))
    want = dense.view(2, -1, toy.sae.num_latents).mean(1)
    torch.testing.assert_close(codes[0].float(), want, rtol=1e-2, atol=1e-3)


def test_bundle_fit_gate_cli_adds_a_probe_and_refuses_a_concept_without_runs(tmp_path):
    import typer
    from typer.testing import CliRunner

    from training.bundle_cli import register

    app = typer.Typer()
    register(app)
    bundle = tmp_path / "bundle"
    shutil.copytree(ASSETS / "toy-bundle", bundle)  # format 5: detectors, no probe
    assert "gate_probe.safetensors" not in json.loads((bundle / "manifest.json").read_text())[
        "files"]
    combos = [("circle", "red", "plain"), ("square", "green", "striped"),
              ("triangle", "blue", "dotted"), ("cross", "yellow", "plain")]
    records = [{"prompt": f"a {c} {s} on a {b} background", "seed": 10 + i,
                "concepts": {"shape": s, "colour": c, "background": b}}
               for i, (s, c, b) in enumerate(combos * 2)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in records))
    args = ["bundle", "fit-gate", str(bundle), "--pipeline", str(ASSETS / "toy-pipeline"),
            "--prompts", str(prompts), "--guidance", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = SteeringBundle.load(bundle)
    assert loaded.gate_probe is not None and loaded.gate_probe.concepts == loaded.concept_names
    prompts.write_text("\n".join(json.dumps(r) for r in records if r["concepts"]["shape"]
                                 != "cross"))
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 2 and "no labelled prompt names ['yellow']" in bad.output
