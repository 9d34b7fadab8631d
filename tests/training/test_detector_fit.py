"""Fitting the open-world detectors: judge vs prompt labels on synthetic codes, the splits,
the label sources and refusals, and `steer bundle fit-detector` end to end on the toy world
(the command in docs/real-models.md), then generation gated by the fitted detectors."""

import json
import re
import shlex
import shutil

import pytest
import torch

from steering.bundle import SteeringBundle
from steering.detector import DETECTORS_FILE
from tests.conftest import ASSETS, REPO
from training.detector_fit import (
    Run,
    check_counts,
    fit_detectors,
    heldout_split,
    load_judge,
    load_runs,
    prompt_labels,
    resolve_label_source,
)

COLOURS = ["red", "blue"]


def colour_world(n_runs=480, steps=3, n=16, seed=0):
    """Runs naming red, blue or no colour; an unnamed run shows red or blue a quarter of the
    time each (as the toy model draws an unnamed colour). Feature 0 carries red, 1 blue."""
    g = torch.Generator().manual_seed(seed)
    prompts, shown = [], []
    for i in range(n_runs):
        named = ["red", "blue", None][i % 3]
        prompts.append(f"a {named} circle" if named else "a circle")
        drawn = named or ["red", "blue", "green", "green"][(i // 3) % 4]
        shown.append({drawn} & set(COLOURS))
    codes = torch.rand(steps, n_runs, n, generator=g)
    for i, s in enumerate(shown):
        for c in s:
            codes[:, i, COLOURS.index(c)] += 1.5
    runs = [Run(p, i) for i, p in enumerate(prompts)]
    return codes, runs, shown


def test_unnamed_occurrences_become_positives_only_with_judge_labels():
    codes, runs, shown = colour_world()
    named = prompt_labels([r.prompt for r in runs], COLOURS)
    unnamed_red = torch.tensor([("red" in s) and r.prompt == "a circle"
                                for r, s in zip(runs, shown, strict=True)])
    assert unnamed_red.sum() > 0 and not any("red" in named[i] for i in
                                             unnamed_red.nonzero().flatten().tolist())
    heldout = heldout_split(runs, 0.25)
    found = {}
    for source, labels in (("judge", shown), ("prompt", named)):
        det = fit_detectors(codes, labels, COLOURS, heldout, fpr=0.01, label_source=source)
        stat = det.statistic(codes[:, heldout])[:, 0]
        hit = stat >= det.threshold[0]
        found[source] = float(hit[unnamed_red[heldout]].float().mean())
        assert det.labels == source
    assert found["judge"] > 0.9  # the judge saw red where the prompt did not name it
    assert found["prompt"] < 0.2  # prompt labels call those images negatives: τ is above them


def test_the_held_out_split_is_stable_and_near_its_share():
    runs = [Run(f"p{i}", i) for i in range(2000)]
    split = heldout_split(runs, 0.25)
    assert 0.22 < float(split.float().mean()) < 0.28
    back = heldout_split(runs[::-1], 0.25).flip(0)
    assert torch.equal(split, back)  # by prompt and seed, not position
    with pytest.raises(ValueError, match="between 0 and 1"):
        heldout_split(runs, 1.0)


def test_too_few_runs_say_how_many_more_are_needed():
    labels = [{"red"} if i < 4 else set() for i in range(40)]
    heldout = torch.arange(40) % 4 == 0  # red: runs 0 (held out), 1, 2, 3 (fit)
    with pytest.raises(ValueError, match=r"'red': 3 runs showing it in the fit split and 1 "
                       r"held out \(needs 3 in each\): about 8 more labelled runs"):
        check_counts(labels, ["red"], heldout, 0.25)


def test_prompt_labels_are_whole_words_and_case_blind():
    assert prompt_labels(["A Red circle", "a reddish square", "red-blue"], COLOURS) == [
        {"red"}, set(), {"red", "blue"}]


def test_runs_file_and_label_sources(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"prompt": "a red circle", "seed": 1, "concepts": ["red"]}\n\n'
                    '{"prompt": "a circle", "seed": 2, "concepts": {"colour": "blue"}}\n')
    runs = load_runs(path)
    assert [r.concepts for r in runs] == [{"red"}, {"blue"}]
    assert resolve_label_source(None, None, runs) == "given"
    unlabelled = [*runs, Run("a square", 3)]
    assert resolve_label_source(None, None, unlabelled) == "prompt"
    with pytest.raises(ValueError, match="1 of 3 runs have no"):
        resolve_label_source("given", None, unlabelled)
    with pytest.raises(ValueError, match="needs --judge"):
        resolve_label_source("judge", None, runs)
    path.write_text('{"prompt": "a red circle"}\n')
    with pytest.raises(ValueError, match=r"runs.jsonl:1: .*integer \"seed\""):
        load_runs(path)
    with pytest.raises(ValueError, match="module:callable"):
        load_judge("training.toyworld.judge")
    with pytest.raises(ValueError, match="no callable 'nope'"):
        load_judge("training.toyworld.judge:nope")


def docs_command() -> list[str]:
    """The `steer bundle fit-detector` command of docs/real-models.md's detector section."""
    text = (REPO / "docs" / "real-models.md").read_text()
    section = text[text.index("Fit the detectors"):]
    match = re.search(r"^ {4}(steer bundle fit-detector .*?)(?:\n\n|\Z)", section,
                      re.MULTILINE | re.DOTALL)
    assert match, "docs/real-models.md shows no `steer bundle fit-detector` command"
    return shlex.split(match.group(1).replace("\\\n", " "))


def toy_runs(n_seeds=1):
    """Prompts of the toy world: every shape × colour × background, and every shape ×
    background leaving the colour unnamed (the model draws one)."""
    shapes, colours = ["circle", "square", "triangle", "cross"], ["red", "green", "blue",
                                                                  "yellow"]
    backgrounds = ["plain", "striped", "dotted"]
    prompts = [f"a {c} {s} on a {b} background" for s in shapes for c in colours
               for b in backgrounds]
    prompts += [f"a {s} on a {b} background" for s in shapes for b in backgrounds]
    return [{"prompt": p, "seed": 500 + i * n_seeds + k} for i, p in enumerate(prompts)
            for k in range(n_seeds)]


def test_fit_detector_command_from_the_docs_then_generation_gates_by_it(tmp_path,
                                                                        monkeypatch):
    import typer
    from typer.testing import CliRunner

    import steering.pipeline as pipeline_module
    from steering.edits import ConceptEdit
    from steering.gate import ConceptGate
    from steering.pipeline import GenerationRequest, SteeredPipeline
    from training.bundle_cli import register

    app = typer.Typer()
    register(app)
    bundle = tmp_path / "bundle"
    shutil.copytree(ASSETS / "toy-bundle", bundle)
    runs = tmp_path / "runs.jsonl"
    runs.write_text("\n".join(json.dumps(r) for r in toy_runs()))
    args = docs_command()[1:]  # without "steer"
    where = {"bundles/sd14-safety": str(bundle), "sd14/": str(ASSETS / "toy-pipeline"),
             "runs.jsonl": str(runs), "labs.judges:nudity": "training.toyworld.judge:judge",
             "cuda": "cpu", "detector-runs": str(tmp_path / "work")}
    args = [where.get(a, a) for a in args]
    # the toy bundle's sampling, and half the runs held out: 60 runs, few per concept
    args += ["--guidance", "4", "--holdout", "0.5", "--batch-size", "64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "judge labels" in result.output and "precision" in result.output
    loaded = SteeringBundle.load(bundle)
    det = loaded.detectors
    assert loaded.manifest.format_version == 5 and DETECTORS_FILE in loaded.manifest.files
    assert det is not None and det.concepts == loaded.concept_names and det.labels == "judge"
    assert set(det.heldout) == set(det.concepts) and det.command.startswith("steer")
    for c in ("circle", "striped"):  # shapes and backgrounds are found from few runs
        assert det.heldout[c]["recall"] >= 0.5, det.heldout[c]

    gates = []

    class Spy(ConceptGate):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            gates.append(self)

    monkeypatch.setattr(pipeline_module, "ConceptGate", Spy)
    steered = SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", bundle)
    prompts = ["a cross on a plain background", "a red circle on a dotted background"]
    out = steered.generate(GenerationRequest.batch(
        prompts, [3, 4], edits=[ConceptEdit("circle")], steps=20, guidance=4.0))
    assert len(out.images) == 2 and gates and gates[0].detectors is not None
    found = gates[0].present(loaded.tables.concept_index("circle"))
    assert found.tolist() == [False, True]  # the cross is left alone
    assert gates[0].detection()[loaded.tables.concept_index("circle")].shape == (2,)


def test_a_work_dir_keeps_the_recorded_runs_so_a_refit_generates_nothing(tmp_path,
                                                                          monkeypatch):
    import training.detector_fit as fit_module
    from steering.pipeline import SteeredPipeline
    from training.detector_fit import fit_bundle_detectors
    from training.toyworld.judge import judge

    steered = SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", ASSETS / "toy-bundle")
    runs = [Run(r["prompt"], r["seed"]) for r in toy_runs()]
    calls = []
    real = fit_module.generate_with

    def counting(steered, prompts, *a, **kw):
        calls.append(len(prompts))
        return real(steered, prompts, *a, **kw)

    monkeypatch.setattr(fit_module, "generate_with", counting)

    def fit(runs, alpha=0.3):
        return fit_bundle_detectors(steered, runs, 4.0, "judge", judge, holdout=0.5,
                                    batch_size=16, alpha=alpha, work_dir=tmp_path / "work")

    first = fit(runs)
    assert sum(calls) == len(runs) and first.alpha == 0.3
    calls.clear()
    again = fit(runs, alpha=0.0)  # another setting: nothing recorded again
    assert calls == [] and again.alpha == 0.0
    assert torch.equal(again.weight, first.weight)  # same codes, same labels, same ridge
    # a changed run re-records its own batch only
    runs[20] = Run(runs[20].prompt, runs[20].seed + 10_000)
    fit(runs)
    assert calls == [16]
