"""Write an evaluation's figures: results.json, docs/results.md and the two plots.

The markdown names the command that produced it, which split each figure comes from
(tuning: the γ / percentile sweep; held-out: everything else), and the 95 % intervals.
Plots use matplotlib's Agg backend (no display): the sweep's UA vs IRA / CRA per method with
its Pareto fronts, and an image grid with one row per method on the same prompts and seeds.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TARGETS = {"UA": 0.95, "IRA": 0.90, "CRA": 0.95}
PARETO_PNG = "eval-pareto.png"
GRID_PNG = "eval-grid.png"


def _clean(value: Any) -> Any:
    """NaN → None so results.json is standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_results_json(results: Mapping[str, Any], path: Path) -> Path:
    """Every figure as standard JSON (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(dict(results)), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def _v(fig: Mapping[str, Any] | None, ci: bool = True) -> str:
    """``0.953 [0.931, 0.968]`` for a Rate dict; ``—`` without trials."""
    if not fig or not fig.get("trials"):
        return "—"
    text = f"{fig['value']:.3f}"
    return f"{text} [{fig['ci95_low']:.3f}, {fig['ci95_high']:.3f}]" if ci else text


def _mean(fig: Mapping[str, Any]) -> str:
    m = fig.get("mean")
    return "—" if m is None or (isinstance(m, float) and math.isnan(m)) else f"{m:.3f}"


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows), ""]


def _triple(fig: Mapping[str, Any], ci: bool = True) -> list[str]:
    return [_v(fig.get("UA"), ci), _v(fig.get("IRA"), ci), _v(fig.get("CRA"), ci), _mean(fig)]


def _meets(fig: Mapping[str, Any]) -> str:
    ok = all((fig.get(m) or {}).get("trials") and fig[m]["value"] >= t
             for m, t in TARGETS.items())
    return "yes" if ok else "no"


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """The short table `steer eval` prints: overall held-out figures per method, best first."""
    single = results.get("heldout", {}).get("single", {})
    ranked = sorted(single.items(), key=lambda kv: -(kv[1]["overall"].get("mean") or 0.0))
    width = max([len(n) for n in single] + [6])
    lines = [f"{'method':<{width}}  {'UA':>6} {'IRA':>6} {'CRA':>6} {'mean':>6}"]
    for name, fig in ranked:
        o = fig["overall"]
        vals = [(o[m]["value"] if o[m]["trials"] else float("nan")) for m in ("UA", "IRA", "CRA")]
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:6.3f}" for v in vals)
                     + f" {o['mean']:6.3f}")
    return lines


def write_markdown(results: Mapping[str, Any], path: Path, images: Sequence[str] = ()) -> Path:
    """docs/results.md: every table, the command, the splits, and links to the plots."""
    cfg = results.get("config", {})
    held = results.get("heldout", {})
    single = held.get("single", {})
    lines = [
        "# Steering quality on the toy world",
        "",
        "Produced by:",
        "",
        f"    {results.get('command') or 'steer eval'}",
        "",
        f"on {results.get('created', '?')}, device `{cfg.get('device')}`, DDIM "
        f"{cfg.get('steps')} steps, guidance {cfg.get('guidance')}, bundle manifest sha256 "
        f"`{(results.get('bundle_sha256') or '?')[:16]}…`. "
        + ("**Smoke run**: tiny sizes, the figures only show the harness works. "
           if cfg.get("smoke") else ""),
        "",
        *([str(cfg["note"]), ""] if cfg.get("note") else []),
        "Judge: the toy world's attribute classifier (`assets/toy-classifier`). While "
        "suppressing concept c of kind K: **UA** = share of images of prompts asking for c "
        "in which the classifier does not find c; **IRA** = share of images of prompts asking "
        "for another concept of K in which it is found; **CRA** = share of all images in which "
        "the other kinds' attributes are found as prompted; **mean** = (UA + IRA + CRA) / 3, "
        "the ranking figure. Brackets: Wilson 95 % intervals. Per kind and overall pool the "
        "concepts' images (= the mean over concepts, since each has the same n).",
        "",
        f"Splits: the γ / percentile sweep uses the **tuning** split (seeds 2,000,000+, "
        f"{cfg.get('tune_per_concept')} UA + {cfg.get('tune_per_concept')} IRA pairs per "
        f"concept); every other table uses the **held-out** split (seeds 1,000,000+, "
        f"{cfg.get('per_concept')} UA + {cfg.get('per_concept')} IRA pairs per concept), "
        "never tuned on. Every method sees the same prompts and seeds. Targets: "
        "UA ≥ 0.95, IRA ≥ 0.90, CRA ≥ 0.95.",
        "",
        "## Overall (held-out, one concept suppressed at a time)",
        "",
    ]
    ranked = sorted(single.items(), key=lambda kv: -(kv[1]["overall"].get("mean") or 0.0))
    lines += _table(["method", "UA", "IRA", "CRA", "mean", "targets met"],
                    [[n, *_triple(f["overall"]), _meets(f["overall"])] for n, f in ranked])
    lines += _method_notes(results)
    lines += ["## Per kind (held-out)", ""]
    lines += _table(["kind", "method", "UA", "IRA", "CRA", "mean"],
                    [[k, n, *_triple(f["per_kind"][k])]
                     for k in _kinds(single) for n, f in ranked if k in f["per_kind"]])
    lines += ["## Per concept (held-out)", ""]
    concepts = list(next(iter(single.values()))["per_concept"]) if single else []
    lines += _table(["concept", "method", "UA", "IRA", "CRA", "mean"],
                    [[c, n, *_triple(f["per_concept"][c], ci=False)]
                     for c in concepts for n, f in ranked if c in f["per_concept"]])
    syn = held.get("synonyms", {})
    if syn:
        lines += ["## Synonyms (held-out)", "",
                  "Prompts name the concept by a synonym seen in training captions but not "
                  "in the importance tables (e.g. *crimson*, *scarlet* for red); UA counts "
                  "images without the canonical concept, CRA the other kinds kept.", ""]
        lines += _table(["concept", "method", "UA", "CRA"],
                        [[c, n, _v(f["per_concept"][c]["UA"]), _v(f["per_concept"][c]["CRA"])]
                         for c in next(iter(syn.values()))["per_concept"]
                         for n, f in syn.items()]
                        + [["**all**", n, _v(f["overall"]["UA"]), _v(f["overall"]["CRA"])]
                           for n, f in syn.items()])
    multi = held.get("multi", {})
    if multi:
        sets = results.get("multi_sets", [])
        lines += ["## Several concepts at once (held-out)", "",
                  "Fixed suppression sets: " + ", ".join("(" + ", ".join(s) + ")"
                                                         for s in sets)
                  + ". Prompts: each member's UA and IRA prompts at n / |set| pairs each "
                  "(IRA prompts never ask for another member). UA: of the images asking for "
                  "a suppressed concept, the share in which the judge finds none of the "
                  "suppressed concepts (a red prompt turned green with green suppressed too "
                  "is not removed); CRA covers the kinds with no suppressed concept (— when "
                  "the set covers all three).", ""]
        lines += _table(["set", "method", "UA", "IRA", "CRA", "mean"],
                        [[s, n, *_triple(f["sets"][s])] for s in next(iter(multi.values()))["sets"]
                         for n, f in multi.items() if s in f["sets"]]
                        + [[f"**all {k}-concept sets**", n, *_triple(f["by_size"][k])]
                           for k in next(iter(multi.values()))["by_size"]
                           for n, f in multi.items() if k in f["by_size"]])
    lines += _implicit_section(held.get("implicit", {}))
    lines += _detection_section(held.get("detection", {}))
    lines += _sweep_section(results)
    for image in images:
        lines += [f"![{Path(image).stem}]({image})", ""]
    t = results.get("timings", {})
    lines += [f"Run time: {t.get('total_s', 0) / 60:.1f} min ({results.get('images_generated', 0)}"
              f" images generated in this invocation; cached cells are reused, see `steer eval "
              f"--help`). All figures: `results.json` in the work dir.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _implicit_section(implicit: Mapping[str, Any]) -> list[str]:
    """The unnamed-kind set: removal, false edits and attributes kept per concept."""
    if not implicit:
        return []
    lines = ["## Concepts the prompt never names (held-out)", "",
             "Prompts leave the concept's kind unnamed, so the model draws it at random; each "
             "steered image is compared with the same prompt and seed unedited. **Removal**: of "
             "the images whose unedited version shows the concept (judge), the share whose "
             "steered version does not (target ≥ 0.95). **False edits**: of the images whose "
             "unedited version does not show it, the share whose steered image differs in any "
             "pixel (target ≤ 0.02). **Kept**: of those, the share whose judge labels are all "
             "unchanged (target ≥ 0.98).", ""]
    first = next(iter(implicit.values()))
    rows = [[c, n, _v(f["per_concept"][c]["removal"]), _v(f["per_concept"][c]["false_edits"]),
             _v(f["per_concept"][c]["kept"])]
            for c in first["per_concept"] for n, f in implicit.items() if c in f["per_concept"]]
    rows += [["**all**", n, _v(f["overall"]["removal"]), _v(f["overall"]["false_edits"]),
              _v(f["overall"]["kept"])] for n, f in implicit.items()]
    return lines + _table(["concept", "method", "removal", "false edits", "kept"], rows)


def _detection_section(detection: Mapping[str, Any]) -> list[str]:
    """The bundle's detectors against the judge on the unedited held-out runs."""
    if not detection:
        return []
    images = detection["images"]
    lines = ["## Detection (held-out, unedited runs)", "",
             f"The bundle's detectors at their stored thresholds against the judge, on the "
             f"unedited runs of the direct sets (UA and IRA prompts, {images['direct']:,} "
             f"images) and of the implicit set ({images['implicit']:,} images). "
             "**Precision**: of the images a detector flags, the share the judge finds the "
             "concept in; **recall**: of the images the judge finds it in, the share flagged "
             "(targets ≥ 0.95 on both sets together). The implicit columns are the images "
             "whose prompt leaves the kind unnamed.", ""]
    rows = [[c, _v(f["precision"]), _v(f["recall"]), _v(f["implicit_precision"]),
             _v(f["implicit_recall"])] for c, f in detection["per_concept"].items()]
    return lines + _table(["concept", "precision", "recall", "implicit precision",
                           "implicit recall"], rows)


