"""The evaluation runner: cells of (method, settings, suppressed set, prompt set), cached.

Each cell's classifier predictions are stored as JSON under the work dir as they are made
(after every batch), so a rerun resumes where the last one stopped and generates nothing that
is already judged; a longer run reuses a shorter one's images (items are a prefix). Pending
items of the cells that share a method and a suppressed set are generated together in batches.

:func:`evaluate` runs the whole comparison: the γ × percentile sweep on the tuning split,
optionally writes the chosen defaults into the bundle, then the held-out sets (single concepts,
synonyms, multi-concept) for every method, and returns every figure (``results.json``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from training.evaluation.methods import (
    METHOD_NAMES,
    Method,
    SteeringMethod,
    build_method,
    settings_key,
)
from training.evaluation.metrics import (
    Judged,
    Paired,
    Rate,
    detection_metrics,
    implicit_metrics,
    pixel_digest,
    steering_metrics,
)
from training.evaluation.prompts import (
    ALL_CONCEPTS,
    MULTI_SETS,
    PromptSet,
    implicit_set,
    ira_set,
    multi_name,
    multi_sets,
    synonym_set,
    ua_set,
)
from training.toyworld.world import KINDS, SYNONYMS, kind_of

KIND_OF = {c: k for k, members in KINDS.items() for c in members}
SWEPT = ("saeuron", "ours")
UA_TARGET = 0.95


class Predictor(Protocol):
    """What judges images (the attribute classifier): ``predict(images) -> [kind -> concept]``."""

    def predict(self, images: list) -> list[dict[str, str]]:
        """Predicted concept of each kind, per image."""
        ...


@dataclass(frozen=True)
class Job:
    """One cell: a method (with its settings) generating a prompt set while suppressing."""

    method: Method
    suppressed: tuple[str, ...]
    prompts: PromptSet


def _items_record(prompts: PromptSet) -> list[list[Any]]:
    return [[it.prompt, it.seed] for it in prompts.items]


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves half a cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class CellCache:
    """Predictions per cell under ``work_dir/cells/<method>/<settings>/<suppressed>/``."""

    def __init__(self, work_dir: Path, rerun: Sequence[str] = ()) -> None:
        self.root = Path(work_dir) / "cells"
        self.rerun = set(rerun)
        self._fresh: set[Path] = set()

    def path(self, job: Job) -> Path:
        """The cell's JSON file."""
        key = settings_key(job.method.settings)
        return (self.root / job.method.name / key / multi_name(job.suppressed)
                / (job.prompts.name.replace("/", "__") + ".json"))

    def load(self, job: Job) -> tuple[dict[str, Any], list[Judged]]:
        """The cell's stored record and the judgements valid for ``job``'s items (a prefix)."""
        path = self.path(job)
        settings_file = path.parents[1] / "settings.json"
        if not settings_file.exists():
            _write_json(settings_file, {"method": job.method.name,
                                        "settings": job.method.settings})
        record: dict[str, Any] = {"method": job.method.name, "settings": job.method.settings,
                                  "suppressed": list(job.suppressed),
                                  "prompt_set": job.prompts.name, "items": [],
                                  "predictions": [], "pixels": [], "detected": []}
        if path.exists() and not (job.method.name in self.rerun and path not in self._fresh):
            try:
                stored = json.loads(path.read_text())
                record["items"] = stored["items"]
                record["predictions"] = stored["predictions"]
                record["pixels"] = stored["pixels"]
                record["detected"] = stored.get("detected", [])
            except (OSError, ValueError, KeyError):
                pass  # a damaged cell (or one from before pixel digests) is regenerated
        self._fresh.add(path)
        wanted = _items_record(job.prompts)
        valid = 0
        for have, want, _, _ in zip(record["items"], wanted, record["predictions"],
                                    record["pixels"], strict=False):
            if have != want:
                break
            valid += 1
        if valid < len(record["predictions"]) and valid < len(wanted):
            record["items"], record["predictions"], record["pixels"] = [], [], []  # diverged
            record["detected"] = []
            valid = 0
        detected = record["detected"] + [None] * (valid - len(record["detected"]))
        return record, [Judged(it.asked, p, px, None if d is None else frozenset(d))
                        for it, p, px, d in zip(job.prompts.items, record["predictions"][:valid],
                                                record["pixels"][:valid], detected,
                                                strict=False)]

    def save(self, job: Job, record: dict[str, Any], judged: list[Judged]) -> None:
        """Store the judgements made so far (never shortening a longer stored cell)."""
        if len(judged) > len(record["predictions"]):
            record["items"] = _items_record(job.prompts)[:len(judged)]
            record["predictions"] = [dict(j.predicted) for j in judged]
            record["pixels"] = [j.pixels for j in judged]
            record["detected"] = [None if j.detected is None else sorted(j.detected)
                                  for j in judged]
        _write_json(self.path(job), record)

    def image_path(self, job: Job) -> Path:
        """PNG of the cell's first image (for the image grid)."""
        return self.path(job).with_suffix(".png")


