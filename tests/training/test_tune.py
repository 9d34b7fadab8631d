"""`steer bundle tune`: the figures of a tuning point, the choice rule, and the command end to
end on a copy of the toy bundle with detectors (the toy judge labels the images)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from steering.bundle import SteeringBundle
from tests.conftest import ASSETS
from training.toyworld.chain_data import detector_rows, pair_rows, tune_rows, write_jsonl
from training.tune import Labelled, choose_point, point_figures

KIND_OF = {"red": "colour", "green": "colour", "circle": "shape", "square": "shape"}


def test_point_figures_split_images_by_their_unedited_labels() -> None:
    before = [Labelled({"red", "circle"}, "a"), Labelled({"red", "square"}, "b"),
              Labelled({"green", "circle"}, "c"), Labelled({"green", "square"}, "d")]
    after = [Labelled({"green", "circle"}, "a2"),  # removed, shape kept
             Labelled({"red", "circle"}, "b2"),  # not removed, shape lost
             Labelled({"green", "circle"}, "c"),  # untouched
             Labelled({"green", "circle"}, "d2")]  # edited although red was absent
    f = point_figures("red", KIND_OF, before, after)
    assert (f["removal"]["value"], f["kept"]["value"]) == (0.5, 0.5)
    assert (f["untouched"]["value"], f["retained"]["value"]) == (0.5, 0.5)
    assert f["score"] == pytest.approx(0.5)


def _point(gamma: float, removal: float, score: float) -> dict:
    return {"candidate": "x", "gamma": gamma, "removal": {"value": removal}, "score": score}


def test_choice_prefers_points_reaching_the_target_then_the_smaller_gamma() -> None:
    points = [_point(1, 0.90, 0.95), _point(2, 0.96, 0.90), _point(3, 0.99, 0.90)]
    assert choose_point(points)["gamma"] == 2  # reaches 0.95; ties go to the smaller γ
    assert choose_point(points[:1])["gamma"] == 1  # none reaches: the best score
    with pytest.raises(ValueError):
        choose_point([])


@pytest.fixture(scope="module")
def toy_bundle_with_detectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the toy bundle with detectors fitted on 96 judged runs."""
    from steering.pipeline import SteeredPipeline
    from training.detector_fit import fit_bundle_detectors, load_runs
    from training.toyworld.judge import judge

    root = tmp_path_factory.mktemp("tune")
    bundle = root / "bundle"
    shutil.copytree(ASSETS / "toy-bundle", bundle)
    write_jsonl(root / "runs.jsonl", detector_rows(96))
    steered = SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", bundle)
    assert steered.bundle is not None
    steered.bundle.detectors = fit_bundle_detectors(
        steered, load_runs(root / "runs.jsonl"), 4.0, "judge", judge, holdout=0.5)
    steered.bundle.save(bundle)
    return bundle


def test_tune_command_writes_the_chosen_swap_and_gamma(toy_bundle_with_detectors: Path,
                                                       tmp_path: Path) -> None:
    from training.bundle_cli import register

    bundle = tmp_path / "bundle"
    shutil.copytree(toy_bundle_with_detectors, bundle)
    write_jsonl(tmp_path / "red-blue.jsonl", pair_rows("red", "blue", 4))
    write_jsonl(tmp_path / "tune.jsonl", tune_rows("red", 9))
    app = typer.Typer()
    register(app)
    args = ["bundle", "tune", str(bundle), "--pipeline", str(ASSETS / "toy-pipeline"),
            "--concept", "red", "--candidate", f"blue={tmp_path / 'red-blue.jsonl'}",
            "--prompts", str(tmp_path / "tune.jsonl"), "--judge",
            "training.toyworld.judge:judge", "--gammas", "1.5", "--rounds", "0",
            "--guidance", "4", "--work-dir", str(tmp_path / "work")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = SteeringBundle.load(bundle)
    assert loaded.translations is not None and loaded.translations.get("red").anchor == "blue"
    assert loaded.concept("red").default_gamma == 1.5
    report = json.loads((bundle / "TUNE.json").read_text())["red"]
    assert report["labels"] == "judge" and report["chosen"]["candidate"] == "blue"
    assert report["unedited_showing"] >= 1 and len(report["points"]) == 1
    # a rerun resumes from the work folder: same report, nothing generated again
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads((bundle / "TUNE.json").read_text())["red"]["points"] == report["points"]
    bad = CliRunner().invoke(app, [*args[:7], "--candidate", "nofile", *args[9:]])
    assert bad.exit_code == 2 and "LABEL=PAIRS.jsonl" in bad.output


def test_without_a_judge_the_bundles_detectors_label_the_images(tmp_path: Path) -> None:
    """A user with no judge: the shipped detectors read each image's final activations."""
    from training.bundle_cli import register

    bundle = tmp_path / "bundle"
    shutil.copytree(ASSETS / "toy-bundle", bundle)
    write_jsonl(tmp_path / "red-blue.jsonl", pair_rows("red", "blue", 4))
    write_jsonl(tmp_path / "tune.jsonl", tune_rows("red", 9))
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, [
        "bundle", "tune", str(bundle), "--pipeline", str(ASSETS / "toy-pipeline"),
        "--concept", "red", "--candidate", f"blue={tmp_path / 'red-blue.jsonl'}",
        "--prompts", str(tmp_path / "tune.jsonl"), "--gammas", "1.5", "--rounds", "0",
        "--guidance", "4", "--work-dir", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    report = json.loads((bundle / "TUNE.json").read_text())["red"]
    assert report["labels"] == "detectors" and report["chosen"]["candidate"] == "blue"
    # the detectors find red in the prompts naming it (a third of the 9), and the swap
    # removes it there by their own reading
    assert report["unedited_showing"] >= 3
    assert report["points"][0]["removal"]["value"] >= 0.5


def test_tuning_prompts_file_names_the_line_to_fix(tmp_path: Path) -> None:
    from training.tune import load_prompts

    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a red circle", "seed": 1}\n\n{"prompt": "x", "seed": true}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:3: .*seed a non-negative integer"):
        load_prompts(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds nothing"):
        load_prompts(path)
