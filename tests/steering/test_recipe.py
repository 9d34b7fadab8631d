"""Steering recipes (bundle format 2): gated replacement against dense oracles, the gate, the
manifest's recipe field, and batched requests on the shipped toy pipeline."""

import json
import shutil

import numpy as np
import pytest
import torch

from steering.bundle import SteeringBundle
from steering.edits import ConceptEdit, Direction, resolve_edits
from steering.gate import ConceptGate
from steering.hooks import EditStage, SteeringHook, StepTracker, attached
from steering.importance_tables import ImportanceTables
from steering.manifest import BundleError, BundleManifest
from steering.pipeline import GenerationRequest, SteeredPipeline
from steering.plan import RowEdit, RowReplace, SteeringPlan
from steering.recipe import GATED_REPLACE, GATED_TRANSLATE, PLAIN, SteeringRecipe
from tests.conftest import ASSETS
from tests.steering import test_steering_math as steering_math
from tests.steering.test_steering_math import KINDS, D, Unet, dense_oracle

setup = steering_math.setup  # its fixture: random SAE, tables and specs of KINDS

REPLACE = SteeringRecipe("replace", gate=False)
GATED_PLAIN = SteeringRecipe("plain", gate=True)
ROW, TIMESTEP = 1, 610  # tables.timesteps = [900, 600, 300, 0]: 610 -> row 1


def tokens_of(x):
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def replace_oracle(sae, tables, edits, tokens, row, kinds=KINDS):
    """dec(z') − dec(z) with dense z: per suppress edit remove S_c, add γ·s·μ̄_o on S_o with
    s = Σ_{S_c} z / Σ_{S_c} μ_c; amplify adds γμ; a feature taken by an earlier edit is not
    taken again (first edit wins), every term read from the unedited z."""
    z = sae.dense_latents(*sae.encode(tokens))
    z2 = z.clone()
    taken: set[int] = set()
    for e in edits:
        c = tables.concept_index(e.spec.name)
        s_c = [j for j in tables.selected_features(c, row, e.percentile).tolist()
               if j not in taken]
        taken.update(s_c)
        mu_c = tables.means[c, row]
        if e.direction is Direction.AMPLIFY:
            z2[:, s_c] += e.gamma * mu_c[s_c]
            continue
        z2[:, s_c] -= z[:, s_c]
        others = [tables.concept_index(n) for n in kinds[e.spec.kind] if n != e.spec.name]
        if not others:
            continue
        s_o = sorted(set().union(*(tables.selected_features(o, row, e.percentile).tolist()
                                   for o in others)))
        mu_bar = tables.means[others][:, row, :].mean(0)[s_o]
        s = z[:, s_c].sum(-1, keepdim=True) / mu_c[s_c].sum()
        z2[:, s_o] += e.gamma * s * mu_bar
    return sae.decode_dense(z2) - sae.decode_dense(z)


def run(sae, tables, edits, x, recipe, gate=True, kinds=KINDS):
    """The steering hook on the stand-in UNet (CFG on) under ``recipe``; (out, hook)."""
    unet, tracker = Unet(), StepTracker()
    plan = SteeringPlan(tables, sae.W_dec.detach(), edits, kinds, recipe)
    concept_gate = (ConceptGate(tables, kinds, plan.gate_margins)
                    if gate and plan.gate_margins else None)
    hook = SteeringHook(sae, tables, tracker, True, [EditStage(plan, concept_gate)], None)
    with attached([(unet, "t", tracker), (unet.block, "s", hook)]), torch.no_grad():
        out = unet(x, torch.tensor(TIMESTEP))[0]
    return out, hook


# -- 1. RowReplace against the dense oracle -------------------------------------------------

@pytest.mark.parametrize("specs_text", [["red:1"], ["circle:2.5:90"],
                                        ["green:3", "+square:2", "red:1.5"]])
