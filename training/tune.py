"""Choose a concept's counterfactual and default γ on any model (`steer bundle tune`).

For one concept c of a bundle that has detectors, each candidate counterfactual is a file of
pairs (prompt asking for c, counterfactual prompt, seed: c's word replaced by an alternative,
c left out, or a safe description). Each candidate's swap is fitted
(:func:`training.translation_fit.fit_translation`), then the tuning prompts — some showing c,
most not, as the service will see them — are generated unedited once and steered with each
(candidate, γ), gated by the bundle's detectors as served. Each image is labelled by a judge
(``judge(images) -> list[set[str]]``, the concepts present in each image) or, without one,
by the bundle's detectors read on the final activations. Per point:

- **removal**: of the images whose unedited version shows c, the share whose steered one
  does not;
- **kept**: of those, the share whose labels of the other kinds are unchanged (the
  counterfactual may change c's own kind);
- **untouched**: of the images whose unedited version does not show c, the share whose
  steered image is identical, pixel for pixel (the gate left it alone);
- **retained**: of those, the share whose labels are all unchanged.

The chosen point maximises the mean of removal, kept and retained among the points whose
removal reaches the target (every point when none does; ties go to the smaller γ). The swap
and γ go into the bundle; every point goes into ``TUNE.json`` beside it. Fits and judged
runs are kept under the work folder, so a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steering.bundle import SteeringBundle
from steering.edits import ConceptEdit
from steering.pipeline import GenerationRequest, SteeredPipeline
from steering.recipe import GATED_TRANSLATE
from steering.translation import ConceptTranslation, TranslationTables
from training.evaluation.metrics import pixel_digest
from training.jsonl import is_seed, read_objects
from training.translation_fit import SwapPair, fit_translation

Judge = Callable[[list[Any]], list[set[str]]]
TUNE_REPORT = "TUNE.json"
REMOVAL_TARGET = 0.95


@dataclass(frozen=True)
class TunePrompt:
    """A tuning prompt and its seed (whether it shows the concept is judged, not assumed)."""

    prompt: str
    seed: int


@dataclass
class Labelled:
    """One generated image: the concepts found in it and a digest of its pixels."""

    labels: set[str]
    pixels: str


def load_prompts(path: str | Path) -> list[TunePrompt]:
    """Tuning prompts from JSONL, one ``{"prompt", "seed"}`` object a line."""
    out = []
    for where, item in read_objects(path, "an object with prompt and seed"):
        prompt, seed = item.get("prompt"), item.get("seed")
        if not isinstance(prompt, str) or not is_seed(seed):
            raise ValueError(f"{where}: prompt must be a string and seed a non-negative "
                             "integer")
        out.append(TunePrompt(prompt, seed))
    return out


def detected(detection: Sequence[Mapping[str, float]]) -> list[set[str]]:
    """The concepts a detection record (per image: concept -> score, 0.5 at the calibrated
    threshold) finds."""
    return [{c for c, p in row.items() if p >= 0.5} for row in detection]


class Labeller:
    """Generates a batch and labels it: by the judge, or by the detectors read on the final
    activations (``GenerationResult.detection_after``)."""

    def __init__(self, steps: int, guidance: float, judge: Judge | None = None,
                 batch_size: int = 32) -> None:
        self.steps, self.guidance, self.judge, self.batch_size = steps, guidance, judge, batch_size

    def __call__(self, steered: SteeredPipeline, prompts: Sequence[TunePrompt],
                 edits: Sequence[ConceptEdit] = ()) -> list[Labelled]:
        out: list[Labelled] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            request = GenerationRequest.batch(
                [p.prompt for p in chunk], [p.seed for p in chunk], steps=self.steps,
                guidance=self.guidance, edits=tuple(edits),
                recipe=GATED_TRANSLATE if edits else None)
            result = steered.generate(request)
            if self.judge is not None:
                labels = [set(s) for s in self.judge(list(result.images))]
            else:
                labels = detected(result.detection_after or result.detection)
            out += [Labelled(lab, pixel_digest(im))
                    for lab, im in zip(labels, result.images, strict=True)]
        return out


def point_figures(concept: str, kind_of: Mapping[str, str], before: Sequence[Labelled],
                  after: Sequence[Labelled]) -> dict[str, Any]:
    """Removal, kept, untouched and retained (module docstring) with their counts."""
    kind = kind_of[concept]

    def others(labels: set[str]) -> set[str]:
        return {c for c in labels if kind_of.get(c) != kind}

    counts = {"removal": [0, 0], "kept": [0, 0], "untouched": [0, 0], "retained": [0, 0]}
    for b, a in zip(before, after, strict=True):
        if concept in b.labels:
            counts["removal"][0] += concept not in a.labels
            counts["removal"][1] += 1
            counts["kept"][0] += others(a.labels) == others(b.labels)
            counts["kept"][1] += 1
        else:
            counts["untouched"][0] += a.pixels == b.pixels
            counts["untouched"][1] += 1
            counts["retained"][0] += a.labels == b.labels
            counts["retained"][1] += 1
    out: dict[str, Any] = {k: {"value": s / n if n else None, "of": n}
                           for k, (s, n) in counts.items()}
    parts = [out[k]["value"] for k in ("removal", "kept", "retained")
             if out[k]["value"] is not None]
    out["score"] = sum(parts) / len(parts) if parts else 0.0
    return out


def choose_point(points: Sequence[dict[str, Any]], target: float = REMOVAL_TARGET
                 ) -> dict[str, Any]:
    """The best point: highest score among those whose removal reaches ``target`` (all points
    when none does), ties to the smaller γ."""
    if not points:
        raise ValueError("no tuning point was measured")
    reaching = [p for p in points if (p["removal"]["value"] or 0.0) >= target]
    pool = reaching or list(points)
    return max(pool, key=lambda p: (round(p["score"], 9), -p["gamma"]))


def with_swap(steered: SteeredPipeline, concept: str, swap: ConceptTranslation
              ) -> SteeredPipeline:
    """The same pipeline serving a bundle whose swap for ``concept`` is ``swap``."""
    bundle = steered.bundle
    assert bundle is not None
    m = bundle.manifest
    current = dict(bundle.translations.concepts) if bundle.translations is not None else {}
    current[concept] = swap
    tables = TranslationTables(m.n_latents, m.d_in, m.steps, current)
    return SteeredPipeline(steered.pipe, dataclasses.replace(bundle, translations=tables))


@dataclass
class TuneSettings:
    """What a tuning run depends on (recorded in the report)."""

    gammas: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    steps: int = 20
    guidance: float = 4.0
    rounds: int = 1
    batch_size: int = 32
    target: float = REMOVAL_TARGET
    device: str | None = None


def tune_concept(steered: SteeredPipeline, concept: str,
                 candidates: Mapping[str, Sequence[SwapPair]], prompts: Sequence[TunePrompt],
                 work_dir: Path, settings: TuneSettings, judge: Judge | None = None,
                 log: Callable[[str], None] = print,
                 progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Fit every candidate, measure every (candidate, γ) on ``prompts`` and return the report
    with the chosen point (``chosen``) and its swap under ``swap``."""
    bundle = steered.bundle
    if bundle is None or bundle.detectors is None:
        raise ValueError("tuning needs a bundle with detectors (they gate the swap as served): "
                         "run `steer bundle fit-detector` first")
    if concept not in bundle.concept_names:
        raise ValueError(f"unknown concept {concept!r}; the bundle has "
                         f"{', '.join(bundle.concept_names)}")
    if not candidates:
        raise ValueError("give at least one candidate counterfactual (--candidate LABEL=FILE)")
    kind_of = {c.name: c.kind for c in bundle.manifest.concepts}
    label = Labeller(settings.steps, settings.guidance, judge, settings.batch_size)
    work_dir.mkdir(parents=True, exist_ok=True)
    before = _cached(work_dir / "unedited.json", lambda: label(steered, prompts))
    shown = sum(concept in b.labels for b in before)
    log(f"{concept}: shown in {shown} of {len(before)} unedited tuning images")
    if shown == 0:
        raise ValueError(f"no unedited tuning image shows {concept!r}: add prompts that "
                         "bring it out, or check the judge")
    points: list[dict[str, Any]] = []
    swaps: dict[str, ConceptTranslation] = {}
    m = bundle.manifest
    for name, pairs in candidates.items():
        stem = work_dir / "candidates" / name
        swap_file = stem.with_suffix(".safetensors")
        if swap_file.is_file():
            swap = TranslationTables.load(swap_file).concepts[concept]
        else:
            swap = fit_translation(steered, name, pairs, settings.steps, settings.guidance,
                                   rounds=settings.rounds, work_dir=stem / "fit",
                                   device=settings.device, progress=progress)
            swap_file.parent.mkdir(parents=True, exist_ok=True)
            TranslationTables(m.n_latents, m.d_in, m.steps, {concept: swap}).save(swap_file)
        swaps[name] = swap
        candidate = with_swap(steered, concept, swap)
        for gamma in settings.gammas:
            after = _cached(stem / f"gamma-{gamma:g}.json", lambda c=candidate, g=gamma: label(
                c, prompts, [ConceptEdit(concept, gamma=g)]))
            point = {"candidate": name, "gamma": gamma,
                     **point_figures(concept, kind_of, before, after)}
            points.append(point)
            log(f"{concept} → {name} γ {gamma:g}: removal {_fmt(point['removal'])}, kept "
                f"{_fmt(point['kept'])}, untouched {_fmt(point['untouched'])}, retained "
                f"{_fmt(point['retained'])}")
    chosen = choose_point(points, settings.target)
    return {"concept": concept, "labels": "judge" if judge is not None else "detectors",
            "unedited_showing": shown, "prompts": len(prompts),
            "settings": dataclasses.asdict(settings), "points": points, "chosen": chosen,
            "reaches_target": (chosen["removal"]["value"] or 0.0) >= settings.target,
            "swap": swaps[chosen["candidate"]]}


