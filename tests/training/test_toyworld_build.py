"""`steer toyworld build` end to end at toy-of-the-toy scale: outputs, report, resume."""

import json

from typer.testing import CliRunner

from steering.cli import app as steer_app
from steering.pipeline import SteeredPipeline
from training.toyworld.cli import app


def test_build_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, work = tmp_path / "assets", tmp_path / "work"
    args = ["build", "--out", str(out), "--work-dir", str(work), "--vae-steps", "2",
            "--classifier-steps", "2", "--unet-steps", "2", "--unet-scenes", "64",
            "--eval-full", "4", "--eval-per-prompt", "1", "--eval-classifier", "32"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert {p.name for p in out.iterdir()} == {
        "toy-pipeline", "toy-classifier", "BUILD.md", "toyworld-eval.json"}
    assert "--unet-steps 2 --unet-scenes 64" in (out / "BUILD.md").read_text()
    tok = SteeredPipeline.from_pretrained(out / "toy-pipeline").pipe.tokenizer
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]

    checkpoints = {p.name: p.stat().st_mtime_ns for p in work.glob("*.pt")}
    second = CliRunner().invoke(app, args)  # everything is done: nothing retrains
    assert second.exit_code == 0, second.output
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("*.pt")} == checkpoints
    assert len(json.loads((work / "runs.json").read_text())) == 2

    gen = CliRunner().invoke(steer_app, ["generate", "--prompt", "a circle", "--pipeline",
                                         str(out / "toy-pipeline"), "--n-images", "1",
                                         "--steps", "2", "--out", str(tmp_path / "o")])
    assert gen.exit_code == 0, gen.output
