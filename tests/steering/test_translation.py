"""The translate recipe (bundle format 3): learned swaps against a dense oracle, the fallback
to replacement, the gate, and the tables' and bundle's storage checks."""

import pytest
import torch

from steering.bundle import BUNDLE_FORMAT_VERSION, SteeringBundle
from steering.edits import ConceptEdit, resolve_edits
from steering.gate import ConceptGate
from steering.hooks import EditStage, SteeringHook, StepTracker, attached
from steering.manifest import BundleError
from steering.plan import RowReplace, RowTranslate, SteeringPlan
from steering.recipe import GATED_TRANSLATE, SteeringRecipe
from steering.translation import TRANSLATION_FILE, ConceptTranslation, TranslationTables
from tests.steering import test_recipe as recipe_tests
from tests.steering import test_steering_math as steering_math
from tests.steering.test_steering_math import KINDS, D, N, T, Unet

setup = steering_math.setup  # its fixture: random SAE, tables and specs of KINDS
ROW, TIMESTEP = recipe_tests.ROW, recipe_tests.TIMESTEP
TRANSLATE = SteeringRecipe("translate", gate=False)
RANK = 4


def swap(anchor="green", seed=0, rows=range(T), m=10) -> ConceptTranslation:
    """A random learned swap: m features (and the bias) per row, rank RANK."""
    g = torch.Generator().manual_seed(seed)
    row, feature = [], []
    for r in rows:
        feats = torch.randperm(N, generator=g)[:m]
        row += [r] * (m + 1)
        feature += [*feats.tolist(), N]
    coef = torch.randn(len(row), RANK, generator=g).half()
    basis = torch.linalg.qr(torch.randn(T, D, RANK, generator=g)).Q.transpose(1, 2)
    return ConceptTranslation(anchor, torch.tensor(row), torch.tensor(feature), coef, basis)


def tables_of(**concepts) -> TranslationTables:
    return TranslationTables(N, D, T, concepts)


def run(sae, tables, edits, x, recipe, translations, gate=True):
    unet, tracker = Unet(), StepTracker()
    plan = SteeringPlan(tables, sae.W_dec.detach(), edits, KINDS, recipe, translations)
    concept_gate = (ConceptGate(tables, KINDS, plan.gate_margins)
                    if gate and plan.gate_margins else None)
    hook = SteeringHook(sae, tables, tracker, True, [EditStage(plan, concept_gate)], None)
    with attached([(unet, "t", tracker), (unet.block, "s", hook)]), torch.no_grad():
        out = unet(x, torch.tensor(TIMESTEP))[0]
    return out, hook, plan


def translate_oracle(sae, translation, gamma, x, row):
    """x + γ·(Σ_j z_j·U_j·V_row + U_bias·V_row), dense z, straight from the formula."""
    tokens = x.permute(0, 2, 3, 1).reshape(-1, D)
    z = sae.dense_latents(*sae.encode(tokens))
    here = translation.row == row
    rows = translation.coef[here].float() @ translation.basis[row]
    dense = torch.zeros(N + 1, D)
    dense.index_add_(0, translation.feature[here], rows)
    out = tokens + gamma * (z @ dense[:N] + dense[N])
    n, c, h, w = x.shape
    return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize("gamma", [1.0, 2.5])
def test_translate_matches_the_dense_oracle_on_every_token(setup, gamma):
    sae, tables, specs = setup
    red = swap()
    x = torch.randn(4, D, 3, 3)
    edits = resolve_edits([ConceptEdit("red", gamma)], specs)
    out, _, plan = run(sae, tables, edits, x, TRANSLATE, tables_of(red=red), gate=False)
    assert [type(p) for _, p in plan.row(ROW).parts] == [RowTranslate]
    torch.testing.assert_close(out, translate_oracle(sae, red, gamma, x, ROW),
                               rtol=1e-4, atol=1e-5)


def test_a_concept_without_a_swap_falls_back_to_replacement(setup):
    sae, tables, specs = setup
    edits = resolve_edits([ConceptEdit("red", 1.0), ConceptEdit("circle", 2.0, 80.0)], specs)
    plan = SteeringPlan(tables, sae.W_dec.detach(), edits, KINDS, GATED_TRANSLATE,
                        tables_of(red=swap()))
    kinds = [type(p) for _, p in plan.row(ROW).parts]
    assert kinds == [RowTranslate, RowReplace]
    no_tables = SteeringPlan(tables, sae.W_dec.detach(), edits, KINDS, GATED_TRANSLATE, None)
    assert [type(p) for _, p in no_tables.row(ROW).parts] == [RowReplace, RowReplace]


def test_gated_translate_edits_only_the_image_that_has_the_concept(setup):
    sae, tables, specs = setup
    x = recipe_tests.two_image_batch(sae, tables)
    edits = resolve_edits([ConceptEdit("red", 1.0)], specs)
    out, hook, _ = run(sae, tables, edits, x, GATED_TRANSLATE, tables_of(red=swap()))
    assert hook.stages[0].gate.present(0).tolist() == [True, False]
    assert torch.equal(out[[1, 3]], x[[1, 3]])  # image 1, both CFG halves: untouched
    assert not torch.equal(out[0], x[0]) and not torch.equal(out[2], x[2])


