"""`steer eval`: prompt sets and seeds, the resumable cell cache, the choice rule,
writing defaults into a bundle, and the smoke run end to end on the shipped toy assets."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import ASSETS
from training.evaluation import prompts as P
from training.evaluation.run import CellCache, Job, RunStats, choose, run_jobs
from training.toyworld import detection_check, prompt_sets, steering_check
from training.toyworld.world import KINDS, SYNONYMS

# -- prompt sets and seeds -----------------------------------------------------------------


def _all_sets(n: int) -> dict[str, list[P.PromptSet]]:
    out: dict[str, list[P.PromptSet]] = {}
    for split in ("heldout", "tune"):
        sets = []
        for c in P.ALL_CONCEPTS:
            sets += [P.ua_set(c, n, split), P.ira_set(c, n, split)]
            if c in SYNONYMS:
                sets.append(P.synonym_set(c, n, split))
        for s in P.MULTI_SETS:
            sets += P.multi_sets(s, n, split)
        out[split] = sets
    return out


def test_seeds_are_unique_and_disjoint_from_every_other_range() -> None:
    sets = _all_sets(P.BLOCK)  # the largest sets the layout allows
    seeds = {split: [it.seed for s in v for it in s.items] for split, v in sets.items()}
    every = seeds["heldout"] + seeds["tune"]
    assert len(every) == len(set(every))  # unique per (split, set, concept, i)
    assert all(P.EVAL_SEED_BASE <= s < P.EVAL_SEED_BASE + P.SPAN for s in seeds["heldout"])
    assert all(P.TUNE_SEED_BASE <= s < P.TUNE_SEED_BASE + P.SPAN for s in seeds["tune"])
    # every other range of the project lies elsewhere
    others = {
        "importance/sae/heldout": range(prompt_sets.IMPORTANCE_SEED_BASE,
                                        prompt_sets.HELDOUT_SEED_BASE + 100_000),
        "bundle tuning": range(steering_check.TUNE_SEED_BASE,
                               steering_check.TUNE_SEED_BASE + 100_000),
        "bundle check": range(steering_check.CHECK_SEED_BASE,
                              steering_check.CHECK_SEED_BASE + 100_000),
        "policy 1.1M–1.4M": range(detection_check.CALIBRATION_SEED_BASE, 1_400_000),
    }
    for name, r in others.items():
        assert not [s for s in every if s in r], name
    collected = [r["seed"] for r in prompt_sets.canonical_prompts(8, 10_000)
                 + prompt_sets.varied_prompts(1536, 20_000)]
    assert not set(collected) & set(every)
    with pytest.raises(ValueError):
        P.ua_set("red", P.BLOCK + 1)


def test_prompt_sets_ask_mention_and_cycle() -> None:
    ua, ira = P.ua_set("red", 72), P.ira_set("red", 72)
    assert all(it.asked["colour"] == "red" and set(it.asked) == set(KINDS) for it in ua.items)
    for it in ua.items:  # every attribute is named, so CRA can be judged
        assert all(word in it.prompt for word in it.asked.values())
    assert {it.asked["colour"] for it in ira.items} == {"green", "blue", "yellow"}
    assert [it.asked["colour"] for it in ira.items[:6]] == ["green", "blue", "yellow"] * 2
    combos = {(it.asked["shape"], it.asked["background"]) for it in ua.items[:36]}
    assert len(combos) == 12  # other kinds cycle over every combination
    templates = {("background," in it.prompt, " in red" in it.prompt) for it in ua.items}
    assert len(templates) == 3
    assert P.ua_set("red", 72) == ua  # deterministic
    assert P.ua_set("red", 10).items == ua.items[:10]  # a longer run extends a shorter one
    assert P.ua_set("red", 5, "tune").items[0].seed != ua.items[0].seed

    syn = P.synonym_set("red", 8)
    assert all(it.asked["colour"] == "red" and " red" not in it.prompt for it in syn.items)
    assert {w for it in syn.items for w in ("crimson", "scarlet") if w in it.prompt} == {
        "crimson", "scarlet"}
    with pytest.raises(ValueError, match="no synonym"):
        P.synonym_set("blue", 4)

    parts = P.multi_sets(("green", "yellow", "triangle"), 100)
    ua_sizes = [len(s) for s in parts if "/ua/" in s.name]
    assert sum(ua_sizes) == 100 and max(ua_sizes) - min(ua_sizes) <= 1
    members = {"green": "colour", "yellow": "colour", "triangle": "shape"}
    for s in parts:
        member = s.name.rsplit("/", 1)[1]
        kind = members[member]
        if "/ira/" in s.name:  # in the member's kind, never asks for a member of the set
            assert not {it.asked[kind] for it in s.items} & set(members)
        else:
            assert {it.asked[kind] for it in s.items} == {member}


# -- the cell cache: resume ----------------------------------------------------------------


class CountingMethod:
    """A fake method: grey images, counts generate calls, can fail after some calls."""

    def __init__(self, name: str = "none", fail_after: int | None = None) -> None:
        self.name, self.settings = name, {"fake": True}
        self.calls, self.fail_after = 0, fail_after

    def generate(self, prompts, seeds, suppressed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        return [Image.new("RGB", (32, 32), (128, 128, 128)) for _ in prompts]


class EchoJudge:
    """A fake classifier that finds nothing but circles, red and plain."""

    def predict(self, images):
        return [{"shape": "circle", "colour": "red", "background": "plain"} for _ in images]


def _jobs(method, n: int) -> list[Job]:
    return [Job(method, ("red",), P.ua_set("red", n)), Job(method, ("red",), P.ira_set("red", n)),
            Job(method, ("circle",), P.ua_set("circle", n))]


def test_rerun_generates_nothing_new_and_resumes_a_broken_run(tmp_path: Path) -> None:
    cache = CellCache(tmp_path)
    broken = CountingMethod(fail_after=2)
    with pytest.raises(RuntimeError):
        run_jobs(_jobs(broken, 10), EchoJudge(), cache, batch_size=8, progress=False)
    assert broken.calls == 2  # 16 of the red group's 20 images were judged and stored

    method, stats = CountingMethod(), RunStats()
    judged = run_jobs(_jobs(method, 10), EchoJudge(), cache, batch_size=8, progress=False,
                      stats=stats)
    assert stats.images == 4 + 10 and method.calls == 3  # red: the last 4; circle: 8 + 2
    assert [len(j) for j in judged] == [10, 10, 10]
    assert judged[0][0].asked["colour"] == "red" and judged[0][0].predicted["shape"] == "circle"

    again = CountingMethod()
    assert run_jobs(_jobs(again, 10), EchoJudge(), cache, batch_size=8,
                    progress=False) == judged
    assert again.calls == 0  # a second run generates nothing new
    shorter = CountingMethod()
    assert [len(j) for j in run_jobs(_jobs(shorter, 4), EchoJudge(), cache, progress=False)] \
        == [4, 4, 4] and shorter.calls == 0  # a smaller run reads the prefix
    longer = CountingMethod()
    run_jobs(_jobs(longer, 12), EchoJudge(), cache, batch_size=64, progress=False)
    assert longer.calls == 2  # only the 2 new items of each suppressed set's cells
    assert cache.image_path(_jobs(longer, 1)[0]).exists()  # first image kept for the grid

    other = CountingMethod()
    other.settings = {"fake": "other settings"}
    run_jobs(_jobs(other, 2), EchoJudge(), cache, progress=False)
    assert other.calls == 2  # other settings: other cells
    rerun = CountingMethod()
    run_jobs(_jobs(rerun, 2), EchoJudge(), CellCache(tmp_path, rerun=["none"]), progress=False)
    assert rerun.calls == 2  # --rerun none ignores the cache


def _point(g: float, ua: float, ira: float, cra: float) -> dict:
    def rate(v: float) -> dict:
        return {"value": v, "trials": 10, "successes": round(10 * v), "ci95_low": 0.0,
                "ci95_high": 1.0}

    return {"gamma": g, "percentile": 99.0, "per_kind": {"colour": {
        "UA": rate(ua), "IRA": rate(ira), "CRA": rate(cra), "mean": (ua + ira + cra) / 3}}}


def test_choice_prefers_points_reaching_ua_target() -> None:
    points = [_point(1, 0.5, 1.0, 1.0), _point(10, 0.95, 0.6, 0.6), _point(30, 1.0, 0.5, 0.5)]
    chosen = choose(points, "colour")
    assert chosen["gamma"] == 10 and chosen["reaches_ua_target"]
    chosen = choose([*points[:1], _point(3, 0.9, 0.2, 0.2)], "colour")
    assert chosen["gamma"] == 1 and not chosen["reaches_ua_target"]  # none reaches: max mean
    tie = [_point(1, 0.0, 0.9, 0.9), _point(30, 0.5, 0.9, 0.4)]
    assert choose(tie, "colour")["gamma"] == 30  # equal means: the one removing more


def test_choice_per_concept_reads_each_concepts_own_figures() -> None:
    a, b = _point(1, 0.5, 1.0, 1.0), _point(2, 0.97, 0.9, 0.9)
    a["per_concept"] = {"red": a["per_kind"]["colour"], "green": b["per_kind"]["colour"]}
    b["per_concept"] = {"red": b["per_kind"]["colour"], "green": a["per_kind"]["colour"]}
    assert choose([a, b], "red", "per_concept")["gamma"] == 2  # red reaches UA 0.97 at γ 2
    assert choose([a, b], "green", "per_concept")["gamma"] == 1  # green reaches it at γ 1
    with pytest.raises(ValueError, match="no sweep point measured 'blue'"):
        choose([a, b], "blue", "per_concept")


def test_write_defaults_rewrites_the_manifest_and_rehashes(tiny_pipeline_dir, tiny_bundle_dir,
                                                           tmp_path) -> None:
    from steering.bundle import SteeringBundle
    from steering.pipeline import SteeredPipeline
    from training.evaluation.run import EvalConfig, Evaluation

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bundle_dir)
    steered = SteeredPipeline.from_pretrained(tiny_pipeline_dir, bundle_dir)
    evaluation = Evaluation(EvalConfig(bundle=bundle_dir, work_dir=tmp_path / "w"), steered,
                            EchoJudge())
    written = evaluation.write_defaults({"colour": {"gamma": 7.0, "percentile": 95.0}})
    assert written["sha256_before"] != written["sha256_after"]
    # (γ, percentile, gate margin): the plain-recipe sweep point sets no margin, so it stays
    assert written["concepts"] == {c: [7.0, 95.0, 0.0] for c in ("red", "green", "blue")}
    loaded = SteeringBundle.load(bundle_dir)  # checksums still verify
    assert loaded.concept("red").default_gamma == 7.0
    assert loaded.concept("blue").default_percentile == 95.0
    assert loaded.concept("circle").default_gamma == 5.0  # other kinds untouched
    assert evaluation.steered.concepts["green"].default_gamma == 7.0  # reloaded
    per_concept = {"green": {"gamma": 2.0, "percentile": 90.0, "gate_margin": 0.1}}
    written = evaluation.write_defaults({"colour": {"gamma": 5.0, "percentile": 95.0}},
                                        per_concept)
    assert written["concepts"]["green"] == [2.0, 90.0, 0.1]  # its own point
    assert written["concepts"]["red"] == [5.0, 95.0, 0.0]  # the kind's


# -- the smoke run end to end on the shipped toy assets ------------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`steer eval --smoke` once (and a second time, to see it resume) on the shipped assets."""
    from training.evaluation.cli import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None: ...

    root = tmp_path_factory.mktemp("eval-smoke")
    args = ["eval", "--smoke", "--pipeline", str(ASSETS / "toy-pipeline"),
            "--bundle", str(ASSETS / "toy-bundle"), "--classifier", str(ASSETS / "toy-classifier"),
            "--work-dir", str(root / "work"), "--docs", str(root / "docs"), "--no-progress",
            "--note", "Cells of this run came from nowhere else."]
    started = time.perf_counter()
    first = CliRunner().invoke(app, args)
    seconds = time.perf_counter() - started
    assert first.exit_code == 0, first.output
    results = json.loads((root / "work" / "smoke" / "results.json").read_text())
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    again = json.loads((root / "work" / "smoke" / "results.json").read_text())
    return {"root": root, "output": first.output, "seconds": seconds, "results": results,
            "again": again}