def test_replace_delta_matches_dense_oracle(setup, specs_text):
    sae, tables, specs = setup
    edits = resolve_edits([ConceptEdit.parse(s) for s in specs_text], specs)
    x = torch.randn(4, D, 3, 3) * 2
    with torch.no_grad():
        expected = replace_oracle(sae, tables, edits, tokens_of(x), ROW)
        plan = SteeringPlan(tables, sae.W_dec.detach(), edits, KINDS, REPLACE)
        values, indices = sae.encode(tokens_of(x))
        parts = plan.row(ROW).parts
        got = sum(p.delta(values, indices) for _, p in parts)
        out, _ = run(sae, tables, edits, x, REPLACE)
    n_suppress = sum(e.direction is Direction.SUPPRESS for e in edits)
    assert [type(p) for _, p in parts].count(RowReplace) == n_suppress
    assert all(g is None for g, _ in parts)  # no gate in this recipe
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens_of(out), tokens_of(x) + expected, atol=1e-5, rtol=1e-5)


def test_replace_in_a_kind_of_one_only_removes(setup):
    sae, tables, specs = setup
    kinds = {"colour": ["red", "green", "blue"], "shape": ["circle"]}
    (edit,) = resolve_edits([ConceptEdit("circle", 4.0)], specs)
    x = torch.randn(2, D, 3, 3) * 2
    plan = SteeringPlan(tables, sae.W_dec.detach(), [edit], kinds, REPLACE)
    ((_, part),) = plan.row(ROW).parts
    assert part.target.numel() == 0 and part.target_directions.shape == (0, D)
    with torch.no_grad():
        values, indices = sae.encode(tokens_of(x))
        expected = replace_oracle(sae, tables, [edit], tokens_of(x), ROW, kinds)
        torch.testing.assert_close(part.delta(values, indices), expected, atol=1e-5, rtol=1e-5)


def test_replace_with_gamma_one_swaps_a_typical_token(setup):
    """A token whose S_c code is exactly μ_c (s = 1) ends with μ̄_o on S_o and nothing on S_c."""
    sae, tables, specs = setup
    (edit,) = resolve_edits([ConceptEdit("red", 1.0)], specs)
    plan = SteeringPlan(tables, sae.W_dec.detach(), [edit], KINDS, REPLACE)
    ((_, part),) = plan.row(ROW).parts
    s_c = part.features
    values = tables.means[0, ROW, s_c].unsqueeze(0)
    delta = part.delta(values, s_c.unsqueeze(0))
    s_o = torch.unique(torch.cat([tables.selected_features(o, ROW, edit.percentile)
                                  for o in (1, 2)]))
    z2 = torch.zeros(1, tables.num_latents)
    z2[0, s_o] = tables.means[[1, 2], ROW][:, s_o].mean(0)
    z = torch.zeros(1, tables.num_latents)
    z[0, s_c] = values[0]
    torch.testing.assert_close(delta, (z2 - z) @ sae.W_dec.detach(), atol=1e-5, rtol=1e-5)


# -- 2. the plain recipe is unchanged ---------------------------------------------------------

def test_default_recipe_is_one_ungated_plain_part_matching_the_oracle(setup):
    sae, tables, specs = setup
    edits = resolve_edits([ConceptEdit.parse(s) for s in ("red:20", "+circle:2", "green:5")],
                          specs)
    default = SteeringPlan(tables, sae.W_dec.detach(), edits, KINDS)
    assert default.recipe == PLAIN and default.gate_margins == {}
    ((gate, part),) = default.row(ROW).parts
    assert gate is None and isinstance(part, RowEdit)
    x = torch.randn(4, D, 3, 3) * 2
    out, hook = run(sae, tables, edits, x, PLAIN)
    assert all(stage.gate is None for stage in hook.stages)
    with torch.no_grad():
        torch.testing.assert_close(out, dense_oracle(sae, tables, edits, x, ROW),
                                   atol=1e-5, rtol=1e-5)


