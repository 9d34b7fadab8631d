"""Fit the open-world concept detectors (steering/detector.py) from image-level labels.

Each run (prompt, seed) is generated once without steering while the hook block's output is
encoded: its mean SAE code over tokens, cond half, at every step. Its label is the set of
bundle concepts the image shows — open world: possibly none. Labels come from, best first:

- ``judge``: a callable ``judge(images: list[PIL.Image]) -> list[set[str]]`` that looks at
  the generated images (a classifier, a captioner, people); it sees the same runs whose
  codes are recorded;
- ``given``: the runs file's ``concepts`` field;
- ``prompt``: a concept is present iff the prompt names it (whole word, case-insensitive).
  Weaker: a concept the prompt does not name but the model draws anyway becomes a negative
  (on the toy world about a quarter of the images whose prompt leaves the colour unnamed show
  a given colour), which both teaches the detector to ignore it and, in the held-out split,
  counts those images as false positives, so τ goes up and recall down.

Per concept and step a ridge read-out maps the standardised code to 1 for runs whose label
holds the concept and 0 for every other run (other concepts of its kind, prompts naming
none), in the dual form on a fit split: one solve per step serves every concept, is closed
form and deterministic, and with far fewer runs than features a logistic read-out would
separate the fit split perfectly and need its regularisation tuned per concept, while the
threshold is calibrated on held-out runs anyway, so the score need not be a probability.
Each step's score is then rescaled so that the fit split's negatives have mean 0 and
standard deviation 1 at that step (folded into W and b; serving is unchanged). Without it
the early steps, where the negatives' scores spread most, set the maximum over steps for
many negatives, τ rises, and a concept the model settles on late (unnamed in the prompt) is
missed: on the toy world, at the same 1 % false-positive rate, recall on images whose prompt
leaves the colour unnamed rose from 0.89–0.92 to 0.94–0.96 (held-out runs; shapes likewise).

The threshold τ_c is calibrated on a held-out split (a hash of prompt and seed, so a run
stays on its side when the runs file grows): the smallest value that at most a fraction
``fpr`` of the held-out negatives reach, in the maximum over steps of the evidence
(steering/detector.py: the running mean with a step-weight floor; what the gate's latch
acts on). Held-out precision and recall at τ_c are reported and
stored. With a work folder every recorded batch (codes and the judge's labels) is kept on
disk (training/run_store.py), so a killed fit resumes and a refit with other settings (ridge,
alpha, fpr) records nothing again.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from steering.detector import LABEL_SOURCES, ConceptDetectors
from steering.hooks import cond_half, to_tokens
from steering.pipeline import SteeredPipeline
from steering.readout import mean_codes
from steering.recording import generate_with
from training.jsonl import is_seed, read_objects
from training.run_store import RunStore

Judge = Callable[[list[Image.Image]], list[set[str]]]
MIN_RUNS = 3  # positives and negatives per concept, in each split


@dataclass(frozen=True)
class Run:
    """One unedited generation to record: prompt, seed and, optionally, its given labels."""

    prompt: str
    seed: int
    concepts: frozenset[str] | None = None


def load_runs(path: str | Path) -> list[Run]:
    """Read a runs JSONL: {"prompt", "seed", "concepts": [names present]} per line;
    ``concepts`` is optional (a `steer collect` kind -> concept object is accepted too)."""
    runs: list[Run] = []
    what = ("an object with a string \"prompt\" and an integer \"seed\" (and optionally "
            "\"concepts\": [names present])")
    for where, d in read_objects(path, what):
        if not isinstance(d.get("prompt"), str) or not is_seed(d.get("seed")):
            raise ValueError(f"{where}: each line needs a string \"prompt\" and an integer "
                             "\"seed\" (and optionally \"concepts\": [names present])")
        given = d.get("concepts")
        if isinstance(given, dict):
            given = list(given.values())
        if given is not None and not (isinstance(given, list)
                                      and all(isinstance(c, str) for c in given)):
            raise ValueError(f"{where}: \"concepts\" must be a list of concept names")
        runs.append(Run(d["prompt"], d["seed"], None if given is None else frozenset(given)))
    return runs


def load_judge(spec: str) -> Judge:
    """The callable named ``module:callable`` (e.g. training.toyworld.judge:judge)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--judge {spec!r}: write it as module:callable, e.g. "
                         "training.toyworld.judge:judge")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--judge {spec!r}: cannot import {module_name!r} ({e}); is it on "
                         "PYTHONPATH?") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--judge {spec!r}: {module_name} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]


