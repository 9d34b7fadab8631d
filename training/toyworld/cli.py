"""`steer toyworld …`: build the toy world's pipeline and classifier."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="The toy world: a small SD-architecture pipeline on labelled shapes.",
                  no_args_is_help=True)


@app.command()
def build(
    out: Path = typer.Option(Path("assets"), help="Where the outputs and BUILD.md go."),
    work_dir: Path = typer.Option(Path("toyworld-build"), help="Checkpoints (resume from here)."),
    seed: int = typer.Option(0, help="Seed of every stage."),
    vae_steps: int = typer.Option(800),
    classifier_steps: int = typer.Option(800),
    unet_steps: int = typer.Option(5000),
    unet_scenes: int = typer.Option(32768, help="Rendered scenes the UNet trains on."),
    eval_full: int = typer.Option(200, help="Held-out prompt/seed pairs with full captions."),
    eval_per_prompt: int = typer.Option(16, help="Seeds per single-attribute/synonym prompt."),
    eval_classifier: int = typer.Option(2000, help="Held-out renders judging the classifier."),
) -> None:
    """Train everything from a seed (about an hour on 2 CPU cores); rerun to resume."""
    from training.toyworld.build import build as run_build

    results = run_build(out, work_dir, seed, vae_steps, classifier_steps, unet_steps,
                        unet_scenes, eval_full, eval_per_prompt, eval_classifier)
    full = results["generation"]["full_caption"]
    typer.echo(f"built {out}: full-caption shape/colour/background "
               f"{full['shape']:.3f}/{full['colour']:.3f}/{full['background']:.3f}; "
               f"see {out / 'BUILD.md'}")


@app.command()
def bundle(
    pipeline: Path = typer.Option(Path("assets/toy-pipeline"), help="The toy pipeline folder."),
    classifier: Path = typer.Option(Path("assets/toy-classifier"), help="The judge."),
    out: Path = typer.Option(Path("assets/toy-bundle"), help="Bundle folder to write."),
    work_dir: Path = typer.Option(Path("toyworld-build/bundle"),
                                  help="Stores, SAE checkpoints, tables (resume from here)."),
    preset: str = typer.Option("toy", help="SAE training preset (steer train --preset)."),
    train_steps: int = typer.Option(None, help="Override the preset's step count."),
    seed: int = typer.Option(0, help="Seed of the SAE training."),
    check_count: int = typer.Option(8, help="Seeds per concept in the removal check."),
) -> None:
    """Run the training chain on the toy world into a steering bundle; rerun to resume."""
    from training.toyworld.bundle_build import build_bundle
    from training.toyworld.bundle_report import write_bundle_report

    results = build_bundle(pipeline, classifier, out, work_dir, preset, train_steps, seed,
                           check_count)
    write_bundle_report(out, results)
    h = results["heldout"]
    typer.echo(f"built {out}: held-out FVU {h['fvu']:.3f}, L0 {h['l0']:.2f}, "
               f"dead {h['dead_pct']:.2f} %; see {out / 'BUILD.md'}")


@app.command()
def translations(
    pipeline: Path = typer.Option(Path("assets/toy-pipeline"), help="The toy pipeline folder."),
    classifier: Path = typer.Option(Path("assets/toy-classifier"), help="The judge."),
    bundle_dir: Path = typer.Option(Path("assets/toy-bundle"), "--bundle",
                                    help="Bundle to add the learned swaps to (rewritten)."),
    work_dir: Path = typer.Option(Path("toyworld-build/translations"),
                                  help="One file per (concept, anchor) fit; resume from here."),
    concepts: str = typer.Option("", help="Comma list of concepts (default: all)."),
    n_fit: int = typer.Option(64, min=1, max=1000, help="Prompt pairs per swap fit."),
    n_check: int = typer.Option(32, min=1, max=1000, help="Pairs judged per anchor."),
    rounds: int = typer.Option(1, min=0, max=10, help="On-policy rounds after each paired "
                               "fit."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
) -> None:
    """Learn each concept's swap to every other concept of its kind, keep the best anchor, and
    switch the bundle to the gated translate recipe (bundle format 3)."""
    from steering.pipeline import SteeredPipeline
    from training.toyworld.classifier import AttributeClassifier
    from training.toyworld.translations import (
        adopt_translations,
        build_translations,
        write_report,
    )

    steered = SteeredPipeline.from_pretrained(pipeline, bundle_dir, device=device)
    judge = AttributeClassifier.from_pretrained(classifier)
    names = [c.strip() for c in concepts.split(",") if c.strip()] or None
    tables, report = build_translations(steered, judge, work_dir, names, n_fit, n_check,
                                        log=typer.echo, rounds=rounds)
    assert steered.bundle is not None
    adopt_translations(steered.bundle, tables)
    steered.bundle.save(bundle_dir)
    write_report(bundle_dir, report)
    typer.echo(f"wrote {len(tables.concepts)} learned swaps into {bundle_dir} (recipe "
               f"translate, gated); see {bundle_dir / 'TRANSLATIONS.md'}")


@app.command("gate-probe")
def gate_probe(
    pipeline: Path = typer.Option(Path("assets/toy-pipeline"), help="The toy pipeline folder."),
    bundle_dir: Path = typer.Option(Path("assets/toy-bundle"), "--bundle",
                                    help="Bundle to add the gate's probe to (rewritten)."),
    seeds_per_combo: int = typer.Option(3, min=1, max=100, help="Runs per shape × colour × "
                                        "background × template (48 × 3 captions)."),
    batch_size: int = typer.Option(64, min=1, help="Prompts per pipeline call."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
) -> None:
    """Fit the detection gate's probe on unedited runs of every caption (seeds 3,200,000+),
    report its accuracy per step on one more run of each (seeds 3,300,000+), and add it to the
    bundle (bundle format 4)."""
    from tqdm import tqdm

    from steering.pipeline import SteeredPipeline
    from training.gate_probe_fit import fit_bundle_gate, probe_accuracy, record_mean_codes
    from training.toyworld.captions import N_TEMPLATES
    from training.toyworld.prompt_sets import GATE_PROBE_SEED_BASE, canonical_prompts
    from training.toyworld.world import KINDS

    templates = tuple(range(N_TEMPLATES))
    fit = canonical_prompts(seeds_per_combo, GATE_PROBE_SEED_BASE, templates)
    check = canonical_prompts(1, GATE_PROBE_SEED_BASE + 100_000, templates)
    steered = SteeredPipeline.from_pretrained(pipeline, bundle_dir, device=device)
    assert steered.bundle is not None
    with tqdm(total=len(fit) + len(check), unit="img", desc="gate probe") as bar:
        probe = fit_bundle_gate(steered, [r["prompt"] for r in fit], [r["seed"] for r in fit],
                                [r["concepts"] for r in fit], guidance=4.0,
                                batch_size=batch_size, progress=bar.update)
        codes = record_mean_codes(steered, [r["prompt"] for r in check],
                                  [r["seed"] for r in check], steered.bundle.manifest.steps,
                                  4.0, batch_size, bar.update)
    for kind, per_step in probe_accuracy(probe, codes, [r["concepts"] for r in check],
                                         KINDS).items():
        typer.echo(f"{kind}: step 0 {per_step[0]:.3f}, mean over steps "
                   f"{sum(per_step) / len(per_step):.3f}, lowest {min(per_step):.3f} "
                   f"({len(check)} check runs)")
    steered.bundle.gate_probe = probe.to("cpu")
    steered.bundle.save(bundle_dir)
    typer.echo(f"added the gate's probe ({len(fit)} runs) to {bundle_dir}")


@app.command("chain-data")
def chain_data(
    out: Path = typer.Option(Path("toyworld-build/chain-data"), help="Folder for the files."),
    concepts: str = typer.Option("", help="Comma list of concepts (default: all)."),
    pairs: int = typer.Option(64, min=1, max=1000, help="Counterfactual pairs per (concept, "
                              "candidate)."),
    runs: int = typer.Option(1536, min=1, max=100_000, help="Detector runs (a third name every "
                             "kind, a third leave one kind unnamed, a third two)."),
    tune: int = typer.Option(96, min=3, max=5000, help="Tuning prompts per concept."),
) -> None:
    """Write the toy world's inputs of the generic bundle commands: pairs/C-CF.jsonl for
    `steer bundle fit-swap --pairs` and `tune`, runs.jsonl for `steer bundle fit-detector`,
    tune/C.jsonl for `steer bundle tune --prompts`."""
    from training.toyworld.chain_data import (
        candidates_of,
        detector_rows,
        pair_rows,
        tune_rows,
        write_jsonl,
    )
    from training.toyworld.world import KINDS

    names = [c.strip() for c in concepts.split(",") if c.strip()] or \
        [c for ms in KINDS.values() for c in ms]
    try:
        files = 0
        for concept in names:
            for cf in candidates_of(concept):
                write_jsonl(out / "pairs" / f"{concept}-{cf}.jsonl", pair_rows(concept, cf, pairs))
                files += 1
            write_jsonl(out / "tune" / f"{concept}.jsonl", tune_rows(concept, tune))
            files += 1
        write_jsonl(out / "runs.jsonl", detector_rows(runs))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from e
    typer.echo(f"wrote {files + 1} files under {out}")
