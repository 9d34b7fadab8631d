"""The `steer` command line: the core's own commands plus groups found through entry points.

Groups (training's ``toyworld``…, later the service's) register under the ``steer.commands``
entry-point group, so this module never imports them by name.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path

import typer

app = typer.Typer(help="sae-steering: steer diffusion models with sparse autoencoders.",
                  no_args_is_help=True)



@app.callback()
def _root() -> None:
    """sae-steering: steer diffusion models with sparse autoencoders."""


# Shipped toy assets, found beside the source tree (editable install / clean clone).
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _default(name: str) -> Path | None:
    path = ASSETS / name
    return path if path.exists() else None


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="What to draw."),
    concept: list[str] = typer.Option(
        [], "--concept", "-c",
        help="Concept edit [+|-]name[:gamma[:percentile]]; + amplifies, default suppresses. "
             "Repeatable; a feature chosen by two concepts takes the first one's edit."),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt", "-n"),
    pipeline: Path | None = typer.Option(
        None, help="Local SD-1.x pipeline folder [default: assets/toy-pipeline]."),
    bundle: Path | None = typer.Option(
        None, help="Steering bundle folder [default: assets/toy-bundle with the toy pipeline]."),
    seed: int = typer.Option(0, help="Image i uses seed + i."),
    steps: int = typer.Option(20, min=1, max=500),
    guidance: float = typer.Option(4.0, min=0.0),
    size: int | None = typer.Option(None, help="Image side in pixels (multiple of 8)."),
    n_images: int = typer.Option(4, "--n-images", min=1, max=64),
    device: str = typer.Option("cpu", help="cpu or cuda:N."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16 (GPU)."),
    out: Path = typer.Option(Path("out"), help="Output folder."),
) -> None:
    """Generate PNGs and grid.png; with concept edits, also the originals and sheet.png."""
    from steering.edits import ConceptEdit, EditError
    from steering.pipeline import GenerationRequest, SteeredPipeline
    from steering.sheet import grid, side_by_side

    if pipeline is None:
        pipeline = _default("toy-pipeline")
        if pipeline is None:
            raise typer.BadParameter("no --pipeline given and assets/toy-pipeline is missing "
                                     "(rebuild it with `steer toyworld build`)")
        # The toy bundle only fits the toy pipeline: another --pipeline needs its own --bundle.
        bundle = bundle or _default("toy-bundle")
    if concept and bundle is None:
        raise typer.BadParameter("concept edits need a steering bundle: pass --bundle")
    if size is not None and size % 8:
        raise typer.BadParameter(f"--size {size} is not a multiple of 8")
    try:
        edits = [ConceptEdit.parse(c) for c in concept]
    except EditError as exc:
        raise typer.BadParameter(str(exc)) from exc
    import torch

    if dtype not in ("float32", "float16", "bfloat16"):
        raise typer.BadParameter(f"--dtype {dtype!r}: use float32, float16 or bfloat16")
    steered = SteeredPipeline.from_pretrained(pipeline, bundle, device=device,
                                              dtype=getattr(torch, dtype))
    request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, edits=edits,
                                seed=seed, steps=steps, guidance=guidance, width=size,
                                height=size, n_images=n_images)
    with typer.progressbar(length=steps, label="steered" if edits else "generating") as bar:
        try:
            result = steered.generate(request, progress=lambda s, t: bar.update(1))
        except EditError as exc:
            raise typer.BadParameter(str(exc), param_hint=f"--{exc.field}") from exc
    out.mkdir(parents=True, exist_ok=True)
    record = {"prompt": prompt, "negative_prompt": negative_prompt, "seeds": result.seeds,
              "steps": steps, "guidance": guidance,
              "edits": [e.to_dict() for e in result.edits], "detection": result.detection}
    stem = "steered" if edits else "image"
    for s, im in zip(result.seeds, result.images, strict=True):
        im.save(out / f"{stem}-{s}.png")
    if edits:
        plain = steered.generate(GenerationRequest(**{**request.__dict__, "edits": ()}))
        for s, im in zip(plain.seeds, plain.images, strict=True):
            im.save(out / f"original-{s}.png")
        side_by_side(plain.images, result.images).save(out / "sheet.png")
        record["detection_original"] = plain.detection
    else:
        grid(result.images).save(out / "grid.png")
    (out / "result.json").write_text(json.dumps(record, indent=2))
    typer.echo(f"wrote {len(result.images)} image(s) and "
               f"{out / ('sheet.png' if edits else 'grid.png')}")


# Rows of the default gallery: toy-world concepts of each kind, each asked for by its prompt.
TOY_GALLERY_ROWS = (
    "red=a red circle on a plain background",
    "blue=a blue square on a dotted background",
    "triangle=a yellow triangle on a plain background",
    "striped=a green cross on a striped background",
)


@app.command()
def gallery(
    out: Path = typer.Option(Path("docs/images/gallery.png"), help="PNG to write."),
    row: list[str] = typer.Option(
        list(TOY_GALLERY_ROWS), "--row", "-r",
        help="[+]concept=prompt, repeatable (+ amplifies) [default: four toy concepts]."),
    gamma: list[float] = typer.Option([0.0, 1.0, 1.5, 3.0], "--gamma", "-g",
                                      help="Columns; 0 is the unedited image. Repeatable."),
    pipeline: Path | None = typer.Option(
        None, help="Local SD-1.x pipeline folder [default: assets/toy-pipeline]."),
    bundle: Path | None = typer.Option(
        None, help="Steering bundle folder [default: assets/toy-bundle with the toy pipeline]."),
    seed: int = typer.Option(1_200_000, help="Image i of every cell uses seed + i."),
    seeds: int = typer.Option(3, min=1, max=16, help="Images per cell."),
    steps: int = typer.Option(20, min=1, max=500),
    guidance: float = typer.Option(4.0, min=0.0),
    device: str = typer.Option("cpu", help="cpu or cuda:N."),
) -> None:
    """Render a concept × γ grid of steered images (several seeds) as one PNG for the docs."""
    from steering.gallery import GalleryRow, render_gallery
    from steering.pipeline import SteeredPipeline

    if pipeline is None:
        pipeline = _default("toy-pipeline")
        if pipeline is None:
            raise typer.BadParameter("no --pipeline given and assets/toy-pipeline is missing")
        bundle = bundle or _default("toy-bundle")
    if bundle is None:
        raise typer.BadParameter("a gallery needs a steering bundle: pass --bundle")
    try:
        rows = [GalleryRow.parse(r) for r in row]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--row") from exc
    steered = SteeredPipeline.from_pretrained(pipeline, bundle, device=device)
    with typer.progressbar(length=len(rows) * len(gamma), label="gallery") as bar:
        try:
            image = render_gallery(steered, rows, gamma, seed=seed, n_seeds=seeds, steps=steps,
                                   guidance=guidance, progress=lambda d, t: bar.update(1))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    typer.echo(f"wrote {out} ({len(rows)} rows × {len(gamma)} γ × {seeds} seeds)")


def _add_entry_point_groups(root: typer.Typer) -> None:
    """Attach every installed `steer.commands` entry point.

    A Typer app becomes a sub-command group named after the entry point; a plain function
    is called with the root app and adds top-level commands (``steer collect`` …).
    """
    for ep in entry_points(group="steer.commands"):
        try:
            group = ep.load()
            if isinstance(group, typer.Typer):
                root.add_typer(group, name=ep.name)
            else:
                group(root)
        except ImportError as exc:  # an optional extra (e.g. [service]) is not installed
            typer.echo(f"steer: skipping command group {ep.name!r} ({exc})", err=True)


def main() -> None:
    """Entry point of the `steer` program."""
    _add_entry_point_groups(app)
    app()


if __name__ == "__main__":  # `python -m steering.cli …`, e.g. under torchrun
    main()