def record_mean_codes(steered: SteeredPipeline, prompts: Sequence[str], seeds: Sequence[int],
                      steps: int, guidance: float, batch_size: int = 64,
                      progress: Callable[[int], None] | None = None) -> Tensor:
    """[steps, len(prompts), n] float16: each unedited run's mean SAE code over tokens at the
    hook (the cond half under guidance), per table row."""
    return record_runs(steered, prompts, seeds, steps, guidance, batch_size, progress)[0]


def record_runs(steered: SteeredPipeline, prompts: Sequence[str], seeds: Sequence[int],
                steps: int, guidance: float, batch_size: int = 64,
                progress: Callable[[int], None] | None = None,
                label: Callable[[list[Image.Image]], list[set[str]]] | None = None,
                store: RunStore | None = None) -> tuple[Tensor, list[set[str]] | None]:
    """Mean codes as :func:`record_mean_codes` and, with ``label``, its verdict on each
    batch's images (the very runs recorded); batches found in ``store`` are not generated
    again, and each new one is saved there."""
    if steered.bundle is None:
        raise ValueError("recording codes per table row needs a pipeline loaded with its bundle")
    sae = steered.sae
    out: list[Tensor] = []
    labels: list[set[str]] = []
    for start in range(0, len(prompts), batch_size):
        end = min(start + batch_size, len(prompts))
        kept = store.load(start, prompts[start:end], seeds[start:end]) if store else None
        if kept is not None and (label is None or kept[1] is not None):
            out.append(kept[0])
            labels.extend(kept[1] or [])
            if progress is not None:
                progress(end - start)
            continue
        rows: dict[int, Tensor] = {}

        def record(step: int, t: int, r: int | None, x: Tensor,
                   rows: dict[int, Tensor] = rows) -> None:
            assert r is not None  # the bundle is loaded: generate_with gives rows
            x = cond_half(x, guidance > 1.0)
            b, _, h, w = x.shape
            values, indices = sae.encode(to_tokens(x).to(sae.dtype))
            codes = mean_codes(values.view(b, h * w, -1), indices.view(b, h * w, -1),
                               sae.num_latents)
            rows[r] = codes.half().cpu()

        images = generate_with(steered, prompts[start:end], seeds[start:end], steps, guidance,
                               record)
        if len(rows) != steered.bundle.tables.num_steps:
            raise ValueError(f"the runs visited {len(rows)} table rows, the bundle has "
                             f"{steered.bundle.tables.num_steps}: use the bundle's step count")
        out.append(torch.stack([rows[r] for r in sorted(rows)]))
        verdict = label(list(images)) if label is not None else None
        labels.extend(verdict or [])
        if store is not None:
            store.save(start, prompts[start:end], seeds[start:end], out[-1], verdict)
        if progress is not None:
            progress(end - start)
    return torch.cat(out, dim=1), (labels if label is not None else None)