def _kinds(single: Mapping[str, Any]) -> list[str]:
    kinds: list[str] = []
    for f in single.values():
        kinds += [k for k in f["per_kind"] if k not in kinds]
    return kinds


def _method_notes(results: Mapping[str, Any]) -> list[str]:
    single = results.get("heldout", {}).get("single", {})
    notes = ["Methods: **none** (no intervention); **negative_prompt** (the suppressed words "
             "joined with \", \" as negative prompt); **sld** (diffusers' "
             "`StableDiffusionPipelineSafe` on the same components, `SafetyConfig.STRONG`, its "
             "safety concept = the suppressed words); **saeuron** (the plain SAeUron recipe "
             "(docs/steering-method.md) at its best tuned (γ, percentile) per kind); **ours** "
             "(this project's steering: the bundle's default recipe at the bundle's default "
             "γ / percentile)."]
    if "saeuron" in single:
        setting = results.get("saeuron_setting")
        notes.append(f"saeuron's setting per kind (γ, percentile): `{json.dumps(setting)}`.")
    if "ours" in single:
        notes.append("ours' defaults per concept (γ, percentile): "
                     f"`{json.dumps(results.get('ours_defaults'))}`"
                     + (" — written by this run's sweep." if results.get("defaults_written")
                        else "."))
    return [" ".join(notes), ""]