@dataclass
class RunStats:
    """What a run did: images generated, generate calls, seconds spent generating."""

    images: int = 0
    calls: int = 0
    seconds: float = 0.0


def run_jobs(jobs: Sequence[Job], predictor: Predictor, cache: CellCache, batch_size: int = 64,
             progress: bool = True, desc: str = "eval", stats: RunStats | None = None
             ) -> list[list[Judged]]:
    """Judged images of every job, generating only what the cache does not hold yet."""
    if batch_size < 1:
        raise ValueError("batch size must be ≥ 1")
    stats = stats if stats is not None else RunStats()
    records, preds = [], []
    for job in jobs:
        record, valid = cache.load(job)
        records.append(record)
        preds.append(valid)
    groups: dict[tuple[int, tuple[str, ...]], list[tuple[int, int]]] = {}
    for j, job in enumerate(jobs):
        pending = [(j, i) for i in range(len(preds[j]), len(job.prompts))]
        if pending:
            # A method that ignores the suppressed set ("none") batches all its cells together.
            key = job.suppressed if getattr(job.method, "uses_suppressed", True) else ()
            groups.setdefault((id(job.method), key), []).extend(pending)
    total = sum(len(v) for v in groups.values())
    with tqdm(total=total, desc=desc, unit="img", disable=not progress or total == 0,
              dynamic_ncols=True) as bar:
        for pending in groups.values():
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                job0 = jobs[chunk[0][0]]
                items = [jobs[j].prompts.items[i] for j, i in chunk]
                t0 = time.perf_counter()
                prompts, seeds = [it.prompt for it in items], [it.seed for it in items]
                detected: Sequence[frozenset[str] | None]
                if hasattr(job0.method, "generate_detected"):
                    images, found = job0.method.generate_detected(prompts, seeds,
                                                                  job0.suppressed)
                    detected = found if found is not None else [None] * len(images)
                else:
                    images = job0.method.generate(prompts, seeds, job0.suppressed)
                    detected = [None] * len(images)
                stats.seconds += time.perf_counter() - t0
                stats.calls += 1
                stats.images += len(images)
                judged = predictor.predict(images)
                touched = []
                for (j, i), item, image, p, d in zip(chunk, items, images, judged, detected,
                                                     strict=True):
                    assert len(preds[j]) == i, "cells are filled in order"
                    preds[j].append(Judged(item.asked, dict(p), pixel_digest(image), d))
                    if i == 0:
                        path = cache.image_path(jobs[j])
                        path.parent.mkdir(parents=True, exist_ok=True)
                        image.save(path)
                    if j not in touched:
                        touched.append(j)
                for j in touched:
                    cache.save(jobs[j], records[j], preds[j])
                bar.update(len(chunk))
    return preds



# -- figures -------------------------------------------------------------------------------

def pool(rates: Sequence[dict[str, Rate]]) -> dict[str, Rate]:
    """Sum successes and trials of several UA / IRA / CRA dicts (per kind, overall)."""
    return {m: Rate(sum(r[m].successes for r in rates), sum(r[m].trials for r in rates))
            for m in ("UA", "IRA", "CRA")}


def summary(rates: dict[str, Rate]) -> dict[str, Any]:
    """JSON figures of one UA / IRA / CRA triple plus ``mean`` of those with trials."""
    values = [r.value for r in rates.values() if r.trials]
    out: dict[str, Any] = {m: r.to_dict() for m, r in rates.items()}
    out["mean"] = sum(values) / len(values) if values else math.nan
    return out


def figures(per_concept: dict[str, dict[str, Rate]]) -> dict[str, Any]:
    """Per concept, per kind (pooled) and overall (pooled) figures."""
    by_kind: dict[str, list[dict[str, Rate]]] = {}
    for concept, rates in per_concept.items():
        by_kind.setdefault(KIND_OF[concept], []).append(rates)
    return {
        "per_concept": {c: summary(r) for c, r in per_concept.items()},
        "per_kind": {k: summary(pool(v)) for k, v in by_kind.items()},
        "overall": summary(pool(list(per_concept.values()))),
    }


