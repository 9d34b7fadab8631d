"""The steering hook against the dense formulas of docs/steering-method.md (the test oracle)."""

import pytest
import torch
from torch import nn

from steering.concepts import ConceptSpec
from steering.edits import ConceptEdit, resolve_edits
from steering.hooks import EditStage, SteeringHook, StepTracker, attached
from steering.importance_tables import ImportanceTables
from steering.plan import DetectionPlan, SteeringPlan, gather_latents
from steering.sae import SaeConfig, TopKSAE

D, N, K, T = 32, 96, 6, 4
KINDS = {"colour": ["red", "green", "blue"], "shape": ["circle", "square"]}


class Block(nn.Module):
    """Stands in for the hooked Transformer2DModel: returns its input as a 1-tuple."""

    def forward(self, x):
        return (x,)


class Unet(nn.Module):
    """Stands in for the UNet: calls the block; the StepTracker reads its timestep arg."""

    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x, timestep):
        return self.block(x)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(D, N, K))
    names = [n for ns in KINDS.values() for n in ns]
    tables = ImportanceTables(names, torch.randn(len(names), T, N), torch.rand(len(names), T, N),
                              torch.tensor([900, 600, 300, 0]))
    specs = {n: ConceptSpec(n, kind, 5.0, (0.5, 50.0), 80.0)
             for kind, ns in KINDS.items() for n in ns}
    return sae, tables, specs


def dense_oracle(sae, tables, edits, x, row):
    """x + dec(z') − dec(z) with dense z, written straight from the formulas."""
    tokens = x.permute(0, 2, 3, 1).reshape(-1, D)
    z = sae.dense_latents(*sae.encode(tokens))
    z2 = z.clone()
    taken: set[int] = set()
    for e in edits:
        c = tables.concept_index(e.spec.name)
        kind = [tables.concept_index(n) for n in KINDS[e.spec.kind]]
        for j in tables.selected_features(c, row, e.percentile).tolist():
            if j in taken:
                continue
            taken.add(j)
            mu = tables.means[c, row, j]
            if e.direction == "suppress":
                on = z[:, j] > tables.means[kind, row, j].mean()
                z2[:, j] = torch.where(on, z[:, j] * mu * (-e.gamma), z[:, j])
            else:
                z2[:, j] = z[:, j] + e.gamma * mu
    out = tokens + sae.decode_dense(z2) - sae.decode_dense(z)
    n, c, h, w = x.shape
    return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


def run_hook(sae, tables, edits, x, timestep, detection=None, cond_only=False):
    unet = Unet()
    tracker = StepTracker()
    plan = SteeringPlan(tables, sae.W_dec.detach(), edits, KINDS)
    hook = SteeringHook(sae, tables, tracker, True, [EditStage(plan)], detection, cond_only)
    with attached([(unet, "t", tracker), (unet.block, "s", hook)]), torch.no_grad():
        out = unet(x, torch.tensor(timestep))[0]
    return out, hook


@pytest.mark.parametrize(
    "specs_text", [["red:20"], ["+blue:3"], ["red:20", "+circle:2", "green:5"]])
def test_delta_matches_dense_oracle(setup, specs_text):
    sae, tables, specs = setup
    edits = resolve_edits([ConceptEdit.parse(s) for s in specs_text], specs)
    x = torch.randn(4, D, 3, 3) * 2
    out, _ = run_hook(sae, tables, edits, x, timestep=610)  # nearest row: 600 -> row 1
    with torch.no_grad():
        expected = dense_oracle(sae, tables, edits, x, row=1)
    assert not torch.equal(out, x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_first_concept_wins_on_shared_feature(setup):
    sae, tables, specs = setup
    tables.scores[1] = tables.scores[0]  # green selects exactly red's features
    tables._cache.clear()
    both = resolve_edits([ConceptEdit("red", 20.0), ConceptEdit("green", 2.0)], specs)
    only_red = resolve_edits([ConceptEdit("red", 20.0)], specs)
    x = torch.randn(2, D, 4, 4)
    a, _ = run_hook(sae, tables, both, x, 0)
    b, _ = run_hook(sae, tables, only_red, x, 0)
    torch.testing.assert_close(a, b)


def test_suppression_changes_only_tokens_where_features_fire(setup):
    sae, tables, specs = setup
    (edit,) = resolve_edits([ConceptEdit("red", 20.0)], specs)
    x = torch.randn(2, D, 8, 8)
    out, _ = run_hook(sae, tables, [edit], x, 300)
    tokens = x.permute(0, 2, 3, 1).reshape(-1, D)
    values, indices = sae.encode(tokens)
    s = tables.selected_features("red", 2, edit.percentile)
    thr = tables.means[[0, 1, 2]][:, 2, s].mean(0)
    fires = (gather_latents(values, indices, s) > thr).any(-1).reshape(2, 8, 8)
    changed = (out != x).any(1)
    assert fires.any() and (~fires).any()
    assert torch.equal(changed, fires)


def test_cond_only_leaves_uncond_half(setup):
    sae, tables, specs = setup
    edits = resolve_edits([ConceptEdit.parse("+red:5")], specs)
    x = torch.randn(4, D, 2, 2)
    out, _ = run_hook(sae, tables, edits, x, 0, cond_only=True)
    assert torch.equal(out[:2], x[:2]) and not torch.equal(out[2:], x[2:])


def test_detection_reads_cond_half_before_edit(setup):
    sae, tables, specs = setup
    edits = resolve_edits([ConceptEdit("red", 20.0)], specs)
    names = tables.concepts
    det = DetectionPlan(tables, [80.0] * len(names), torch.device("cpu"))
    x = torch.randn(4, D, 3, 3)
    _, hook = run_hook(sae, tables, edits, x, 900, detection=det)
    scores = hook.detection_scores()
    cond = x[2:].permute(0, 2, 3, 1).reshape(2, 9, D)
    z = sae.dense_latents(*sae.encode(cond)).mean(1)  # [2, N]
    for c in range(len(names)):
        s = tables.selected_features(c, 0, 80.0)
        expected = z[:, s].sum(-1) / tables.means[c, 0, s].sum()
        torch.testing.assert_close(scores[:, c], expected)


def test_hooks_removed_after_exception():
    unet = Unet()
    tracker = StepTracker()
    original = unet.block.forward
    with pytest.raises(RuntimeError, match="boom"), attached([(unet, "t", tracker)]):
        raise RuntimeError("boom")
    from steering.hooks import active_hook_names

    assert active_hook_names(unet) == []
    x = torch.randn(1, D, 1, 1)
    assert torch.equal(unet(x, 0)[0], original(x)[0])