def test_smoke_run_writes_results_and_docs(smoke) -> None:
    root, results = smoke["root"], smoke["results"]
    # Its time (≈ 30 s on a free 2-core box) is reported, not asserted: the box is shared.
    print(f"\nsmoke run: {smoke['seconds']:.1f} s")
    md = (root / "docs" / "results.md").read_text()
    assert "    steer eval --pipeline" in md and "--smoke" in md
    assert "\nCells of this run came from nowhere else.\n" in md and "--note" not in md
    assert "## Overall" in md and "## Synonyms" in md
    assert "## γ × percentile sweep (tuning split)" in md and "red+circle" in md
    for png in ("eval-pareto.png", "eval-grid.png"):
        assert (root / "docs" / "images" / png).stat().st_size > 1000
    single = results["heldout"]["single"]
    assert set(single) == {"none", "negative_prompt", "sld", "saeuron", "ours"}
    assert set(results["sweep"]) == {"saeuron", "ours"}
    assert set(results["sweep"]["ours"]["chosen"]) == {"colour", "shape"}
    assert set(results["sweep"]["ours"]["chosen_per_concept"]) == {"red", "circle"}
    assert "Per concept, the same rule" in md
    assert "method" in smoke["output"] and "ours" in smoke["output"]  # the summary table
    assert smoke["again"]["images_generated"] == 0  # the rerun resumed from the cells
    assert smoke["again"]["heldout"] == results["heldout"]