def test_gated_plain_splits_suppressions_but_sums_to_the_same_edit(setup):
    """Under plain+gate every suppression is its own gated part and amplification stays one
    ungated part; with the gate not consulted the sum equals the merged plain edit."""
    sae, tables, specs = setup
    tables.scores[1, ROW] = tables.scores[0, ROW]  # green shares red's features: first wins
    tables._cache.clear()
    edits = resolve_edits([ConceptEdit.parse(s) for s in ("red:20", "+circle:2", "green:5")],
                          specs)
    plan = SteeringPlan(tables, sae.W_dec.detach(), edits, KINDS, GATED_PLAIN)
    parts = plan.row(ROW).parts
    assert [g for g, _ in parts] == [None, 0, 1]
    assert plan.gate_margins == {"red": 0.0, "green": 0.0}
    assert parts[2][1].features.numel() == 0  # green's features all went to red
    values, indices = torch.randn(30, 6).abs() * 3, torch.randint(0, 96, (30, 6))
    merged = SteeringPlan(tables, sae.W_dec.detach(), edits, KINDS).row(ROW).parts[0][1]
    torch.testing.assert_close(sum(p.delta(values, indices) for _, p in parts),
                               merged.delta(values, indices))


# -- 3. ConceptGate ---------------------------------------------------------------------------

def gate_tables():
    """a = e0 + e1 and b = e2 + e3 (orthogonal) in kind k; c = e4 in kind o; row 1 swaps a, b."""
    means = torch.zeros(3, 2, 8)
    means[0, 0, [0, 1]] = 1.0
    means[1, 0, [2, 3]] = 2.0
    means[2, :, 4] = 1.0
    means[0, 1], means[1, 1] = means[1, 0], means[0, 0]
    return ImportanceTables(["a", "b", "c"], torch.rand(3, 2, 8), means, torch.tensor([500, 0]))


GATE_KINDS = {"k": ["a", "b"], "o": ["c"]}


def codes(*tokens_per_image):
    """[B, tokens, 2] (values, indices) from per-image lists of {feature: value} tokens."""
    values = torch.tensor([[list(t.values()) for t in img] for img in tokens_per_image])
    indices = torch.tensor([[list(t) for t in img] for img in tokens_per_image])
    return values.float(), indices


def test_gate_marks_the_nearest_concept_of_its_kind():
    gate = ConceptGate(gate_tables(), GATE_KINDS, {"a": 0.0})
    assert set(gate.groups) == {"k"}  # only the gated concept's kind is tracked
    values, indices = codes([{0: 3.0, 1: 1.0}, {0: 2.0, 4: 5.0}],  # image 0: like a
                            [{2: 1.0, 3: 1.0}, {3: 2.0, 4: 9.0}])  # image 1: like b
    gate.update(values, indices, row=0)
    assert gate.present(0).tolist() == [True, False]
    assert gate.present(1).tolist() == [False, True]
    other = ConceptGate(gate_tables(), GATE_KINDS, {"a": 0.0})
    other.update(values, indices, row=1)  # the row's μ: at row 1 a and b trade places
    assert other.present(0).tolist() == [False, True]


def test_gate_keeps_a_running_sum_over_calls():
    gate = ConceptGate(gate_tables(), GATE_KINDS, {"b": 0.0})
    first = codes([{0: 1.0, 1: 1.0}])  # exactly a: cos 1 with a, 0 with b
    later = codes([{0: 1.0, 5: 0.0}, {2: 2.0, 3: 2.0}])  # mostly b: mean code (1, 0, 2, 2)/2
    cos_a, cos_b = 1 / (3 * 2**0.5), 4 / (3 * 2**0.5)  # 0.24 and 0.94
    gate.update(*first, row=0)
    gate.update(*later, row=0)
    torch.testing.assert_close(gate.running["k"], torch.tensor([[1 + cos_a, cos_b]]))
    assert gate.present(0).tolist() == [True]  # this step looks like b, the sum still says a
    gate.update(*later, row=0)
    assert gate.present(1).tolist() == [True] and gate.present(0).tolist() == [False]


