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
