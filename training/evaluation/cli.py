"""`steer eval`: the steering-quality comparison (UA / IRA / CRA vs baselines).

Heavy modules (torch, diffusers, matplotlib) are imported inside the command so that
`steer --help` stays fast.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from training.evaluation.run import EvalConfig

SMOKE_CONCEPTS = ("red", "circle")


def register(root: typer.Typer) -> None:
    """Add `steer eval` to the root `steer` app."""
    root.command("eval")(eval_command)


def _list(text: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Parse a comma list (``all`` = every known value), refusing unknown names."""
    if text.strip().lower() == "all":
        return known
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in known]
    if bad or not values:
        raise typer.BadParameter(f"unknown {what} {bad or text!r}; known: {', '.join(known)}")
    return values


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{what} is empty")
    return values


def _command(ctx: typer.Context) -> str:
    """The command line as given (options left at their defaults omitted)."""
    words = ["steer", "eval"]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)  # typer vendors click: compare names
        if param.name not in ctx.params or getattr(source, "name", "DEFAULT") == "DEFAULT":
            continue
        if param.name == "note":  # printed as itself, not as part of the command
            continue
        value = ctx.params[param.name]
        if isinstance(value, bool):
            flags = param.opts if value else param.secondary_opts
            words.append((flags or param.opts)[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


def eval_command(
    ctx: typer.Context,
    pipeline: Path = typer.Option(Path("assets/toy-pipeline"), help="Toy SD pipeline folder."),
    bundle: Path = typer.Option(Path("assets/toy-bundle"), help="Steering bundle folder."),
    classifier: Path = typer.Option(Path("assets/toy-classifier"), help="The judge."),
    work_dir: Path = typer.Option(Path("eval-work"),
                                  help="Cached predictions per cell and results.json (resume "
                                       "from here); --smoke uses <work-dir>/smoke."),
    per_concept: int = typer.Option(400, min=1, max=1000,
                                    help="Held-out UA and IRA prompt/seed pairs per concept "
                                         "(400 gives about ±2 points)."),
    tune_per_concept: int = typer.Option(100, min=1, max=1000,
                                         help="Tuning-split UA and IRA pairs per concept and "
                                              "sweep point."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N] (the classifier stays on CPU)."),
    batch_size: int = typer.Option(64, min=1, help="Images per pipeline call (more on CUDA)."),
    methods: str = typer.Option("all", help="Comma list of none, negative_prompt, sld, "
                                            "saeuron, ours; or all."),
    concepts: str = typer.Option("all", help="Comma list of toy concepts; or all."),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep",
                               help="Run the γ × percentile sweep (tuning split) of saeuron "
                                    "and ours; without it an earlier sweep.json is reused."),
    gammas: str = typer.Option("1,2,3,4", help="Sweep γ values of the plain recipe "
                               "(saeuron); each must lie in the bundle's γ range (the toy "
                               "bundle's is the learned swap's, [0.25, 4])."),
    percentiles: str = typer.Option("98,99,99.5", help="Sweep percentile values."),
    ours_gammas: str = typer.Option("1,1.5,2,3", help="Sweep γ values of ours (the "
                                    "learned swap: γ = 1 applies it as fitted)."),
    ours_percentiles: str = typer.Option("95", help="Sweep percentiles of ours (used only "
                                         "by concepts without a learned swap, which fall "
                                         "back to replacement)."),
    ours_margins: str = typer.Option("0,0.05", help="Sweep detection-gate margins of "
                                     "ours (mean cosine to the kind's best concept; 0 = only "
                                     "images whose nearest concept is the suppressed one)."),
    write_defaults: bool = typer.Option(
        False, "--write-defaults/--no-write-defaults",
        help="Write ours' chosen per-kind (γ, percentile) into the bundle's manifest.json "
             "(re-hashed) before the held-out run."),
    choose_per: str = typer.Option("concept", help="--write-defaults picks ours' point per "
                                   "concept (each has its own learned swap) or per kind."),
    docs: str | None = typer.Option(
        None, help="Folder for results.md and images/eval-*.png; '' skips them "
                   "[default: docs; with --smoke: none]."),
    steps: int = typer.Option(20, min=1, max=500, help="DDIM steps (the bundle's: 20)."),
    guidance: float = typer.Option(4.0, min=0.0, help="Classifier-free guidance scale."),
    synonyms: bool = typer.Option(True, "--synonyms/--no-synonyms",
                                  help="Evaluate prompts naming the concept by a synonym."),
    multi: bool = typer.Option(True, "--multi/--no-multi",
                               help="Evaluate the fixed 2- and 3-concept suppression sets."),
    implicit: bool = typer.Option(
        True, "--implicit/--no-implicit",
        help="Evaluate prompts that leave the concept's kind unnamed, each judged against the "
             "same prompt and seed unedited: removal, false edits, attributes kept."),
    sld_config: str = typer.Option(
        "STRONG", help="diffusers' SafetyConfig for sld: WEAK, MEDIUM, STRONG (the default) or "
                       "MAX."),
    rerun: str = typer.Option("", help="Comma list of methods whose cached cells are "
                                       "ignored (e.g. ours after changing its recipe)."),
    smoke: bool = typer.Option(False, "--smoke",
                               help="Tiny run to check the harness (≤ 60 s on 2 CPU cores): "
                                    "red and circle, 4 UA + 4 IRA pairs each, one sweep point "
                                    "per swept method, 10 steps."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    note: str = typer.Option("", help="A paragraph for results.md under the command, e.g. "
                             "which cells came from an earlier run on another device."),
) -> None:
    """Compare none / negative prompt / SLD / plain SAeUron / ours on held-out toy prompts."""
    from training.evaluation.methods import METHOD_NAMES
    from training.evaluation.prompts import ALL_CONCEPTS
    from training.evaluation.run import EvalConfig

    config = EvalConfig(
        pipeline=pipeline, bundle=bundle, classifier=classifier, work_dir=work_dir,
        per_concept=per_concept, tune_per_concept=tune_per_concept, device=device,
        batch_size=batch_size, methods=_list(methods, METHOD_NAMES, "method(s)"),
        concepts=_list(concepts, ALL_CONCEPTS, "concept(s)"), sweep=sweep,
        gammas=_floats(gammas, "--gammas"), percentiles=_floats(percentiles, "--percentiles"),
        ours_gammas=_floats(ours_gammas, "--ours-gammas"),
        ours_percentiles=_floats(ours_percentiles, "--ours-percentiles"),
        ours_margins=_floats(ours_margins, "--ours-margins"),
        write_defaults=write_defaults, choose_per=choose_per, steps=steps, guidance=guidance,
        synonyms=synonyms, multi=multi, implicit=implicit,
        rerun=_list(rerun, METHOD_NAMES, "method(s)") if rerun else (),
        progress=progress, command=_command(ctx), smoke=smoke, sld_config=sld_config.upper(),
        note=note)
    if smoke:
        if write_defaults:
            raise typer.BadParameter("--smoke never writes defaults into a bundle",
                                     param_hint="--write-defaults")
        config.work_dir = work_dir / "smoke"
        config.concepts, config.per_concept, config.tune_per_concept = SMOKE_CONCEPTS, 4, 4
        config.gammas, config.percentiles, config.steps = (4.0,), (99.0,), 10
        config.ours_gammas, config.ours_percentiles, config.ours_margins = (1.5,), (95.0,), (0.1,)
        config.multi_sets = (SMOKE_CONCEPTS,)
    docs_dir = Path("docs") if docs is None and not smoke else (Path(docs) if docs else None)
    try:
        config.validate()
        run_eval(config, docs_dir)
    except (ValueError, OSError) as e:
        typer.echo(f"steer eval: {e}", err=True)
        raise typer.Exit(2) from e


def run_eval(config: EvalConfig, docs_dir: Path | None) -> dict:
    """Load pipeline, bundle and judge, run the evaluation, write results and print a summary."""
    from steering.pipeline import SteeredPipeline
    from training.evaluation.prompts import ua_set
    from training.evaluation.report import (
        GRID_PNG,
        PARETO_PNG,
        grid_plot,
        pareto_plot,
        summary_lines,
        write_markdown,
        write_results_json,
    )
    from training.evaluation.run import Evaluation
    from training.toyworld.classifier import AttributeClassifier

    steered = SteeredPipeline.from_pretrained(config.pipeline, config.bundle, device=config.device)
    judge = AttributeClassifier.from_pretrained(Path(config.classifier))
    evaluation = Evaluation(config, steered, judge, log=typer.echo)
    results = evaluation.run()
    out = write_results_json(results, Path(config.work_dir) / "results.json")
    written = [str(out)]
    if docs_dir is not None:
        images = []
        pareto = pareto_plot(results, docs_dir / "images" / PARETO_PNG)
        if pareto is not None:
            images.append(f"images/{PARETO_PNG}")
        prompts = {c: ua_set(c, 1).items[0].prompt for c in config.concepts}
        grid = grid_plot(evaluation.grid_cells(), prompts, docs_dir / "images" / GRID_PNG)
        if grid is not None:
            images.append(f"images/{GRID_PNG}")
        md = write_markdown(results, docs_dir / "results.md", images)
        written += [str(md)] + [str(docs_dir / i) for i in images]
    typer.echo("\n".join(summary_lines(results)))
    typer.echo(f"{results['images_generated']} images generated in "
               f"{results['timings']['total_s']:.1f} s; wrote {', '.join(written)}")
    return results
