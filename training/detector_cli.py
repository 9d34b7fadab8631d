"""`steer bundle fit-detector`: fit the open-world concept detectors (bundle format 5).

Registered on the `steer bundle` group by :func:`register`. Heavy modules (torch, diffusers)
are imported inside the command so that `steer --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

COMMAND = "fit-detector"


def register(bundle_app: typer.Typer) -> None:
    """Add `fit-detector` to the `steer bundle` group (once, however often called)."""
    if any(c.name == COMMAND for c in bundle_app.registered_commands):
        return
    bundle_app.command(COMMAND)(bundle_fit_detector)


def bundle_fit_detector(
    bundle: Path = typer.Argument(..., help="Steering bundle to add the detectors to "
                                  "(rewritten in place)."),
    pipeline: Path = typer.Option(..., help="The SD-1.x pipeline folder the bundle is for."),
    runs: Path = typer.Option(..., help="JSONL, one run a line: {\"prompt\", \"seed\", "
                              "\"concepts\": [names present]}; concepts optional."),
    judge: str | None = typer.Option(None, help="module:callable judging generated images: "
                                     "judge(images) -> list of sets of concept names."),
    labels: str | None = typer.Option(None, help="judge | given | prompt (default: judge "
                                      "with --judge, else given if every run has concepts, "
                                      "else prompt)."),
    fpr: float = typer.Option(0.01, help="Target false-positive rate on held-out runs "
                              "without the concept."),
    holdout: float = typer.Option(0.25, help="Share of runs held out to calibrate τ."),
    steps: int | None = typer.Option(None, help="Denoising steps (default: the bundle's)."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    batch_size: int = typer.Option(8, min=1, help="Runs per pipeline call."),
    ridge: float = typer.Option(1.0, min=0.0, help="Ridge strength (per run, on "
                                "standardised codes)."),
    alpha: float = typer.Option(0.3, min=0.0, max=1.0, help="Smallest step weight of the "
                                "evidence (a running mean of the per-step scores; 0: the "
                                "plain mean). Higher lets concepts that form late count."),
    work_dir: Path | None = typer.Option(None, help="Keep the recorded runs (codes and the "
                                         "judge's labels) here: a killed fit resumes and a "
                                         "refit with other --ridge/--alpha/--fpr records "
                                         "nothing again."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
) -> None:
    """Fit one present/absent detector per bundle concept on unedited runs and calibrate its
    threshold to --fpr on held-out runs (format 5); gated recipes then decide each concept
    on its own. Resumable with --work-dir."""
    from tqdm import tqdm

    from steering.pipeline import SteeredPipeline
    from training.bundle_cli import _command, _fail, _user_errors
    from training.detector_fit import (
        fit_bundle_detectors,
        load_judge,
        load_runs,
        report_lines,
        resolve_label_source,
    )

    with _user_errors():
        records = load_runs(runs)
        judge_fn = load_judge(judge) if judge is not None else None
        source = resolve_label_source(labels, judge_fn, records)
        if source != "judge" and judge_fn is not None:
            raise _fail(f"--judge is only used with --labels judge, not {source}")
        steered = SteeredPipeline.from_pretrained(pipeline, bundle, device=device)
        b = steered.bundle
        assert b is not None
        with tqdm(total=len(records), unit="img", desc=f"detectors ({source} labels)") as bar:
            detectors = fit_bundle_detectors(
                steered, records, guidance, source, judge_fn, fpr, holdout, steps,
                batch_size, ridge, progress=bar.update, command=_command(), alpha=alpha,
                work_dir=work_dir)
        b.detectors = detectors.to("cpu")
        b.save(bundle)
    typer.echo(f"added detectors for {len(detectors.concepts)} concepts ({len(records)} runs, "
               f"{source} labels, fpr {fpr}) to {bundle}; held out:")
    for line in report_lines(detectors):
        typer.echo("  " + line)