def test_tables_round_trip(tmp_path):
    tables = tables_of(red=swap(), circle=swap("square", seed=1))
    tables.save(tmp_path / TRANSLATION_FILE)
    back = TranslationTables.load(tmp_path / TRANSLATION_FILE)
    assert (back.n_latents, back.d_in, back.num_steps) == (N, D, T)
    assert {c: t.anchor for c, t in back.concepts.items()} == {"red": "green",
                                                                "circle": "square"}
    for r in range(T):
        for got, want in zip(back.get("red").at(r, N), tables.get("red").at(r, N), strict=True):
            assert torch.equal(got, want)
    feats, deltas, bias = tables.get("red").at(ROW, N)
    assert N not in feats.tolist() and deltas.shape == (10, D) and bias.shape == (D,)


@pytest.mark.parametrize("change, match", [
    (lambda t: setattr(t.concepts["red"], "anchor", " "), "empty anchor label"),
    (lambda t: t.concepts.update(mauve=t.concepts["red"]), "not a concept of the bundle"),
    (lambda t: setattr(t, "d_in", D + 1), "basis"),
    (lambda t: setattr(t, "n_latents", N - 5), "feature ids outside"),
])
def test_tables_refuse_what_does_not_fit_the_bundle(change, match):
    tables = tables_of(red=swap())
    change(tables)
    with pytest.raises(ValueError, match=match):
        tables.validate(n for ns in KINDS.values() for n in ns)


def test_bundle_format_3_stores_checks_and_requires_its_swaps(tmp_path):
    from tests.steering.test_bundle import _make

    bundle, _ = _make(tmp_path)
    names = bundle.concept_names
    bundle.translations = TranslationTables(
        bundle.manifest.n_latents, bundle.manifest.d_in, bundle.manifest.steps,
        {names[0]: swap_for(bundle, anchor=names[1])})
    bundle.manifest.recipe = GATED_TRANSLATE
    out = tmp_path / "b3"
    bundle.save(out)
    loaded = SteeringBundle.load(out)
    assert loaded.manifest.format_version == BUNDLE_FORMAT_VERSION
    assert TRANSLATION_FILE in loaded.manifest.files
    assert loaded.manifest.recipe == GATED_TRANSLATE
    assert loaded.translations.get(names[0]).anchor == names[1]

    (out / TRANSLATION_FILE).write_bytes(b"not safetensors")
    with pytest.raises(BundleError, match=TRANSLATION_FILE):
        SteeringBundle.load(out)

    loaded.translations = None  # saving without swaps drops the file and its listing
    loaded.save(out)
    assert not (out / TRANSLATION_FILE).exists()
    with pytest.raises(BundleError, match="recipe 'translate' needs"):
        SteeringBundle.load(out)


def test_swaps_for_another_sae_size_are_refused(tmp_path):
    from tests.steering.test_bundle import _make

    bundle, _ = _make(tmp_path)
    m = bundle.manifest
    bad = swap_for(bundle, anchor=bundle.concept_names[1], steps=m.steps + 1)
    bundle.translations = TranslationTables(m.n_latents, m.d_in, m.steps + 1,
                                            {bundle.concept_names[0]: bad})
    with pytest.raises(BundleError, match=r"made for \[n_latents, d_in, steps\]"):
        bundle.save(tmp_path / "bad")


def swap_for(bundle, anchor, steps=None):
    """A one-row swap shaped for ``bundle`` (or for another step count)."""
    m = bundle.manifest
    basis = torch.eye(m.d_in)[:2].expand(steps or m.steps, 2, m.d_in).clone()
    return ConceptTranslation(anchor, torch.tensor([0, 0]), torch.tensor([1, m.n_latents]),
                              torch.ones(2, 2), basis)


def test_shipped_toy_bundle_swaps_every_concept_for_another_of_its_kind():
    from tests.conftest import ASSETS

    bundle = SteeringBundle.load(ASSETS / "toy-bundle")
    assert bundle.manifest.recipe == GATED_TRANSLATE
    assert bundle.manifest.format_version == BUNDLE_FORMAT_VERSION
    kinds = {c.name: c.kind for c in bundle.manifest.concepts}
    assert set(bundle.translations.concepts) == set(kinds)
    for concept, swap in bundle.translations.concepts.items():
        assert swap.anchor != concept and kinds[swap.anchor] == kinds[concept]
        assert set(swap.row.tolist()) == set(range(bundle.manifest.steps))


def test_gather_by_lookup_matches_comparing_every_entry():
    from steering.plan import gather_latents

    g = torch.Generator().manual_seed(3)
    values = torch.rand(2, 5, 4, generator=g)
    indices = torch.randint(0, 12, (2, 5, 4), generator=g)
    for features in (torch.tensor([7, 0, 30, 11]), torch.tensor([3]),
                     torch.zeros(0, dtype=torch.long)):  # 30: beyond every active id
        want = (values.unsqueeze(-1) * (indices.unsqueeze(-1) == features)).sum(-2)
        torch.testing.assert_close(gather_latents(values, indices, features), want)
