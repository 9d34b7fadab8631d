"""`steer bundle tune`: choose a concept's counterfactual and default γ on any model.

Registered on the `steer bundle` group by :func:`register`. Heavy modules are imported inside
the command so that `steer --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

COMMAND = "tune"


def register(bundle_app: typer.Typer) -> None:
    """Add `tune` to the `steer bundle` group (once, however often called)."""
    if any(c.name == COMMAND for c in bundle_app.registered_commands):
        return
    bundle_app.command(COMMAND)(bundle_tune)


def _candidates(specs: list[str]) -> dict[str, Path]:
    """LABEL=FILE options as a dict, refusing malformed or repeated labels."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name.strip() or not file.strip():
            raise typer.BadParameter(f"{spec!r}: write LABEL=PAIRS.jsonl, e.g. "
                                     "green=pairs/red-green.jsonl", param_hint="--candidate")
        if name in out:
            raise typer.BadParameter(f"label {name!r} given twice", param_hint="--candidate")
        out[name.strip()] = Path(file.strip())
    return out


def bundle_tune(
    bundle: Path = typer.Argument(..., help="Steering bundle with detectors (rewritten in "
                                  "place with the chosen swap and γ)."),
    pipeline: Path = typer.Option(..., help="The SD-1.x pipeline folder the bundle is for."),
    concept: str = typer.Option(..., help="The bundle concept to tune."),
    candidate: list[str] = typer.Option(..., help="LABEL=PAIRS.jsonl, repeatable: one "
                                        "candidate counterfactual, its pairs {\"prompt\", "
                                        "\"counterfactual\", \"seed\"} a line."),
    prompts: Path = typer.Option(..., help="Tuning prompts, {\"prompt\", \"seed\"} a line: "
                                 "some that show the concept, most that do not."),
    judge: str | None = typer.Option(None, help="module:callable judging images: "
                                     "judge(images) -> list of sets of concept names "
                                     "(default: the bundle's detectors)."),
    gammas: str = typer.Option("1,1.5,2,3", help="Comma list of γ to try (within the "
                               "concept's range)."),
    rounds: int = typer.Option(1, min=0, max=10, help="On-policy rounds of each fit."),
    steps: int | None = typer.Option(None, help="Denoising steps (default: the bundle's)."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    batch_size: int = typer.Option(32, min=1, help="Images per pipeline call."),
    target: float = typer.Option(0.95, min=0.0, max=1.0, help="Removal a point must reach "
                                 "to be preferred."),
    work_dir: Path | None = typer.Option(None, help="Fits and judged runs, kept so a rerun "
                                         "resumes [default: BUNDLE/../tune-work/CONCEPT]."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
) -> None:
    """Fit each candidate counterfactual's swap, measure removal and retention at each γ on
    the tuning prompts (gated by the detectors, as served), and write the best swap and γ
    into the bundle (report in BUNDLE/TUNE.json). Resumable."""
    from tqdm import tqdm

    from steering.pipeline import SteeredPipeline
    from training.bundle_cli import _user_errors
    from training.detector_fit import load_judge
    from training.translation_fit import load_pairs
    from training.tune import TuneSettings, adopt, load_prompts, tune_concept, write_report

    files = _candidates(candidate)
    try:
        values = tuple(float(g) for g in gammas.split(",") if g.strip())
    except ValueError as e:
        raise typer.BadParameter(f"{gammas!r} is not a comma list of numbers",
                                 param_hint="--gammas") from e
    if not values:
        raise typer.BadParameter("give at least one γ", param_hint="--gammas")
    with _user_errors():
        judge_fn = load_judge(judge) if judge is not None else None
        pairs = {name: load_pairs(path) for name, path in files.items()}
        tuning = load_prompts(prompts)
        steered = SteeredPipeline.from_pretrained(pipeline, bundle, device=device)
        b = steered.bundle
        assert b is not None
        settings = TuneSettings(values, steps or b.manifest.steps, guidance, rounds,
                                batch_size, target, device)
        where = work_dir or bundle.resolve().parent / "tune-work" / concept
        total = sum(len(p) * (2 + rounds) for p in pairs.values())
        with tqdm(total=total, unit="img", desc=f"tune {concept}: fits") as bar:
            report = tune_concept(steered, concept, pairs, tuning, where, settings, judge_fn,
                                  log=tqdm.write, progress=bar.update)
        adopt(b, report)
        b.save(bundle)
        write_report(bundle, report)
    if not report["reaches_target"]:
        typer.echo(f"warning: no point reached removal {target:g}; kept the best", err=True)
    c = report["chosen"]
    typer.echo(f"{concept}: counterfactual {c['candidate']!r} at γ {c['gamma']:g} — removal "
               f"{c['removal']['value']}, kept {c['kept']['value']}, untouched "
               f"{c['untouched']['value']}, retained {c['retained']['value']}; written to "
               f"{bundle} (every point in {bundle / 'TUNE.json'})")