def test_a_latched_gate_keeps_an_image_that_turned_into_the_anchor():
    like_a, like_b = codes([{0: 1.0, 1: 1.0}]), codes([{2: 1.0, 3: 1.0}])
    plain_gate = ConceptGate(gate_tables(), GATE_KINDS, {"a": 0.0})
    latched = ConceptGate(gate_tables(), GATE_KINDS, {"a": 0.0}, anchors={"a": "b"})
    seen = []
    for step in (like_a, like_b, like_b, like_b):  # found as a, then swapped towards b
        for gate in (plain_gate, latched):
            gate.update(*step, row=0)
        seen.append((plain_gate.present(0).item(), latched.present(0).item()))
    assert seen == [(True, True), (True, True), (False, True), (False, True)]
    never = ConceptGate(gate_tables(), GATE_KINDS, {"a": 0.0}, anchors={"a": "b"})
    never.update(*like_b, row=0)  # an image of b from the start is never latched
    assert never.present(0).tolist() == [False]


def test_latch_is_in_the_manifest_only_when_set():
    assert SteeringRecipe("translate", gate=True).to_dict() == {"name": "translate",
                                                                 "gate": True}
    latching = SteeringRecipe("translate", gate=True, latch=True)
    assert SteeringRecipe.from_dict(latching.to_dict()) == latching
    with pytest.raises(ValueError, match="latch: must be true or false"):
        SteeringRecipe.from_dict({"name": "translate", "latch": "yes"})


# -- 4. the gated hook ------------------------------------------------------------------------

def two_image_batch(sae, tables):
    """x [4, D, 3, 3] = [uncond 0, uncond 1, cond 0, cond 1]; at ROW, red's μ is image 0's mean
    code and green's μ image 1's, so the gate finds red in image 0 only."""
    torch.manual_seed(1)
    cond = torch.randn(2, D, 3, 3) * 2
    x = torch.cat([cond + 0.05 * torch.randn_like(cond), cond])
    with torch.no_grad():
        z = sae.dense_latents(*sae.encode(tokens_of(cond))).view(2, 9, -1).mean(1)
    tables.means[0, ROW], tables.means[1, ROW] = z[0], z[1]
    tables.means[2, ROW] = torch.rand(tables.num_latents) * 0.1
    return x


@pytest.mark.parametrize("recipe", [GATED_REPLACE, GATED_PLAIN], ids=["replace", "plain"])
def test_gated_hook_edits_only_the_image_that_has_the_concept(setup, recipe):
    sae, tables, specs = setup
    x = two_image_batch(sae, tables)
    edits = resolve_edits([ConceptEdit("red", 2.0, 50.0)], specs)
    out, hook = run(sae, tables, edits, x, recipe)
    assert hook.stages[0].gate.present(0).tolist() == [True, False]
    assert torch.equal(out[[1, 3]], x[[1, 3]])  # image 1, both CFG halves: untouched
    assert not torch.equal(out[0], x[0]) and not torch.equal(out[2], x[2])
    ungated, _ = run(sae, tables, edits, x, SteeringRecipe(recipe.name), gate=False)
    assert not torch.equal(ungated[[1, 3]], x[[1, 3]])  # the gate is what spared image 1
    assert torch.equal(out[[0, 2]], ungated[[0, 2]])


def test_gated_hook_still_amplifies_every_image(setup):
    sae, tables, specs = setup
    x = two_image_batch(sae, tables)
    edits = resolve_edits([ConceptEdit.parse("+circle:3"), ConceptEdit("red", 2.0, 50.0)],
                          specs)
    out, _ = run(sae, tables, edits, x, GATED_REPLACE)
    amp_only, _ = run(sae, tables, edits[:1], x, GATED_REPLACE)
    assert torch.equal(out[[1, 3]], amp_only[[1, 3]]) and not torch.equal(out[1], x[1])
    assert not torch.equal(out[[0, 2]], amp_only[[0, 2]])


