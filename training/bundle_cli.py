"""`steer importance`, `steer export`, `steer bundle import|export --format sparsify` and
`steer bundle fit-swap` (a learned swap, bundle format 3) and `steer bundle fit-gate` (the
gate's learned read-out, format 4).

Heavy modules (torch, diffusers, sparsify files) are imported inside the commands so that
`steer --help` stays fast.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

bundle_app = typer.Typer(help="Move SAEs between steering bundles and other tools' layouts.",
                         no_args_is_help=True)

FORMATS = ("sparsify",)


def register(root: typer.Typer) -> None:
    """Add `importance`, `export` and the `bundle` group to the root `steer` app."""
    root.command("importance")(importance)
    root.command("export")(export)
    root.add_typer(bundle_app, name="bundle")
    from training.detector_cli import register as add_fit_detector
    from training.tune_cli import register as add_tune

    add_fit_detector(bundle_app)
    add_tune(bundle_app)


def _command() -> str:
    return shlex.join(["steer", *sys.argv[1:]])


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the library's named errors (bad folder, store, bundle, spec) into one-line exits."""
    from training.activations.store import StoreError

    try:
        yield
    except (ValueError, OSError, StoreError) as e:
        raise _fail(str(e)) from e


def _spec(concepts: Path | None, gamma: float | None, gamma_range: tuple[float, float] | None,
          percentile: float | None) -> Any:
    """The ConceptsSpec of a --concepts file with the command line's defaults on top."""
    from training.export import ConceptsSpec

    spec = ConceptsSpec.load(concepts) if concepts is not None else ConceptsSpec()
    return spec.with_defaults(default_gamma=gamma, gamma_range=gamma_range,
                              default_percentile=percentile)


_CONCEPTS_HELP = ("JSON/TOML file of steering defaults: tables 'defaults', 'kinds.KIND' and "
                  "'concepts.NAME' of default_gamma, gamma_range, default_percentile.")