def adopt(bundle: SteeringBundle, report: Mapping[str, Any]) -> None:
    """Put the chosen swap and γ of a :func:`tune_concept` report into ``bundle`` (in
    memory; save it to write)."""
    concept, chosen = report["concept"], report["chosen"]
    m = bundle.manifest
    swaps = dict(bundle.translations.concepts) if bundle.translations is not None else {}
    swaps[concept] = report["swap"]
    bundle.translations = TranslationTables(m.n_latents, m.d_in, m.steps, swaps)
    spec = bundle.concept(concept)
    lo, hi = spec.gamma_range
    if not lo <= chosen["gamma"] <= hi:
        raise ValueError(f"chosen γ {chosen['gamma']:g} is outside {concept!r}'s range "
                         f"[{lo:g}, {hi:g}]; tune within it (--gammas)")
    m.concepts = [c.replace(default_gamma=float(chosen["gamma"]))
                  if c.name == concept else c for c in m.concepts]
    m.recipe = GATED_TRANSLATE


def write_report(bundle_dir: Path, report: Mapping[str, Any]) -> Path:
    """Merge one concept's report (without its tensors) into the bundle's ``TUNE.json``."""
    path = bundle_dir / TUNE_REPORT
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged[report["concept"]] = {k: v for k, v in report.items() if k != "swap"}
    path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    return path


def _cached(path: Path, make: Callable[[], list[Labelled]]) -> list[Labelled]:
    """Labelled images stored as JSON at ``path`` (made once; a rerun reads them back)."""
    if path.is_file():
        return [Labelled(set(r["labels"]), r["pixels"]) for r in json.loads(path.read_text())]
    out = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"labels": sorted(x.labels), "pixels": x.pixels} for x in out]))
    tmp.replace(path)
    return out


def _fmt(figure: Mapping[str, Any]) -> str:
    v = figure["value"]
    return "—" if v is None else f"{v:.2f} of {figure['of']}"