# -- 5. manifest ------------------------------------------------------------------------------

def toy_manifest() -> dict:
    return json.loads((ASSETS / "toy-bundle" / "manifest.json").read_text())


def as_v1(m: dict) -> dict:
    m = dict(m, format_version=1, concepts=[dict(c) for c in m["concepts"]])
    del m["recipe"]
    for c in m["concepts"]:
        c.pop("detection_percentile", None)
    return m


def test_v1_manifest_loads_with_the_plain_recipe():
    m = BundleManifest.from_dict(as_v1(toy_manifest()))
    assert m.recipe == PLAIN and m.format_version == 1
    assert all(c.detection_percentile is None and c.detection_pct == c.default_percentile
               for c in m.concepts)


def test_manifest_round_trip_keeps_recipe_and_detection_percentile():
    d = toy_manifest()
    d["concepts"][2]["detection_percentile"] = 90.0
    d["concepts"][3].pop("detection_percentile")
    m = BundleManifest.from_dict(d)
    assert m.recipe == GATED_TRANSLATE
    assert m.concepts[2].detection_pct == 90.0
    assert m.concepts[2].default_percentile == d["concepts"][2]["default_percentile"]
    assert m.concepts[3].detection_percentile is None
    assert m.concepts[3].detection_pct == d["concepts"][3]["default_percentile"]
    back = BundleManifest.from_json(m.to_json())
    assert back == m and back.to_dict()["recipe"] == {"name": "translate", "gate": True,
                                                           "latch": True}
    assert "detection_percentile" not in back.to_dict()["concepts"][3]


@pytest.mark.parametrize("bad, match", [
    ({"name": "erase", "gate": True},
     "unknown steering recipe 'erase'; known: plain, replace, translate"),
])
def test_unknown_recipe_is_a_bundle_error(bad, match):
    d = toy_manifest() | {"recipe": bad}
    with pytest.raises(BundleError, match=match):
        BundleManifest.from_dict(d)


def test_recipe_that_is_not_an_object_is_a_bundle_error():
    with pytest.raises(BundleError, match="recipe: must be an object"):
        BundleManifest.from_dict(toy_manifest() | {"recipe": "replace"})
    with pytest.raises(BundleError, match="true or false"):
        BundleManifest.from_dict(toy_manifest() | {"recipe": {"name": "replace",
                                                               "gate": "false"}})


def test_gate_margin_widens_the_gate():
    """An image whose running score is within margin × steps of its kind's best is gated in."""
    values, indices = codes([{0: 3.0, 1: 1.0}])  # one image, like a
    strict = ConceptGate(gate_tables(), GATE_KINDS, {"b": 0.0})
    wide = ConceptGate(gate_tables(), GATE_KINDS, {"b": 2.0})  # cosines differ by ≤ 2
    for gate in (strict, wide):
        gate.update(values, indices, row=0)
    assert strict.present(1).tolist() == [False]
    assert wide.present(1).tolist() == [True]


# -- 6. the shipped toy pipeline ----------------------------------------------------------------

STRIPED = ConceptEdit("striped", 3.0, 95.0)
PROMPTS = ["a red circle on a striped background", "a blue square on a plain background",
           "a green cross on a dotted background"]
SEEDS = [3, 11, 5]


@pytest.fixture(scope="module")
def toy():
    return SteeredPipeline.from_pretrained(ASSETS / "toy-pipeline", ASSETS / "toy-bundle")


def images(steered, req):
    return [np.asarray(im).astype(np.int16) for im in steered.generate(req).images]


def toy_request(prompt, seed, **kw):
    return GenerationRequest(prompt, seed=seed, **(dict(steps=4, guidance=4.0) | kw))


