"""Writes assets/BUILD.md: the command, the time it took and the measured quality."""

from __future__ import annotations

from pathlib import Path


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _runs(runs: list[dict]) -> list[str]:
    """Lines listing the invocations of a resumed build (nothing for a single run)."""
    if len(runs) <= 1:
        return []
    lines = ["This build was resumed; its runs, in order (a run with more steps than the last "
             "continued training from the last checkpoint with its LR schedule stretched to the "
             "new total):", ""]
    for run in runs:
        args = ", ".join(f"{k} {v}" for k, v in run.items() if k not in ("started", "note"))
        lines.append(f"- {run['started']}: {args}" + (f" — {run['note']}" if "note" in run else ""))
    return [*lines, ""]


def write_build_report(out_dir: Path, r: dict) -> None:
    """Render the build's results (as saved in toyworld-eval.json) to BUILD.md."""
    steps = r["steps"]
    secs = r["seconds"]
    gen = r["generation"]
    lines = [
        "# Toy world build",
        "",
        "Rebuilt from scratch (resumable: rerun the same command after an interruption) with:",
        "",
        "    steer toyworld build --out assets --work-dir toyworld-build "
        f"--seed {r['seed']} --vae-steps {steps['vae']} "
        f"--classifier-steps {steps['classifier']} --unet-steps {steps['unet']} "
        f"--unet-scenes {steps['unet_scenes']}",
        "",
        "Time on this machine (2 CPU cores): "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items())
        + f"; total {sum(secs.values()) / 60:.1f} min.",
        "",
        *_runs(r.get("runs", [])),
        f"Sizes: `toy-pipeline/` {_dir_mb(out_dir / 'toy-pipeline'):.1f} MB (fp16), "
        f"`toy-classifier/` {_dir_mb(out_dir / 'toy-classifier'):.1f} MB (fp16).",
        "",
        f"## Attribute classifier (held-out renders, {r['classifier_eval_n']:,} each)",
        "",
        "| set | shape | colour | background |",
        "|---|---|---|---|",
    ]
    for name, acc in r["classifier_accuracy"].items():
        lines.append(f"| {name} | {_pct(acc['shape'])} | {_pct(acc['colour'])} "
                     f"| {_pct(acc['background'])} |")
    s = r["sampling"]
    full = gen["full_caption"]
    lines += [
        "",
        f"## Generated images ({s['scheduler']} {s['steps']} steps, guidance {s['guidance']}, "
        "judged by the classifier)",
        "",
        "Full canonical captions, 200 held-out prompt/seed pairs — share showing the prompted "
        f"attribute: shape {_pct(full['shape'])}, colour {_pct(full['colour'])}, "
        f"background {_pct(full['background'])}.",
        "",
        "Prompts naming one attribute only (16 seeds each; e.g. \"a blue shape\", \"a triangle\", "
        "\"a shape on a striped background\"):",
        "",
        "| concept | rate |",
        "|---|---|",
    ]
    lines += [f"| {c} | {_pct(v)} |" for c, v in gen["single_attribute"].items()]
    lines += ["", "Synonyms only (16 seeds each; e.g. \"a crimson shape\", \"a box\"):", "",
              "| word | rate |", "|---|---|"]
    lines += [f"| {c} | {_pct(v)} |" for c, v in gen["synonym"].items()]
    lines += [
        "",
        "## Negative prompt of the concept word (the baseline steering must beat)",
        "",
        "Rate of the colour in the image, 16 seeds each. *asked*: the prompt names the colour "
        "(\"a red circle on a plain background\"); *unasked*: it does not (\"a circle on a plain "
        "background\", chance 25 %). *plain*: no negative prompt; *negative*: "
        "`negative_prompt=\"red\"`.",
        "",
        "| colour | asked, plain | asked, negative | unasked, plain | unasked, negative |",
        "|---|---|---|---|---|",
    ]
    neg = gen["negative_prompt"]
    colours = list(dict.fromkeys(k.split("/")[0] for k in neg))
    for c in colours:
        cells = [_pct(neg[f"{c}/{a}/{t}"]) for a in ("asked", "unasked")
                 for t in ("plain", "negative")]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("")
    (out_dir / "BUILD.md").write_text("\n".join(lines))