def test_smoke_sanity_none_keeps_the_concept_and_sld_runs(smoke) -> None:
    single = smoke["results"]["heldout"]["single"]
    none = single["none"]["overall"]
    assert none["UA"]["trials"] == 8 and none["UA"]["value"] <= 0.125  # the concept is there
    assert none["IRA"]["value"] >= 0.75 and none["CRA"]["value"] >= 0.75
    sld = single["sld"]
    assert sld["overall"]["UA"]["trials"] == 8
    assert sld["settings"]["sld_guidance_scale"] == 2000  # SafetyConfig.STRONG


def test_smoke_implicit_set_pairs_steered_with_unedited(smoke) -> None:
    """The unnamed-kind set: every non-reference method gets removal / false edits / kept per
    concept, judged against the same prompts and seeds unedited."""
    implicit = smoke["results"]["heldout"]["implicit"]
    assert "none" not in implicit and "ours" in implicit
    ours = implicit["ours"]
    assert set(ours["per_concept"]) == {"red", "circle"}
    for figures in ours["per_concept"].values():
        # every image falls in exactly one of removal's or false edits' denominators
        assert figures["removal"]["trials"] + figures["false_edits"]["trials"] == 4
        assert figures["kept"]["trials"] == figures["false_edits"]["trials"]
    # a negative prompt changes the unconditional branch, so every image's pixels
    neg = implicit["negative_prompt"]["overall"]
    assert neg["false_edits"]["value"] == 1.0 or neg["false_edits"]["trials"] == 0