def _setting(point: Mapping[str, Any]) -> str:
    """A sweep point's percentile, and its gate margin when the recipe is gated."""
    text = f"{point['percentile']:g}"
    return text + (f" / {point['gate_margin']:g}" if point.get("gate_margin") is not None else "")


def _sweep_section(results: Mapping[str, Any]) -> list[str]:
    sweep = results.get("sweep") or {}
    if not sweep:
        return []
    lines = ["## γ × percentile sweep (tuning split)", "",
             "Per kind, the chosen point maximises the mean of UA / IRA / CRA among the points "
             "with UA ≥ 0.95, or among all points when none reaches it (ties: the higher UA)."
             + (f" Source: {results['sweep_source']}." if results.get("sweep_source") else ""),
             ""]
    rows = []
    for name, data in sweep.items():
        for kind, c in data["chosen"].items():
            rows.append([name, kind, f"{c['gamma']:g}", _setting(c),
                         *_triple(c), "yes" if c["reaches_ua_target"] else "no"])
    lines += ["Chosen points:", ""]
    lines += _table(["method", "kind", "γ", "percentile / gate margin", "UA", "IRA", "CRA",
                     "mean", "UA ≥ 0.95"], rows)
    per_concept = (sweep.get("ours") or {}).get("chosen_per_concept") or {}
    if per_concept:
        rows = [[concept, f"{c['gamma']:g}", _setting(c), *_triple(c),
                 "yes" if c["reaches_ua_target"] else "no"] for concept, c in per_concept.items()]
        lines += ["Per concept, the same rule on each concept's own figures (what "
                  "`--write-defaults` writes with `--choose-per concept`, the default):", ""]
        lines += _table(["ours: concept", "γ", "percentile / gate margin", "UA", "IRA", "CRA",
                         "mean", "UA ≥ 0.95"], rows)
    rows = []
    for name, data in sweep.items():
        for p in data["points"]:
            for kind, f in p["per_kind"].items():
                c = data["chosen"][kind]
                key = ("gamma", "percentile", "gate_margin")
                mark = " ✓" if all(c.get(k) == p.get(k) for k in key) else ""
                rows.append([name, kind + mark, f"{p['gamma']:g}", _setting(p),
                             *_triple(f, ci=False)])
    lines += ["Every point (✓ = chosen):", ""]
    lines += _table(["method", "kind", "γ", "percentile / gate margin", "UA", "IRA", "CRA",
                     "mean"], rows)
    return lines