IMPLICIT_METRICS = ("removal", "false_edits", "kept")


def implicit_figures(per_concept: dict[str, dict[str, Rate]]) -> dict[str, Any]:
    """Per concept and overall (pooled) removal / false edits / attributes kept."""
    pooled = {m: Rate(sum(r[m].successes for r in per_concept.values()),
                      sum(r[m].trials for r in per_concept.values()))
              for m in IMPLICIT_METRICS}
    return {"per_concept": {c: {m: r.to_dict() for m, r in rates.items()}
                            for c, rates in per_concept.items()},
            "overall": {m: r.to_dict() for m, r in pooled.items()}}


def detection_figures(concepts: Sequence[str], direct: Sequence[Judged],
                      unnamed: Sequence[Judged]) -> dict[str, Any]:
    """Per concept, the detectors' precision and recall against the judge on the direct and
    implicit sets together ("all") and on the implicit set alone ("implicit")."""
    per_concept = {}
    for c in concepts:
        both = detection_metrics([*direct, *unnamed], c)
        alone = detection_metrics(unnamed, c)
        per_concept[c] = {"precision": both["precision"].to_dict(),
                          "recall": both["recall"].to_dict(),
                          "implicit_precision": alone["precision"].to_dict(),
                          "implicit_recall": alone["recall"].to_dict()}
    return {"per_concept": per_concept, "images": {"direct": len(direct),
                                                   "implicit": len(unnamed)}}


def choose(points: Sequence[dict[str, Any]], kind: str, level: str = "per_kind"
           ) -> dict[str, Any]:
    """The sweep point maximising the mean of UA / IRA / CRA of ``kind`` (a concept with
    ``level="per_concept"``) among those reaching UA ≥ 0.95, or among all points when none
    does (a tie goes to the higher UA)."""
    scored = [p for p in points if kind in p[level]]
    if not scored:
        raise ValueError(f"no sweep point measured {kind!r}")
    reaching = [p for p in scored if p[level][kind]["UA"]["value"] >= UA_TARGET]
    pool_ = reaching or scored
    best = max(pool_, key=lambda p: (round(p[level][kind]["mean"], 9),  # ties: higher UA
                                     p[level][kind]["UA"]["value"]))
    return {"gamma": best["gamma"], "percentile": best["percentile"],
            **({"gate_margin": best["gate_margin"]} if "gate_margin" in best else {}),
            "reaches_ua_target": bool(reaching), **best[level][kind]}


# -- the whole comparison ------------------------------------------------------------------

@dataclass
class EvalConfig:
    """Everything a `steer eval` run depends on (recorded in results.json)."""

    pipeline: Path = Path("assets/toy-pipeline")
    bundle: Path = Path("assets/toy-bundle")
    classifier: Path = Path("assets/toy-classifier")
    work_dir: Path = Path("eval-work")
    per_concept: int = 400
    tune_per_concept: int = 100
    device: str = "cpu"
    batch_size: int = 64
    methods: tuple[str, ...] = METHOD_NAMES
    concepts: tuple[str, ...] = ALL_CONCEPTS
    sweep: bool = True
    gammas: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)  # within the bundle's γ range
    percentiles: tuple[float, ...] = (98.0, 99.0, 99.5)
    # ours (the learned swap, γ = 1 as fitted) lives on another γ scale than the plain
    # recipe; its percentile matters only to concepts without a swap (replacement fallback)
    ours_gammas: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    ours_percentiles: tuple[float, ...] = (95.0,)
    # detection-gate margins of ours (mean cosine; 0 = edit only where c is the nearest)
    ours_margins: tuple[float, ...] = (0.0, 0.05)
    write_defaults: bool = False
    # "concept": ours' defaults chosen per concept (each has its own learned swap), or "kind"
    choose_per: str = "concept"
    steps: int = 20
    guidance: float = 4.0
    synonyms: bool = True
    multi: bool = True
    # prompts leaving the concept's kind unnamed, judged against the same prompt unedited
    implicit: bool = True
    multi_sets: tuple[tuple[str, ...], ...] = MULTI_SETS
    sld_config: str = "STRONG"
    rerun: tuple[str, ...] = ()
    progress: bool = True
    command: str = ""
    smoke: bool = False
    note: str = ""  # printed under the command in results.md (e.g. where cached cells came from)

    def validate(self) -> None:
        """Refuse unknown methods / concepts and impossible sizes before any work."""
        bad = [m for m in self.methods if m not in METHOD_NAMES]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: {', '.join(METHOD_NAMES)}")
        bad = [c for c in self.concepts if c not in ALL_CONCEPTS]
        if bad:
            raise ValueError(f"unknown concept(s) {bad}; known: {', '.join(ALL_CONCEPTS)}")
        if not self.methods or not self.concepts:
            raise ValueError("need at least one method and one concept")
        if self.sld_config not in ("WEAK", "MEDIUM", "STRONG", "MAX"):
            raise ValueError(f"unknown SLD config {self.sld_config!r}: WEAK, MEDIUM, STRONG, MAX")
        if self.choose_per not in ("concept", "kind"):
            raise ValueError(f"choose_per must be 'concept' or 'kind', not {self.choose_per!r}")
        if self.per_concept < 1 or self.tune_per_concept < 1:
            raise ValueError("--per-concept and the tuning size must be ≥ 1")

    def selected_multi(self) -> list[tuple[str, ...]]:
        """The fixed multi-concept sets whose members are all selected."""
        if not self.multi:
            return []
        return [s for s in self.multi_sets if all(c in self.concepts for c in s)]

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = dataclasses.asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