def ridge_readout(x: Tensor, y: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Ridge from standardised x [N, n] to centred y [N, K], folded back to raw x:
    returns (w [n, K], b [K]) with x @ w + b ≈ y (dual form: N ≪ n)."""
    if len(x) < 2:
        raise ValueError("a read-out needs at least two labelled runs")
    mean, std = x.mean(0), x.std(0)
    # a constant feature becomes a zero column and gets weight 0; the floor keeps a feature
    # seen in one run from getting a weight that explodes wherever it is strong
    std = std.clamp_min(1e-2 * float(std.mean()) + 1e-12)
    xs = (x - mean) / std
    gram = xs @ xs.T + ridge * len(x) * torch.eye(len(x), dtype=x.dtype)
    w = xs.T @ torch.linalg.solve(gram, y) / std.unsqueeze(1)
    return w, -(mean @ w)


def prompt_labels(prompts: Sequence[str], concepts: Sequence[str]) -> list[set[str]]:
    """Per prompt, the concepts it names (whole word, case-insensitive): the weak fallback."""
    patterns = {c: re.compile(rf"\b{re.escape(c)}\b", re.IGNORECASE) for c in concepts}
    return [{c for c, p in patterns.items() if p.search(text)} for text in prompts]


def heldout_split(runs: Sequence[Run], fraction: float) -> Tensor:
    """[N] bool: the runs held out for calibration, by a hash of prompt and seed (stable when
    runs are added or reordered)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--holdout {fraction} must be between 0 and 1 (e.g. 0.25)")

    def share(r: Run) -> float:
        digest = hashlib.sha256(f"{r.prompt}\n{r.seed}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0 ** 64

    return torch.tensor([share(r) < fraction for r in runs], dtype=torch.bool)


def check_counts(labels: Sequence[set[str]], concepts: Sequence[str], heldout: Tensor,
                 fraction: float, min_runs: int = MIN_RUNS) -> None:
    """Raise ValueError naming every concept with too few positive or negative runs in the
    fit or held-out split, and about how many more labelled runs each needs."""
    problems = []
    for c in concepts:
        has = torch.tensor([c in lab for lab in labels], dtype=torch.bool)
        for what, mask in (("showing", has), ("without", ~has)):
            fit, held = int((mask & ~heldout).sum()), int((mask & heldout).sum())
            if fit >= min_runs and held >= min_runs:
                continue
            more = max(math.ceil((min_runs - fit) / (1 - fraction)) if fit < min_runs else 0,
                       math.ceil((min_runs - held) / fraction) if held < min_runs else 0)
            problems.append(f"{c!r}: {fit} runs {what} it in the fit split and {held} held "
                            f"out (needs {min_runs} in each): about {more} more labelled runs "
                            f"{what} it")
    if problems:
        raise ValueError("too few labelled runs to fit and calibrate the detectors — "
                         + "; ".join(problems))


def negative_spread(scores: Tensor, negative: Tensor) -> tuple[Tensor, Tensor]:
    """Per concept, the mean and standard deviation of ``scores`` [N, C] over the runs
    without it (``negative`` [N, C] bool); the deviation is floored so that a concept every
    negative scores alike keeps a finite scale."""
    n = negative.sum(0).clamp_min(1).to(scores.dtype)
    mean = (scores * negative).sum(0) / n
    var = (((scores - mean) ** 2) * negative).sum(0) / (n - 1).clamp_min(1)
    return mean, var.sqrt().clamp_min(1e-6)


def calibrate_threshold(negatives: Tensor, fpr: float) -> float:
    """The smallest τ that at most ⌊fpr·N⌋ of the N negative statistics reach (≥ τ): the
    conservative (1 − fpr) quantile, so the held-out false-positive rate is ≤ fpr."""
    allowed = math.floor(fpr * len(negatives) + 1e-9)
    ranked = negatives.float().sort(descending=True).values
    return float(torch.nextafter(ranked[allowed], torch.tensor(math.inf)))


def fit_detectors(codes: Tensor, labels: Sequence[set[str]], concepts: Sequence[str],
                  heldout: Tensor, fpr: float = 0.01, label_source: str = "judge",
                  ridge: float = 1.0, fraction: float = 0.25, min_runs: int = MIN_RUNS,
                  command: str = "", alpha: float = 0.0) -> ConceptDetectors:
    """Detectors for ``concepts`` (the bundle's, in order) from mean codes [steps, N, n],
    each run's label set and the held-out mask: ridge on the fit split, τ and the held-out
    precision/recall (of the evidence with step-weight floor ``alpha``) on the rest."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"--fpr {fpr} must be between 0 and 1 (e.g. 0.01)")
    check_counts(labels, concepts, heldout, fraction, min_runs)
    steps, _, n = codes.shape
    target = torch.tensor([[c in lab for c in concepts] for lab in labels],
                          dtype=torch.float64)  # [N, C]
    fit = ~heldout
    y = target[fit]
    y_mean = y.mean(0)
    weight = torch.zeros(len(concepts), steps, n, dtype=torch.float64)
    bias = torch.zeros(len(concepts), steps, dtype=torch.float64)
    negative = y == 0  # [N_fit, C]
    for t in range(steps):
        x = codes[t, fit].double()
        w, b = ridge_readout(x, y - y_mean, ridge)
        b = b + y_mean
        # each step's score in units of the fit split's negatives at that step (mean 0, sd 1):
        # early steps, where negatives' scores spread widely, then cannot set the maximum
        # over steps that τ is calibrated on (negative_spread)
        shift, scale = negative_spread(x @ w + b, negative)
        weight[:, t] = (w / scale).T
        bias[:, t] = (b - shift) / scale
    detectors = ConceptDetectors(list(concepts), weight, bias.float(),
                                 torch.zeros(len(concepts)), fpr, label_source,
                                 command=command, alpha=alpha)
    # calibrated on what serving computes: the stored float16 weights
    stat = detectors.statistic(codes[:, heldout])  # [N_held, C]
    truth = target[heldout].bool()
    thresholds = []
    for i, c in enumerate(concepts):
        tau = calibrate_threshold(stat[~truth[:, i], i], fpr)
        flagged = stat[:, i] >= tau
        tp = int((flagged & truth[:, i]).sum())
        fp = int((flagged & ~truth[:, i]).sum())
        positives = int(truth[:, i].sum())
        detectors.heldout[c] = {
            "threshold": tau, "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / positives, "positives": positives,
            "negatives": int((~truth[:, i]).sum()), "false_positives": fp}
        thresholds.append(tau)
    detectors.threshold = torch.tensor(thresholds, dtype=torch.float32)
    return detectors


def resolve_label_source(requested: str | None, judge: Judge | None, runs: Sequence[Run]
                         ) -> str:
    """The label source to use: the requested one (checked) or, by default, the judge if
    given, else the runs file's labels if every run has them, else the prompts."""
    if requested is not None and requested not in LABEL_SOURCES:
        raise ValueError(f"--labels {requested!r}: use one of {', '.join(LABEL_SOURCES)}")
    source = requested or ("judge" if judge is not None else
                           "given" if all(r.concepts is not None for r in runs) else "prompt")
    if source == "judge" and judge is None:
        raise ValueError("--labels judge needs --judge module:callable (e.g. "
                         "training.toyworld.judge:judge)")
    if source == "given":
        unlabelled = sum(r.concepts is None for r in runs)
        if unlabelled:
            raise ValueError(f"--labels given: {unlabelled} of {len(runs)} runs have no "
                             "\"concepts\" field; label them, pass --judge, or use "
                             "--labels prompt")
    return source


def judged(judge: Judge, images: list[Image.Image], known: set[str]) -> list[set[str]]:
    """The judge's verdict on a batch, checked: one set of names per image; names outside
    the bundle are dropped (the judge may know more concepts than the bundle)."""
    verdict = judge(images)
    if not isinstance(verdict, list) or len(verdict) != len(images) or not all(
            isinstance(v, set | frozenset | list | tuple)
            and all(isinstance(c, str) for c in v) for v in verdict):
        raise ValueError(f"the judge must return one set of concept names per image (got "
                         f"{type(verdict).__name__} for {len(images)} images)")
    return [set(v) & known for v in verdict]


def fit_bundle_detectors(steered: SteeredPipeline, runs: Sequence[Run], guidance: float,
                         label_source: str, judge: Judge | None = None, fpr: float = 0.01,
                         holdout: float = 0.25, steps: int | None = None,
                         batch_size: int = 64, ridge: float = 1.0,
                         progress: Callable[[int], None] | None = None,
                         command: str = "", alpha: float = 0.0,
                         work_dir: str | Path | None = None) -> ConceptDetectors:
    """Record (and, with a judge, judge) the runs with ``steered``'s bundle and fit its
    detectors; labels known up front are checked before any image is generated. With
    ``work_dir`` the recorded batches are kept there and reused (resumable)."""
    bundle = steered.bundle
    if bundle is None:
        raise ValueError("fitting the detectors needs a pipeline loaded with its bundle")
    concepts = bundle.concept_names
    heldout = heldout_split(runs, holdout)
    prompts = [r.prompt for r in runs]
    labels: list[set[str]] = []
    if label_source == "prompt":
        labels = prompt_labels(prompts, concepts)
    elif label_source == "given":
        labels = [set(r.concepts or ()) & set(concepts) for r in runs]
    if labels:
        check_counts(labels, concepts, heldout, holdout)  # fail before generating
    label = None
    if label_source == "judge":
        assert judge is not None

        def label(images: list[Image.Image]) -> list[set[str]]:
            return judged(judge, images, set(concepts))

    steps = steps or bundle.manifest.steps
    store = None if work_dir is None else RunStore(
        work_dir, bundle.manifest.pipeline_fingerprint, steps, guidance)
    codes, verdicts = record_runs(steered, prompts, [r.seed for r in runs], steps, guidance,
                                  batch_size, progress, label, store)
    return fit_detectors(codes, verdicts if verdicts is not None else labels, concepts,
                         heldout, fpr, label_source, ridge, holdout, command=command,
                         alpha=alpha)


def report_lines(detectors: ConceptDetectors) -> list[str]:
    """One line per concept: τ and the held-out precision and recall at it."""
    lines = [f"{'concept':<12} {'tau':>8} {'precision':>9} {'recall':>6}  held-out +/-"]
    for c in detectors.concepts:
        h: dict[str, Any] = detectors.heldout.get(c, {})
        precision = "—" if h.get("precision") is None else f"{h['precision']:.3f}"
        lines.append(f"{c:<12} {h.get('threshold', float('nan')):>8.4f} {precision:>9} "
                     f"{h.get('recall', float('nan')):>6.3f}  {h.get('positives')}/"
                     f"{h.get('negatives')}")
    return lines