@pytest.mark.parametrize("edits", [(), (STRIPED,)], ids=["no-edit", "striped"])
def test_batch_equals_single_requests(toy, edits):
    """Batched CPU kernels round differently from batch-of-one (plain diffusers too: ~1e-6 in
    the float image), which can flip a pixel by one level; anything real differs far more."""
    result = toy.generate(GenerationRequest.batch(PROMPTS, SEEDS, steps=4, guidance=4.0,
                                                  negative_prompt="blurry", edits=edits))
    assert result.seeds == SEEDS and len(result.detection) == len(PROMPTS)
    for prompt, seed, got in zip(PROMPTS, SEEDS, result.images, strict=True):
        (want,) = images(toy, toy_request(prompt, seed, negative_prompt="blurry", edits=edits))
        diff = np.abs(np.asarray(got).astype(np.int16) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (prompt, diff.max())


def test_batch_needs_one_seed_per_prompt():
    with pytest.raises(ValueError, match="one seed per prompt"):
        GenerationRequest.batch(PROMPTS, SEEDS[:2])
    with pytest.raises(ValueError, match="one seed per prompt"):
        GenerationRequest.batch([], [])


def test_bundle_recipe_is_the_default_and_differs_from_plain(toy):
    assert toy.bundle.manifest.recipe == GATED_TRANSLATE
    default = images(toy, toy_request(PROMPTS[0], 3, edits=[STRIPED]))
    plain = images(toy, toy_request(PROMPTS[0], 3, edits=[STRIPED], recipe=PLAIN))
    named = images(toy, toy_request(PROMPTS[0], 3, edits=[STRIPED], recipe=GATED_TRANSLATE))
    assert not np.array_equal(default[0], plain[0])
    assert np.array_equal(default[0], named[0])


def test_gate_leaves_a_prompt_without_the_concept_untouched(toy):
    unedited = images(toy, toy_request(PROMPTS[1], 0))
    gated = images(toy, toy_request(PROMPTS[1], 0, edits=[STRIPED]))
    plain = images(toy, toy_request(PROMPTS[1], 0, edits=[STRIPED], recipe=PLAIN))
    assert np.array_equal(gated[0], unedited[0]) and not np.array_equal(plain[0], unedited[0])


def test_v1_toy_bundle_steers_with_plain_and_detection_uses_its_percentile(toy, tmp_path):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(ASSETS / "toy-bundle", bundle_dir)
    (bundle_dir / "manifest.json").write_text(json.dumps(as_v1(toy_manifest())))
    v1 = SteeredPipeline(toy.pipe, SteeringBundle.load(bundle_dir))
    specs = v1.bundle.manifest.concepts
    assert v1.bundle.manifest.recipe == PLAIN
    assert v1._detection.percentiles == [c.default_percentile for c in specs]
    want = images(toy, toy_request(PROMPTS[0], 3, edits=[STRIPED], recipe=PLAIN))
    assert np.array_equal(images(v1, toy_request(PROMPTS[0], 3, edits=[STRIPED]))[0], want[0])

    v2 = toy_manifest()
    v2["concepts"][2]["detection_percentile"] = 90.0  # striped: detection apart from steering
    (bundle_dir / "manifest.json").write_text(json.dumps(v2))
    steered = SteeredPipeline(toy.pipe, SteeringBundle.load(bundle_dir))
    assert steered._detection.percentiles == [
        90.0 if i == 2 else c.get("detection_percentile", c["default_percentile"])
        for i, c in enumerate(v2["concepts"])]


def test_manifest_errors_name_the_file_the_field_and_the_fix():
    d = toy_manifest()
    del d["k"]
    d["concepts"][1]["default_gamma"] = "lots"
    with pytest.raises(BundleError) as ei:
        BundleManifest.from_dict(d)
    msg = str(ei.value)
    assert msg.startswith("manifest.json: ") and "k: missing (required)" in msg
    assert "concepts[1].default_gamma: input should be a valid number" in msg
    assert "re-export the bundle" in msg
