"""The content-safety policy on its own: loading and validating files (errors name the file,
policy, entry and field), `steer policy check`, and the apply logic (edit merging, detection
rules, steer / refuse) on a stand-in pipeline whose scores the test sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from service import enforce
from service.catalog import load_catalog
from service.cli_policy import policy_app
from service.policy import (
    DetectRule,
    Policy,
    PolicyError,
    check_policies,
    load_checked,
    load_policies,
)
from service.settings import REPO_ASSETS
from steering.edits import ConceptEdit, Direction, resolve_edits
from steering.pipeline import GenerationRequest, GenerationResult

ROOT = Path(__file__).resolve().parents[2]
TOY_POLICY = ROOT / "policies" / "toy.toml"
CONCEPTS = load_catalog(REPO_ASSETS / "toy-bundle").concepts
RED = CONCEPTS["red"]  # a policy entry without γ / percentile takes the bundle's defaults

GOOD = """
default = "public"

[policies.public]
suppress = [{ concept = "red" }, { concept = "blue", gamma = 3.5, percentile = 99.5 }]
detect = [{ concept = "cross", threshold = 0.5, action = "refuse" },
          { concept = "striped", threshold = 0.4, action = "steer" }]

[policies.trusted]
detect = [{ concept = "cross", threshold = 0.5, action = "mark" }]
"""


def write(tmp_path: Path, text: str, name: str = "policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- loading and validation --------------------------------------------------------------------

def test_a_good_file_loads_with_names_defaults_and_a_sha(tmp_path):
    policies = load_checked(write(tmp_path, GOOD), CONCEPTS)
    assert policies is not None and policies.default == "public"
    public = policies.get(None)
    assert public.name == "public" and policies.get("trusted").name == "trusted"
    red, blue = public.suppressions(CONCEPTS)
    assert (red.gamma, red.percentile) == (CONCEPTS["red"].default_gamma,
                                           CONCEPTS["red"].default_percentile)
    assert (blue.gamma, blue.percentile, blue.direction) == (3.5, 99.5, Direction.SUPPRESS)
    assert public.detect[0] == DetectRule(concept="cross", threshold=0.5, action="refuse")
    assert len(policies.sha256) == 64
    assert load_checked(None, CONCEPTS) is None  # no file, no policy
    with pytest.raises(PolicyError, match="no policy 'admin'; it defines public, trusted"):
        policies.get("admin")


def test_yaml_is_read_like_toml(tmp_path):
    yaml_text = """
default: public
policies:
  public:
    suppress: [{concept: red}]
    detect: [{concept: cross, threshold: 0.5, action: refuse}]