def importance(
    sae: Path | None = typer.Option(None, help="SAE folder (cfg.json + sae.safetensors)."),
    store: Path | None = typer.Option(None, help="Concept-labelled activation store."),
    out: Path = typer.Option(..., help="tables.safetensors to write (with --add-concept: the "
                             "new bundle folder)."),
    plots: Path | None = typer.Option(None, help="Folder for one heat-map PNG per concept."),
    top: int = typer.Option(16, min=1, help="Features per heat map."),
    batch_rows: int = typer.Option(8192, min=1, help="Tokens encoded per SAE call."),
    add_concept: str | None = typer.Option(
        None, "--add-concept", help="Add this concept to --bundle from --prompts instead."),
    kind: str | None = typer.Option(None, help="Kind of the added concept (e.g. colour)."),
    bundle: Path | None = typer.Option(None, help="Bundle to add the concept to."),
    pipeline: Path | None = typer.Option(None, help="The bundle's diffusers pipeline folder."),
    prompts: Path | None = typer.Option(None, help="JSONL prompts of the new concept (and "
                                        "optionally of other concepts of its kind)."),
    steps: int | None = typer.Option(None, min=1, help="Collection step count (default: "
                                     "found from the bundle's timesteps)."),
    guidance: float = typer.Option(7.5, min=0.0),
    size: int | None = typer.Option(None, help="Image side in pixels (default: the UNet's)."),
    batch_size: int = typer.Option(4, min=1, help="Prompts per pipeline call."),
    concepts: Path | None = typer.Option(None, help=_CONCEPTS_HELP),
    gamma: float | None = typer.Option(None, help="Default γ of the added concept."),
    gamma_range: tuple[float, float] | None = typer.Option(None, help="γ range LO HI."),
    percentile: float | None = typer.Option(None, help="Default percentile."),
    device: str = typer.Option("cpu", help="cpu or cuda:N."),
) -> None:
    """Per-timestep concept feature scores and means, or add a concept to a bundle.

    steer importance --sae DIR --store DIR --out tables.safetensors [--plots DIR]

    steer importance --add-concept NAME --kind K --bundle DIR --pipeline DIR --prompts FILE
    --out DIR
    """
    if add_concept is not None:
        missing = [f"--{n}" for n, v in (("kind", kind), ("bundle", bundle),
                                         ("pipeline", pipeline), ("prompts", prompts)) if v is None]
        if missing:
            raise _fail(f"--add-concept needs {', '.join(missing)}")
        with _user_errors():
            _add_concept(add_concept, kind, bundle, pipeline, prompts, out, steps, guidance,
                         size, batch_size, _spec(concepts, gamma, gamma_range, percentile),
                         device)
        return
    if sae is None or store is None:
        raise _fail("pass --sae and --store (or --add-concept NAME ... to extend a bundle)")
    from steering.sae import TopKSAE
    from training.activations.store import ActivationStore
    from training.importance import compute_importance, write_heatmaps

    with _user_errors():
        model = TopKSAE.from_pretrained(sae, device=device).eval().requires_grad_(False)
        tables = compute_importance(model, ActivationStore.open(store), batch_rows=batch_rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        tables.save(out)
    typer.echo(f"wrote {out}: {tables.num_concepts} concepts × {tables.num_steps} steps × "
               f"{tables.num_latents} features")
    if plots is not None:
        with _user_errors():
            paths = write_heatmaps(tables, plots, top=top)
        typer.echo(f"wrote {len(paths)} heat map(s) to {plots}")


def _add_concept(name: str, kind: str, bundle: Path, pipeline: Path, prompts: Path, out: Path,
                 steps: int | None, guidance: float, size: int | None, batch_size: int,
                 spec: Any, device: str) -> None:
    from steering.pipeline import SteeredPipeline
    from training.export import add_concept

    if not (Path(pipeline) / "model_index.json").is_file():
        raise _fail(f"{pipeline} is not a diffusers pipeline folder (no model_index.json)")
    pipe = SteeredPipeline.from_pretrained(pipeline, device=device).pipe
    new = add_concept(bundle, pipe, prompts, out, name, kind, steps=steps, guidance=guidance,
                      size=size, batch_size=batch_size, spec=spec, command=_command())
    typer.echo(f"wrote {out}: {len(new.concept_names)} concepts ({name!r} added)")


def export(
    sae: Path = typer.Option(..., help="SAE folder (cfg.json + sae.safetensors)."),
    importance: Path = typer.Option(..., help="tables.safetensors from `steer importance`."),
    store: Path = typer.Option(..., help="The store the tables came from (fingerprint, "
                               "scheduler, hook point, concept kinds)."),
    out: Path = typer.Option(..., help="Bundle folder to write."),
    concepts: Path | None = typer.Option(None, help=_CONCEPTS_HELP),
    gamma: float | None = typer.Option(None, help="Default γ for every concept."),
    gamma_range: tuple[float, float] | None = typer.Option(None, help="γ range LO HI."),
    percentile: float | None = typer.Option(None, help="Default feature percentile."),
    closed_kind: list[str] = typer.Option(
        [], "--closed-kind", help="A kind in which every image holds exactly one concept "
        "(e.g. colour); suppressing all of its concepts is then refused. Repeatable."),
    storage_dtype: str = typer.Option("float16", help="float16 (half the size; loaded back "
                                      "to float32) or float32: how the SAE and the tables "
                                      "are stored."),
) -> None:
    """Write a steering bundle (manifest, SAE, importance tables) from an SAE and its tables."""
    import torch

    from training.export import export_bundle

    if storage_dtype not in ("float16", "float32"):
        raise _fail(f"--storage-dtype {storage_dtype!r}: use float16 or float32")
    with _user_errors():
        bundle = export_bundle(sae, importance, store, out,
                               _spec(concepts, gamma, gamma_range, percentile),
                               command=_command(), closed_kinds=closed_kind,
                               storage_dtype=getattr(torch, storage_dtype))
    typer.echo(f"wrote bundle {out}: {len(bundle.concept_names)} concepts, "
               f"{bundle.manifest.steps} steps, n={bundle.manifest.n_latents}")


@bundle_app.command("fit-swap")
def bundle_fit_swap(
    bundle: Path = typer.Argument(..., help="Steering bundle to add the learned swap to "
                                  "(rewritten in place)."),
    pipeline: Path = typer.Option(..., help="The SD-1.x pipeline folder the bundle is for."),
    concept: str = typer.Option(..., help="The bundle concept to swap away."),
    anchor: str | None = typer.Option(None, help="The bundle concept to swap it for (same "
                                      "kind); with --prompts its word replaces the concept's."),
    prompts: Path | None = typer.Option(None, help="Text file, one prompt per line, each "
                                        "naming the concept; the twin names the anchor "
                                        "instead."),
    pairs: Path | None = typer.Option(None, help="JSONL file, one pair a line: {\"prompt\": "
                                      "..., \"counterfactual\": ..., \"seed\": ...}; the "
                                      "counterfactual is any prompt (instead of --prompts)."),
    anchor_label: str | None = typer.Option(None, help="With --pairs: the label stored as "
                                            "the swap's anchor when it is not a bundle concept "
                                            "(default: --anchor, else 'counterfactual')."),
    seed_base: int = typer.Option(0, help="Seed of the first prompt (then +1 per line)."),
    steps: int | None = typer.Option(None, help="Denoising steps (default: the bundle's)."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    batch_size: int = typer.Option(8, min=1, help="Prompts per pipeline call."),
    rounds: int = typer.Option(1, min=0, help="On-policy rounds after the paired fit."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]: runs the pipeline and solves "
                               "the fit."),
    dtype: str = typer.Option("float32", help="The fit's solver precision: float32 or "
                              "float64."),
    pipeline_dtype: str = typer.Option("float32", help="float32, float16 or bfloat16 (GPU)."),
    work_dir: Path | None = typer.Option(None, help="Folder for the recorded codes and solved "
                                         "rows; rerun with it to resume (default: temporary)."),
) -> None:
    """Learn the swap concept → anchor from paired runs and make the bundle's recipe the gated
    translate recipe (format 3; concepts without a swap keep replacement). The concept's
    default γ becomes 1 (the swap as fitted)."""
    import torch
    from tqdm import tqdm

    from steering.pipeline import SteeredPipeline
    from steering.recipe import GATED_TRANSLATE
    from steering.translation import TranslationTables
    from training.translation_fit import fit_translation, load_pairs, pairs_from_prompts

    if (prompts is None) == (pairs is None):
        raise _fail("pass --prompts (one prompt per line; the anchor's word is swapped in) or "
                    "--pairs (JSONL of prompt, counterfactual, seed), not both")
    if prompts is not None and anchor is None:
        raise _fail("--prompts needs --anchor (the bundle concept whose word replaces the "
                    "concept's); for other counterfactuals use --pairs")
    if prompts is not None and anchor_label is not None:
        raise _fail("--anchor-label goes with --pairs; with --prompts the anchor is --anchor")
    if anchor is not None and anchor_label is not None:
        raise _fail("pass --anchor or --anchor-label, not both")
    if anchor_label is not None and not anchor_label.strip():
        raise _fail("--anchor-label is empty; name what the counterfactuals show")
    if dtype not in ("float32", "float64"):
        raise _fail(f"--dtype {dtype!r}: use float32 or float64")
    if pipeline_dtype not in ("float32", "float16", "bfloat16"):
        raise _fail(f"--pipeline-dtype {pipeline_dtype!r}: use float32, float16 or bfloat16")
    with _user_errors():
        steered = SteeredPipeline.from_pretrained(pipeline, bundle, device=device,
                                                  dtype=getattr(torch, pipeline_dtype))
        b = steered.bundle
        assert b is not None
        if concept not in b.concept_names:
            raise ValueError(f"--concept {concept!r} is not a concept of the bundle "
                             f"({', '.join(b.concept_names)})")
        spec = b.concept(concept)
        if anchor is not None:
            kin = b.concepts_of_kind(spec.kind)
            if anchor not in kin or concept == anchor:
                raise ValueError(f"--anchor {anchor!r}: the anchor must be another concept of "
                                 f"{concept!r}'s kind ({spec.kind}): {', '.join(kin)}"
                                 + ("" if pairs is None else "; for a label that is no bundle "
                                    "concept use --anchor-label"))
        label = anchor or anchor_label or "counterfactual"
        if prompts is not None:
            lines = [t.strip() for t in prompts.read_text().splitlines() if t.strip()]
            chosen = pairs_from_prompts(lines, concept, label, seed_base)
        else:
            assert pairs is not None
            chosen = load_pairs(pairs)
        with tqdm(total=len(chosen) * (2 + rounds), unit="img", desc=f"{concept} → {label}"
                  ) as bar:
            swap = fit_translation(steered, label, chosen, steps or b.manifest.steps,
                                   guidance, batch_size, rounds, progress=bar.update,
                                   work_dir=work_dir, device=device,
                                   dtype=getattr(torch, dtype))
        m = b.manifest
        have = b.translations.concepts if b.translations is not None else {}
        b.translations = TranslationTables(m.n_latents, m.d_in, m.steps,
                                           {**have, concept: swap}).to("cpu")
        m.recipe = GATED_TRANSLATE
        lo, hi = spec.gamma_range
        m.concepts = [c.replace(default_gamma=min(max(1.0, lo), hi))
                      if c.name == concept else c for c in m.concepts]
        b.save(bundle)
    typer.echo(f"added the learned swap {concept} → {label} ({len(chosen)} prompt pairs, "
               f"{len(swap.row)} feature rows) to {bundle}; recipe: gated translate")


@bundle_app.command("fit-gate")
def bundle_fit_gate(
    bundle: Path = typer.Argument(..., help="Steering bundle to add the gate's probe to "
                                  "(rewritten in place)."),
    pipeline: Path = typer.Option(..., help="The SD-1.x pipeline folder the bundle is for."),
    prompts: Path = typer.Option(..., help="Labelled prompts, JSONL as for `steer collect`: "
                                 "prompt, concepts (kind -> concept), seed; every bundle "
                                 "concept named by some."),
    steps: int | None = typer.Option(None, help="Denoising steps (default: the bundle's)."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    batch_size: int = typer.Option(8, min=1, help="Prompts per pipeline call."),
    ridge: float = typer.Option(1.0, min=0.0, help="Ridge strength (per run, on "
                                "standardised codes)."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]."),
) -> None:
    """Fit the detection gate's learned read-out (format 4) on unedited runs of labelled
    prompts; gated recipes then detect with it instead of nearest-centroid."""
    from tqdm import tqdm

    from steering.pipeline import SteeredPipeline
    from training.activations.prompts import load_prompts
    from training.gate_probe_fit import fit_bundle_gate

    with _user_errors():
        records = load_prompts(prompts)
        steered = SteeredPipeline.from_pretrained(pipeline, bundle, device=device)
        b = steered.bundle
        assert b is not None
        with tqdm(total=len(records), unit="img", desc="gate probe") as bar:
            probe = fit_bundle_gate(steered, [r.prompt for r in records],
                                    [r.seed for r in records], [r.concepts for r in records],
                                    guidance, steps, batch_size, ridge, progress=bar.update)
        b.gate_probe = probe.to("cpu")
        b.save(bundle)
    typer.echo(f"added the gate's probe ({len(records)} runs) to {bundle}")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise _fail(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")


@bundle_app.command("import")
def bundle_import(
    src: Path = typer.Argument(..., help="sparsify / SAeUron checkpoint (SAE folder or a "
                               "root with one folder per hookpoint)."),
    out: Path = typer.Option(..., help="SAE folder to write (then `steer importance`)."),
    fmt: str = typer.Option("sparsify", "--format", help="Source layout."),
    hookpoint: str | None = typer.Option(None, help="Hookpoint folder to take from a root."),
) -> None:
    """Import an SAE trained elsewhere as an SAE folder this project reads."""
    _check_format(fmt)
    from training.sparsify_format import import_sparsify

    with _user_errors():
        sae = import_sparsify(src, out, hookpoint=hookpoint)
    typer.echo(f"wrote {out}: d_in={sae.d_in}, n={sae.num_latents}, k={sae.k}")


@bundle_app.command("export")
def bundle_export(
    bundle: Path = typer.Argument(..., help="Steering bundle (or bare SAE folder)."),
    out: Path = typer.Option(..., help="Checkpoint root to write (<out>/<hookpoint>/)."),
    fmt: str = typer.Option("sparsify", "--format", help="Target layout."),
    hookpoint: str | None = typer.Option(None, help="Folder name (default: the bundle's "
                                         "hook point)."),
) -> None:
    """Export a bundle's SAE for `sparsify.SparseCoder.load_from_disk`."""
    _check_format(fmt)
    from training.sparsify_format import export_sparsify

    with _user_errors():
        folder = export_sparsify(bundle, out, hookpoint=hookpoint)
    typer.echo(f"wrote {folder} (load with SparseCoder.load_from_disk({str(folder)!r}))")