def test_implicit_prompts_leave_the_kind_unnamed() -> None:
    items = P.implicit_set("red", 36).items
    assert all("colour" not in it.asked for it in items)
    colour_words = {c for c in KINDS["colour"]} | {w for c in KINDS["colour"]
                                                   for w in SYNONYMS.get(c, ())}
    assert not any(w in it.prompt.split() for it in items for w in colour_words)
    assert len({(it.asked["shape"], it.asked["background"]) for it in items}) == 12
    seeds = {it.seed for it in items}
    assert not seeds & {it.seed for s in _all_sets(P.BLOCK)["heldout"] for it in s.items}


def test_smoke_reports_the_detectors_against_the_judge(smoke) -> None:
    """The unedited runs carry the detectors' findings: precision and recall per concept on
    the direct and implicit sets, in results.json and results.md."""
    detection = smoke["results"]["heldout"]["detection"]
    assert detection["images"] == {"direct": 16, "implicit": 8}  # ua + ira of red, circle
    for c in ("red", "circle"):
        figures = detection["per_concept"][c]
        assert figures["recall"]["trials"] >= 4  # at least the 4 UA images showing c
        assert figures["implicit_recall"]["trials"] <= figures["recall"]["trials"]
    md = (smoke["root"] / "docs" / "results.md").read_text()
    assert "## Detection (held-out, unedited runs)" in md


class DetectingMethod(CountingMethod):
    """A fake method that also reports detections: red in every image."""

    def generate_detected(self, prompts, seeds, suppressed):
        return self.generate(prompts, seeds, suppressed), [frozenset({"red"})] * len(prompts)


def test_detections_are_stored_with_the_cell_and_read_back(tmp_path: Path) -> None:
    from training.evaluation.metrics import detection_metrics

    cache = CellCache(tmp_path)
    first = run_jobs(_jobs(DetectingMethod(), 3), EchoJudge(), cache, progress=False)
    assert first[0][0].detected == frozenset({"red"})
    again = DetectingMethod()
    assert run_jobs(_jobs(again, 3), EchoJudge(), cache, progress=False) == first
    assert again.calls == 0
    images = [j for cell in first for j in cell]
    red = detection_metrics(images, "red")  # the judge sees red everywhere: all agree
    assert (red["precision"].value, red["recall"].value) == (1.0, 1.0)
    circle = detection_metrics(images, "circle")  # the judge sees circles, never flagged
    assert circle["recall"].value == 0.0 and circle["precision"].trials == 0
    plain = run_jobs(_jobs(CountingMethod("other"), 2), EchoJudge(), cache, progress=False)
    assert plain[0][0].detected is None  # a method without detections records none
    assert detection_metrics([j for c in plain for j in c], "red")["recall"].trials == 0