"""
    policies = load_checked(write(tmp_path, yaml_text, "policy.yaml"), CONCEPTS)
    assert policies is not None and policies.get(None).suppress[0].concept == "red"


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD.replace('threshold = 0.5, action = "refuse"', 'threshold = 0.5, action = "block"'),
     "policy 'public', detect[0] (concept 'cross'), field action: Input should be 'mark', "
     "'steer' or 'refuse'"),
    (GOOD.replace("threshold = 0.4", "threshold = -1"),
     "policy 'public', detect[1] (concept 'striped'), field threshold: Input should be "
     "greater than 0"),
    (GOOD.replace('{ concept = "red" }', '{ concept = "red", strength = 3 }'),
     "policy 'public', suppress[0] (concept 'red'), field strength: unknown field; allowed: "
     "concept, gamma, percentile"),
    (GOOD.replace('threshold = 0.4, ', ''),
     "policy 'public', detect[1] (concept 'striped'), field threshold: missing"),
    (GOOD.replace('default = "public"', 'default = "everyone"'),
     "field default: 'everyone' is not a policy; defined: public, trusted"),
    (GOOD.replace('default = "public"', ''), "field default: missing"),
    (GOOD.replace("[policies.trusted]", "[policies.'bad name']"),
     "policy 'bad name': names use letters, digits"),
    (GOOD.replace('{ concept = "blue", gamma = 3.5, percentile = 99.5 }', '{ concept = "red" }'),
     "policy 'public', suppress[1] (concept 'red'): listed twice; keep one entry"),
    (GOOD.replace('"striped", threshold = 0.4, action = "steer"',
                  '"red", threshold = 0.4, action = "steer"'),
     "policy 'public', detect[1] (concept 'red'), field action: the concept is always "
     "suppressed by this policy"),
    ("default = [", "not valid TOML"),
    (GOOD.replace('default = "public"', 'defualt = "public"\ndefault = "public"'),
     "field defualt: unknown field; allowed: default, policies"),
    (GOOD.replace("[policies.trusted]", '[policies.trusted]\nname = "admin"'),
     "policy 'trusted', field name: unknown field; allowed: description, suppress, detect"),
])
def test_structural_errors_name_the_file_policy_entry_and_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as exc:
        load_policies(path)
    assert str(exc.value).startswith(f"{path}: ")
    assert expected in str(exc.value)


@pytest.mark.parametrize(("text", "expected"), [
    (GOOD.replace('concept = "cross", threshold = 0.5, action = "refuse"',
                  'concept = "sword", threshold = 0.5, action = "refuse"'),
     "policy 'public', detect[0] (concept 'sword'), field concept: not in the bundle; known: "
     "dotted, plain"),
    (GOOD.replace("gamma = 3.5", "gamma = 500"),
     "policy 'public', suppress[1] (concept 'blue'), field gamma: gamma 500.0 for 'blue' is "
     "outside its range"),
    (GOOD.replace("percentile = 99.5", "percentile = 100"),
     "policy 'public', suppress[1] (concept 'blue'), field percentile: percentile 100.0"),
    (GOOD.replace("gamma = 3.5", "gamma = 0"),
     "policy 'public', suppress[1] (concept 'blue'), field gamma: 0 turns the suppression off"),
])
def test_bundle_errors_name_the_concept_and_its_range(tmp_path, text, expected):
    policies = load_policies(write(tmp_path, text))
    with pytest.raises(PolicyError, match=r"policy\.toml: ") as exc:
        check_policies(policies, CONCEPTS)
    assert expected in str(exc.value)


def test_unreadable_files_say_what_to_set(tmp_path):
    with pytest.raises(PolicyError, match=r"cannot read policy file .*STEER_POLICY_FILE"):
        load_policies(tmp_path / "missing.toml")
    with pytest.raises(PolicyError, match=r"must end in \.toml, \.yaml or \.yml"):
        load_policies(write(tmp_path, GOOD, "policy.json"))
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policies(write(tmp_path, "default: [", "policy.yml"))


# -- steer policy check ------------------------------------------------------------------------

def test_policy_check_command_accepts_the_shipped_file_and_rejects_bad_ones(tmp_path):
    runner = CliRunner()
    bundle = ["--bundle", str(REPO_ASSETS / "toy-bundle")]
    good = runner.invoke(policy_app, ["check", str(TOY_POLICY), *bundle])
    assert good.exit_code == 0, good.output
    assert "OK against" in good.output and "public (default)" in good.output
    red_pct = CONCEPTS["red"].default_percentile  # policies/toy.toml sets γ only
    assert f"suppress red: γ 2, percentile {red_pct:g}" in good.output
    assert "detect cross: score ≥ 0.5 → refuse" in good.output
    bad = write(tmp_path, GOOD.replace('"striped"', '"zebra"'))
    result = runner.invoke(policy_app, ["check", str(bad), *bundle])
    assert result.exit_code == 1
    assert "detect[1] (concept 'zebra'), field concept: not in the bundle" in result.output
    missing = runner.invoke(policy_app, ["check", str(TOY_POLICY), "--bundle",
                                         str(tmp_path)])
    assert missing.exit_code == 1 and "cannot read" in missing.output


# -- the apply logic ---------------------------------------------------------------------------

def test_policy_suppressions_come_first_and_replace_the_requests_edits_of_them():
    policy = Policy(name="p", suppress=({"concept": "red"},))  # type: ignore[arg-type]
    requested = resolve_edits([ConceptEdit("blue", 3.0), ConceptEdit(
        "red", 2.0, direction=Direction.AMPLIFY)], CONCEPTS)
    plan = enforce.plan_edits(requested, policy.suppressions(CONCEPTS))
    assert [(e.spec.name, e.direction) for e in plan.applied] == [
        ("red", Direction.SUPPRESS), ("blue", Direction.SUPPRESS)]
    assert [(e.spec.name, e.gamma) for e in plan.replaced] == [("red", 2.0)]


@dataclass
class ScriptedPipeline:
    """Stands in for SteeredPipeline: detection scores come from ``scores`` by seed, and drop
    to ``after`` for a concept the request suppresses."""

    scores: dict[int, dict[str, float]]
    after: float = 0.05
    calls: list[GenerationRequest] = field(default_factory=list)
    concepts: dict = field(default_factory=lambda: CONCEPTS)

    def generate(self, request, progress=None, should_cancel=None) -> GenerationResult:
        self.calls.append(request)
        suppressed = {e.concept for e in request.edits if e.direction == Direction.SUPPRESS}
        detection = [{c: (self.after if c in suppressed else s)
                      for c, s in self.scores[seed].items()} for seed in request.seeds]
        images = [Image.new("RGB", (8, 8), (seed % 255, 0, 0)) for seed in request.seeds]
        return GenerationResult(images, request.seeds, [], detection, {"generate_s": 0.1})


RULES = Policy(name="public", suppress=({"concept": "red"},), detect=(  # type: ignore[arg-type]
    DetectRule(concept="cross", threshold=0.5, action="refuse"),
    DetectRule(concept="striped", threshold=0.4, action="steer"),
    DetectRule(concept="dotted", threshold=0.3, action="mark")))


def run(pipeline: ScriptedPipeline, policy: Policy | None, n_images: int = 3,
        edits: tuple[ConceptEdit, ...] = ()) -> enforce.Enforced:
    requested = resolve_edits(list(edits), CONCEPTS)
    plan = enforce.plan_edits(requested,
                              policy.suppressions(CONCEPTS) if policy is not None else [])
    request = GenerationRequest(prompt="p", seed=10, steps=2, n_images=n_images,
                                edits=list(edits))
    return enforce.generate(pipeline, request, plan, policy)  # type: ignore[arg-type]


def scores(cross=0.0, striped=0.0, dotted=0.0) -> dict[str, float]:
    return {"cross": cross, "striped": striped, "dotted": dotted, "red": 0.9}


def test_below_threshold_nothing_happens_and_every_check_is_reported():
    pipe = ScriptedPipeline({10: scores(), 11: scores(cross=0.49), 12: scores(dotted=0.1)})
    out = run(pipe, RULES)
    assert out.refusal is None and len(out.images) == 3 and len(pipe.calls) == 1
    report = out.report
    assert report is not None and report["name"] == "public" and not report["refused"]
    assert report["suppressed"] == [{"concept": "red", "gamma": RED.default_gamma,
                                     "percentile": RED.default_percentile,
                                     "direction": "suppress"}]
    second = report["images"][1]
    assert second["seed"] == 11 and not second["flagged"] and not second["steered"]
    assert [c["concept"] for c in second["checks"]] == ["cross", "striped", "dotted"]
    cross = second["checks"][0]
    assert (cross["score"], cross["threshold"], cross["rule"], cross["action"]) == (
        0.49, 0.5, "refuse", "none")
    assert cross["reason"] == "score 0.490 < threshold 0.5: no action"
    # The always-on suppression was applied as a final edit (after the request's others,
    # gated on what they produced).
    assert pipe.calls[0].edits[0] == ConceptEdit("red", RED.default_gamma,
                                                  RED.default_percentile, Direction.SUPPRESS,
                                                  final=True)


def test_mark_flags_the_image_and_returns_it():
    out = run(ScriptedPipeline({10: scores(), 11: scores(dotted=0.8), 12: scores()}), RULES)
    assert out.report is not None and len(out.images) == 3
    assert [im["flagged"] for im in out.report["images"]] == [False, True, False]
    dotted = out.report["images"][1]["checks"][2]
    assert dotted["action"] == "mark"
    assert dotted["reason"] == "score 0.800 ≥ threshold 0.3: image returned, flagged"


def test_steer_regenerates_only_that_image_with_the_same_seed_and_reports_both_scores():
    pipe = ScriptedPipeline({10: scores(), 11: scores(striped=0.9), 12: scores()})
    first = run(ScriptedPipeline(dict(pipe.scores)), None).images
    out = run(pipe, RULES, edits=(ConceptEdit("striped", 2.0, direction=Direction.AMPLIFY),))
    assert len(pipe.calls) == 2
    again = pipe.calls[1]
    assert again.seed == 11 and again.n_images == 1
    # The steered concept at the bundle's defaults comes first and replaces the request's
    # amplification of it; the policy's own suppression stays.
    assert [(e.concept, e.direction) for e in again.edits] == [
        ("striped", Direction.SUPPRESS), ("red", Direction.SUPPRESS)]
    assert again.edits[0].gamma == CONCEPTS["striped"].default_gamma
    assert out.report is not None and out.report["images"][1]["steered"]
    striped = out.report["images"][1]["checks"][1]
    assert (striped["score"], striped["steered_score"], striped["action"]) == (0.9, 0.05,
                                                                               "steer")
    assert "score after 0.050" in striped["reason"]
    assert out.detection[1]["striped"] == 0.05  # the returned image's own scores
    assert [e.spec.name for e in out.edits[1]] == ["striped", "red"]
    assert [e.spec.name for e in out.edits[0]] == ["red", "striped"]
    assert out.images[0].tobytes() == first[0].tobytes() and "steer_s" in out.timings


def test_refuse_returns_no_image_and_names_the_concept_and_image():
    pipe = ScriptedPipeline({10: scores(striped=0.9), 11: scores(), 12: scores(cross=0.7)})
    out = run(pipe, RULES)
    assert out.images == [] and len(pipe.calls) == 1  # no steering for a refused job
    assert out.refusal == ("refused by content policy 'public': detected 'cross' in image 2 "
                           "(seed 12, score 0.700 ≥ 0.5)")
    assert out.report is not None and out.report["refused"]
    assert len(out.report["images"]) == 3  # the checks are still reported
    assert out.report["images"][2]["checks"][0]["action"] == "refuse"


def test_without_a_policy_the_generation_is_untouched():
    pipe = ScriptedPipeline({10: scores(cross=1.0)})
    out = run(pipe, None, n_images=1, edits=(ConceptEdit("red", 2.0),))
    assert out.report is None and out.refusal is None and len(out.images) == 1
    assert pipe.calls[0].edits == [ConceptEdit("red", 2.0, RED.default_percentile,
                                               Direction.SUPPRESS)]