# -- plots ---------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (x, y), both to maximise, sorted by x."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(set(front))


def pareto_plot(results: Mapping[str, Any], path: Path) -> Path | None:
    """UA vs IRA and UA vs CRA over the sweep, one colour per method, one marker per kind."""
    sweep = results.get("sweep") or {}
    if not sweep:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    markers = {"shape": "o", "colour": "s", "background": "^"}
    colours = {"saeuron": "tab:orange", "ours": "tab:blue"}
    for ax, other in zip(axes, ("IRA", "CRA"), strict=True):
        for name, data in sweep.items():
            for kind in data["chosen"]:
                pts = [(p["per_kind"][kind]["UA"]["value"], p["per_kind"][kind][other]["value"])
                       for p in data["points"] if kind in p["per_kind"]]
                ax.scatter(*zip(*pts, strict=True), marker=markers.get(kind, "o"),
                           color=colours.get(name, "gray"), alpha=0.55,
                           label=f"{name} · {kind}")
                front = _front(pts)
                ax.plot(*zip(*front, strict=True), color=colours.get(name, "gray"), lw=1,
                        alpha=0.8)
                c = data["chosen"][kind]
                ax.scatter([c["UA"]["value"]], [c[other]["value"]], s=160,
                           facecolors="none", edgecolors="black", linewidths=1.2)
        single = results.get("heldout", {}).get("single", {})
        for name, marker in (("none", "x"), ("negative_prompt", "+"), ("sld", "D")):
            if name in single:
                o = single[name]["overall"]
                style = ({"facecolors": "none", "edgecolors": "black"} if marker == "D"
                         else {"color": "black"})
                ax.scatter([o["UA"]["value"]], [o[other]["value"]], marker=marker, s=50,
                           label=f"{name} (held-out, overall)", **style)
        ax.axvline(TARGETS["UA"], color="gray", ls=":", lw=0.8)
        ax.axhline(TARGETS[other], color="gray", ls=":", lw=0.8)
        ax.set_xlabel("UA (unlearning accuracy)")
        ax.set_ylabel(f"{other} ({'in' if other == 'IRA' else 'cross'}-domain retain accuracy)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"UA vs {other} over the γ × percentile sweep (tuning split)", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid_plot(rows: Mapping[str, Sequence[tuple[str, Path]]], prompts: Mapping[str, str],
              path: Path) -> Path | None:
    """One row per method, one column per suppressed concept (same prompt and seed per column)."""
    if not rows:
        return None
    from PIL import Image

    plt = _pyplot()
    names = list(rows)
    concepts = [c for c, _ in rows[names[0]]]
    fig, axes = plt.subplots(len(names), len(concepts), squeeze=False,
                             figsize=(1.25 * len(concepts) + 1.2, 1.3 * len(names) + 0.9))
    for r, name in enumerate(names):
        for col, (concept, png) in enumerate(rows[name]):
            ax = axes[r][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if png.exists():
                ax.imshow(Image.open(png).convert("RGB"), interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", fontsize=7)
            if r == 0:
                text = textwrap.fill(prompts.get(concept, ""), 20)
                ax.set_title(f"−{concept}\n{text}", fontsize=6)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("Held-out prompt asking for\nthe suppressed concept;\nsame seed per column",
                 fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