def single_jobs(method: Method, concepts: Sequence[str], n: int, split: str,
                synonyms: bool = False) -> list[Job]:
    """UA and IRA cells (and synonym cells) of each concept suppressed alone."""
    jobs = []
    for c in concepts:
        jobs += [Job(method, (c,), ua_set(c, n, split)), Job(method, (c,), ira_set(c, n, split))]
        if synonyms and c in SYNONYMS:
            jobs.append(Job(method, (c,), synonym_set(c, n, split)))
    return jobs


def _metrics(judged: Sequence[Judged], suppressed: Sequence[str]) -> dict[str, Rate]:
    return steering_metrics(judged, set(suppressed), KIND_OF)


@dataclass
class Evaluation:
    """A `steer eval` run on a loaded pipeline, bundle and classifier."""

    config: EvalConfig
    steered: Any  # SteeredPipeline (loaded by the caller so tests can share one)
    predictor: Predictor
    log: Callable[[str], None] = print
    stats: RunStats = field(default_factory=RunStats)

    def __post_init__(self) -> None:
        self.config.validate()
        self.cache = CellCache(self.config.work_dir, self.config.rerun)
        self.timings: dict[str, float] = {}
        self.heldout_methods: list[Method] = []

    def _run(self, jobs: Sequence[Job], desc: str) -> list[list[Judged]]:
        return run_jobs(jobs, self.predictor, self.cache, self.config.batch_size,
                        self.config.progress, desc, self.stats)

    # -- sweep ----------------------------------------------------------------------------

    def sweep(self) -> dict[str, Any]:
        """γ × percentile grid of ``saeuron`` and ``ours`` on the tuning split, per kind."""
        cfg = self.config
        kinds = sorted({kind_of(c) for c in cfg.concepts})
        out: dict[str, Any] = {}
        plan: list[tuple[str, tuple[float, ...], list[Job]]] = []
        for name in (m for m in SWEPT if m in cfg.methods):
            grid = (itertools.product(cfg.ours_gammas, cfg.ours_percentiles, cfg.ours_margins)
                    if name == "ours" else itertools.product(cfg.gammas, cfg.percentiles))
            for setting in grid:
                method = SteeringMethod(name, self.steered, cfg.steps, cfg.guidance,
                                        {k: setting for k in kinds})
                plan.append((name, setting, single_jobs(method, cfg.concepts,
                                                        cfg.tune_per_concept, "tune")))
        judged = self._run([j for *_, jobs in plan for j in jobs], "sweep (tuning split)")
        at = 0
        for name, setting, jobs in plan:
            per_concept: dict[str, list[Judged]] = {}
            for job in jobs:
                per_concept.setdefault(job.suppressed[0], []).extend(judged[at])
                at += 1
            g, p, *margin = setting
            point = {"gamma": g, "percentile": p,
                     **({"gate_margin": margin[0]} if margin else {}),
                     **figures({c: _metrics(v, (c,)) for c, v in per_concept.items()})}
            out.setdefault(name, {"points": []})["points"].append(point)
        for name, data in out.items():
            data["chosen"] = {k: choose(data["points"], k) for k in kinds}
            if name == "ours":
                data["chosen_per_concept"] = {c: choose(data["points"], c, "per_concept")
                                              for c in cfg.concepts}
        return out

    def write_defaults(self, chosen: dict[str, dict[str, Any]],
                       per_concept: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Write the chosen (γ, percentile, gate margin) into the bundle manifest, per concept
        where ``per_concept`` has it, else per kind, and reload the bundle."""
        from steering.bundle import SteeringBundle
        from steering.pipeline import SteeredPipeline

        bundle = SteeringBundle.load(self.config.bundle, device=self.config.device)
        before = bundle.sha256
        written = {}
        concepts = []
        for spec in bundle.manifest.concepts:
            pick = (per_concept or {}).get(spec.name) or chosen.get(spec.kind)
            if pick is not None:
                spec = spec.replace(default_gamma=float(pick["gamma"]),
                                    default_percentile=float(pick["percentile"]),
                                    default_gate_margin=float(
                                        pick.get("gate_margin", spec.default_gate_margin)))
                written[spec.name] = [spec.default_gamma, spec.default_percentile,
                                      spec.default_gate_margin]
            concepts.append(spec)
        bundle.manifest.concepts = concepts
        bundle.save(self.config.bundle)
        reloaded = SteeringBundle.load(self.config.bundle, device=self.config.device)
        self.steered = SteeredPipeline(self.steered.pipe, reloaded)
        return {"bundle": str(self.config.bundle), "sha256_before": before,
                "sha256_after": reloaded.sha256, "concepts": written}

    # -- held-out -------------------------------------------------------------------------

    def heldout(self, saeuron_per_kind: dict[str, tuple[float, float]] | None
                ) -> dict[str, Any]:
        """Every method on the held-out single-concept, synonym and multi-concept sets."""
        cfg = self.config
        methods = []
        for name in cfg.methods:
            per_kind = saeuron_per_kind if name == "saeuron" else None
            methods.append(build_method(name, self.steered, cfg.steps, cfg.guidance, per_kind,
                                        sld_config=cfg.sld_config))
        self.heldout_methods = methods
        plan: list[tuple[Method, str, tuple[str, ...], Job]] = []
        for method in methods:
            for job in single_jobs(method, cfg.concepts, cfg.per_concept, "heldout",
                                   cfg.synonyms):
                kind = job.prompts.name.split("/")[1]
                plan.append((method, kind, job.suppressed, job))
            for s in cfg.selected_multi():
                for ps in multi_sets(s, cfg.per_concept, "heldout"):
                    plan.append((method, "multi", s, Job(method, s, ps)))
        reference = build_method("none", self.steered, cfg.steps, cfg.guidance)
        implicit: list[tuple[Method, str, Job, Job]] = []
        if cfg.implicit:
            for method in (m for m in methods if m.name != "none"):
                for c in cfg.concepts:
                    ps = implicit_set(c, cfg.per_concept, "heldout")
                    implicit.append((method, c, Job(method, (c,), ps),
                                     Job(reference, (c,), ps)))
        jobs = [p[-1] for p in plan] + [j for *_, a, b in implicit for j in (a, b)]
        judged = self._run(jobs, "held-out")
        paired = judged[len(plan):]
        judged = judged[:len(plan)]
        single: dict[str, dict[str, list[Judged]]] = {}
        syn: dict[str, dict[str, list[Judged]]] = {}
        multi: dict[str, dict[tuple[str, ...], list[Judged]]] = {}
        for (method, kind, suppressed, _), j in zip(plan, judged, strict=True):
            if kind in ("ua", "ira"):
                single.setdefault(method.name, {}).setdefault(suppressed[0], []).extend(j)
            elif kind == "synonym":
                syn.setdefault(method.name, {}).setdefault(suppressed[0], []).extend(j)
            else:
                multi.setdefault(method.name, {}).setdefault(suppressed, []).extend(j)
        out: dict[str, Any] = {"single": {}, "synonyms": {}, "multi": {}, "implicit": {}}
        per_method: dict[str, dict[str, dict[str, Rate]]] = {}
        for (method, c, _, _), steered, unedited in zip(implicit, paired[::2], paired[1::2],
                                                        strict=True):
            pairs = [Paired(u.predicted, s.predicted, s.pixels != u.pixels)
                     for s, u in zip(steered, unedited, strict=True)]
            per_method.setdefault(method.name, {})[c] = implicit_metrics(pairs, c)
        for name, per_concept in per_method.items():
            out["implicit"][name] = implicit_figures(per_concept)
        # the detectors against the judge, on the unedited runs of the direct and implicit sets
        direct = [j for (method, kind, _, _), js in zip(plan, judged, strict=True)
                  if method.name == "none" and kind in ("ua", "ira") for j in js]
        # every steered method shares the one unedited cell per concept: count it once
        reference_cells = {c: js for (_, c, _, _), js in zip(implicit, paired[1::2],
                                                              strict=True)}
        unnamed = [j for js in reference_cells.values() for j in js]
        if any(j.detected is not None for j in direct + unnamed):
            out["detection"] = detection_figures(cfg.concepts, direct, unnamed)
        for method in methods:
            name = method.name
            out["single"][name] = {"settings": method.settings, **figures(
                {c: _metrics(v, (c,)) for c, v in single.get(name, {}).items()})}
            if syn.get(name):
                out["synonyms"][name] = figures(
                    {c: _metrics(v, (c,)) for c, v in syn[name].items()})
            if multi.get(name):
                rates = {s: _metrics(v, s) for s, v in multi[name].items()}
                by_size: dict[int, list[dict[str, Rate]]] = {}
                for s, r in rates.items():
                    by_size.setdefault(len(s), []).append(r)
                out["multi"][name] = {
                    "sets": {multi_name(s): summary(r) for s, r in rates.items()},
                    "by_size": {str(k): summary(pool(v)) for k, v in sorted(by_size.items())},
                }
        return out

    def grid_cells(self) -> dict[str, list[tuple[str, Path]]]:
        """Per method, (concept, PNG) of the first held-out image asking for each concept
        (saved by the held-out run, so the grid costs no generation)."""
        return {m.name: [(c, self.cache.image_path(Job(m, (c,), ua_set(c, 1))))
                         for c in self.config.concepts]
                for m in self.heldout_methods}

    # -- everything -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Sweep, defaults, held-out: every figure as one JSON-ready dict."""
        cfg = self.config
        started = time.perf_counter()
        results: dict[str, Any] = {
            "command": cfg.command, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": cfg.to_dict(), "multi_sets": [list(s) for s in cfg.selected_multi()],
            "splits": {"tuning": "seeds 2_000_000+ (γ / percentile sweep)",
                       "heldout": "seeds 1_000_000+ (never tuned on)"},
        }
        sweep_file = Path(cfg.work_dir) / "sweep.json"
        saeuron_per_kind = None
        if cfg.sweep and any(m in cfg.methods for m in SWEPT):
            t0 = time.perf_counter()
            results["sweep"] = self.sweep()
            self.timings["sweep_s"] = time.perf_counter() - t0
            _write_json(sweep_file, results["sweep"])
        elif sweep_file.exists():
            results["sweep"] = json.loads(sweep_file.read_text())
            results["sweep_source"] = f"{sweep_file} (an earlier run's sweep)"
        sweep = results.get("sweep", {})
        if "saeuron" in sweep:
            saeuron_per_kind = {k: (v["gamma"], v["percentile"])
                                for k, v in sweep["saeuron"]["chosen"].items()}
        results["saeuron_setting"] = (
            {k: list(v) for k, v in saeuron_per_kind.items()} if saeuron_per_kind
            else "bundle defaults (no sweep measured)")
        if cfg.write_defaults:
            if "ours" not in sweep:
                raise ValueError("--write-defaults needs the sweep of 'ours' (--sweep)")
            per_concept = (sweep["ours"].get("chosen_per_concept")
                           if cfg.choose_per == "concept" else None)
            results["defaults_written"] = self.write_defaults(sweep["ours"]["chosen"],
                                                              per_concept)
            self.log(f"wrote the chosen defaults into {cfg.bundle}")
        results["bundle_sha256"] = self.steered.bundle.sha256 if self.steered.bundle else None
        results["ours_defaults"] = {c.name: [c.default_gamma, c.default_percentile]
                                    for c in self.steered.concepts.values()}
        t0 = time.perf_counter()
        results["heldout"] = self.heldout(saeuron_per_kind)
        self.timings["heldout_s"] = time.perf_counter() - t0
        self.timings["total_s"] = time.perf_counter() - started
        results["timings"] = {**self.timings, "generate_s": self.stats.seconds}
        results["images_generated"] = self.stats.images
        results["generate_calls"] = self.stats.calls
        return results
