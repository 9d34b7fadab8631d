"""Open-world concept detectors (bundle format 5): present/absent per concept with a
calibrated threshold, the gate deciding by them (latched, without host synchronisation),
storage and the bundle's checks."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from steering.bundle import BUNDLE_FORMAT_VERSION, SteeringBundle
from steering.detector import DETECTORS_FILE, ConceptDetectors, running_means
from steering.gate import ConceptGate
from steering.manifest import BundleError
from tests.steering.test_gate_probe import probe_for
from tests.steering.test_recipe import GATE_KINDS, codes, gate_tables
from training.detector_fit import calibrate_threshold, fit_detectors

ALL = {"a": 0.0, "b": 0.0, "c": 0.0}  # gate every concept of gate_tables()


def feature_detectors(threshold=0.5) -> ConceptDetectors:
    """a reads feature 0, b feature 2, c (the one-concept kind o) feature 4; τ = 0.5."""
    weight = torch.zeros(3, 2, 8)
    for c, f in enumerate((0, 2, 4)):
        weight[c, :, f] = 1.0
    return ConceptDetectors(["a", "b", "c"], weight, torch.zeros(3, 2),
                            torch.full((3,), threshold), fpr=0.01, labels="judge")


def image(**features):
    """One token of two (feature, value) pairs: {f: v}, padded with feature 7 at 0."""
    token = {int(k[1:]): v for k, v in features.items()}
    if len(token) == 1:
        token[7] = 0.0
    return [token]


def gate_with(detectors=None, margins=ALL):
    return ConceptGate(gate_tables(), GATE_KINDS, margins, detectors=detectors)


def test_a_one_concept_kind_is_decided_not_always_present():
    values, indices = codes(image(f4=2.0), image(f0=2.0))
    gate = gate_with(feature_detectors())
    gate.update(values, indices, row=0)
    assert gate.present(2).tolist() == [True, False]  # c: only the image with feature 4
    centroid = ConceptGate(gate_tables(), GATE_KINDS, {"c": 0.0})
    centroid.update(values, indices, row=0)
    assert centroid.present(2).tolist() == [True, True]  # ranking within a kind: always


def test_an_image_with_no_concept_of_a_kind_is_absent_for_all():
    values, indices = codes(image(f5=3.0), image(f0=1.0, f2=1.0))
    gate = gate_with(feature_detectors())
    gate.update(values, indices, row=0)
    assert [gate.present(c).tolist() for c in range(3)] == [[False, True], [False, True],
                                                            [False, False]]
    # the probe ranks a against b, so image 0 still gets one of them
    probe = ConceptGate(gate_tables(), GATE_KINDS, {"a": 0.0, "b": 0.0},
                        probe=probe_for("abc", steps=2, n=8))
    probe.update(values, indices, row=0)
    assert (probe.present(0) | probe.present(1)).tolist() == [True, True]


def test_the_gate_latches_from_the_first_step_the_running_mean_reaches_tau():
    gate = gate_with(feature_detectors(threshold=0.5))
    steps = [codes(image(f0=0.2), image(f0=1.0)),   # means: 0.2, 1.0
             codes(image(f0=1.0), image(f0=0.0)),   # means: 0.6, 0.5
             codes(image(f0=0.0), image(f0=0.0))]   # means: 0.4, 0.33
    seen = []
    for row, (values, indices) in enumerate(steps):
        gate.update(values, indices, row=min(row, 1))
        seen.append(gate.present(0).tolist())
    assert seen == [[False, True], [True, True], [True, True]]  # kept once found
    assert gate.readout.best[:, 0].tolist() == pytest.approx([0.6, 1.0])
    p = gate.detection()[0]
    assert p.tolist() == pytest.approx(torch.sigmoid(torch.tensor([0.1, 0.5])).tolist())


def test_running_means_and_statistic_match_the_gate():
    det = feature_detectors()
    per_image = torch.rand(2, 5, 8)  # [steps, N, n] mean codes
    stat = det.statistic(per_image)
    want = running_means(per_image[..., [0, 2, 4]]).max(0).values  # unit weights, no bias
    torch.testing.assert_close(stat, want, rtol=1e-3, atol=1e-3)
    assert det.probability(det.threshold.expand(5, 3)).tolist() == [[0.5] * 3] * 5


def test_alpha_floors_the_step_weight_so_late_evidence_counts():
    scores = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])  # the concept forms at step 4
    plain = running_means(scores)
    assert plain.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.25, 0.4])
    floored = running_means(scores, alpha=0.5)  # weights 1, 1/2, 1/2, 1/2, 1/2
    assert floored.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5, 0.75])
    assert running_means(scores, alpha=1.0).tolist() == scores.tolist()  # last step only
    # the gate's step-by-step readout computes the same evidence as the calibration
    det = feature_detectors()
    det.alpha = 0.5
    per_image = torch.rand(4, 3, 8)  # [steps, N, n]
    det.weight = det.weight[:, :1].expand(3, 4, 8).clone()
    det.bias = torch.zeros(3, 4)
    gate = gate_with(det)
    for row in range(4):
        token = [[{f: float(per_image[row, i, f]) for f in range(8)}] for i in range(3)]
        values, indices = codes(*token)
        gate.update(values, indices, row=row)
    torch.testing.assert_close(gate.readout.best, det.statistic(per_image), rtol=1e-3,
                               atol=1e-3)
    with pytest.raises(ValueError, match="alpha"):
        ConceptDetectors(["a"], torch.zeros(1, 2, 8), torch.zeros(1, 2), torch.zeros(1),
                         alpha=1.5)


def test_calibration_keeps_the_false_positive_rate_on_held_out_negatives():
    g = torch.Generator().manual_seed(0)
    for n_neg, fpr in ((20, 0.01), (400, 0.01), (400, 0.05), (1000, 0.1)):
        negatives = torch.randn(n_neg, generator=g)
        tau = calibrate_threshold(negatives, fpr)
        assert int((negatives >= tau).sum()) <= fpr * n_neg + 1e-9
        assert int((negatives >= tau).sum()) == int(fpr * n_neg + 1e-9)  # the tightest τ
    # fitted on synthetic codes: held-out negatives stay within the fpr, positives are found
    steps, n_runs, n = 3, 400, 16
    labels = [{"a"} if i % 3 == 0 else set() for i in range(n_runs)]
    x = torch.rand(steps, n_runs, n, generator=g)
    x[:, [i for i, lab in enumerate(labels) if lab], 0] += 1.0
    heldout = torch.arange(n_runs) % 4 == 1
    det = fit_detectors(x, labels, ["a"], heldout, fpr=0.02)
    stat = det.statistic(x[:, heldout])[:, 0]
    truth = torch.tensor([bool(lab) for lab in labels])[heldout]
    assert float((stat[~truth] >= det.threshold[0]).float().mean()) <= 0.02
    assert det.heldout["a"]["recall"] > 0.9 and det.heldout["a"]["precision"] > 0.9


def test_round_trip_and_refusals(tmp_path):
    det = feature_detectors()
    det.heldout = {"a": {"precision": 1.0, "recall": 0.5}}
    det.save(tmp_path / "d.safetensors")
    back = ConceptDetectors.load(tmp_path / "d.safetensors")
    assert (back.concepts, back.fpr, back.labels, back.heldout) == (
        ["a", "b", "c"], 0.01, "judge", det.heldout)
    det.alpha = 0.3
    det.save(tmp_path / "d.safetensors")
    assert ConceptDetectors.load(tmp_path / "d.safetensors").alpha == 0.3
    assert torch.equal(back.weight, det.weight) and torch.equal(back.threshold, det.threshold)
    back.validate(["a", "b", "c"], n_latents=8, num_steps=2)
    with pytest.raises(ValueError, match="steer bundle fit-detector"):
        back.validate(["a", "c", "b"], n_latents=8, num_steps=2)
    with pytest.raises(ValueError, match=r"\[n_latents, steps\] = \[8, 2\]"):
        back.validate(["a", "b", "c"], n_latents=8, num_steps=3)
    with pytest.raises(ValueError, match=r"\[C, steps, n\], \[C, steps\], \[C\]"):
        ConceptDetectors(["a"], torch.zeros(1, 2, 8), torch.zeros(1, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        ConceptDetectors(["a"], torch.zeros(1, 2, 8), torch.zeros(1, 2), torch.zeros(1),
                         labels="guess")


def test_bundle_format_5_stores_and_checks_the_detectors(tmp_path):
    from tests.steering.test_bundle import _make

    bundle, _ = _make(tmp_path)
    m = bundle.manifest
    c = len(bundle.concept_names)
    g = torch.Generator().manual_seed(0)
    bundle.detectors = ConceptDetectors(bundle.concept_names,
                                        torch.randn(c, m.steps, m.n_latents, generator=g),
                                        torch.zeros(c, m.steps), torch.zeros(c))
    out = tmp_path / "b5"
    bundle.save(out)
    loaded = SteeringBundle.load(out)
    assert loaded.manifest.format_version == BUNDLE_FORMAT_VERSION == 5
    assert DETECTORS_FILE in loaded.manifest.files
    assert torch.equal(loaded.detectors.weight, bundle.detectors.weight)

    loaded.detectors = None  # saving without them drops the file and its listing
    loaded.save(out)
    assert not (out / DETECTORS_FILE).exists() and SteeringBundle.load(out).detectors is None

    bundle.detectors = ConceptDetectors(bundle.concept_names[::-1], bundle.detectors.weight,
                                        bundle.detectors.bias, bundle.detectors.threshold)
    with pytest.raises(BundleError, match=f"{DETECTORS_FILE}: made for concepts"):
        bundle.save(tmp_path / "bad")


def test_a_format_4_bundle_loads_without_detectors(tmp_path):
    import json
    import shutil

    from tests.conftest import ASSETS

    shutil.copytree(ASSETS / "toy-bundle", tmp_path / "b")
    (tmp_path / "b" / DETECTORS_FILE).unlink()
    path = tmp_path / "b" / "manifest.json"
    m = json.loads(path.read_text())
    del m["files"][DETECTORS_FILE], m["closed_kinds"]
    m["format_version"] = 4
    path.write_text(json.dumps(m))
    bundle = SteeringBundle.load(tmp_path / "b")
    assert bundle.manifest.format_version == 4 and bundle.detectors is None
    assert SteeringBundle.load(ASSETS / "toy-bundle").detectors is not None  # shipped: 5


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device on CUDA."""

    SYNCS = (torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.item)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SYNCS:
            self.seen.append(str(func))
        if func.overloadpacket is torch.ops.aten.index and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
                if i is not None):
            self.seen.append(f"{func} with a bool mask")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["detectors", "probe", "centroids"])
def test_update_and_present_do_not_synchronise_with_the_host(mode):
    gate = {"detectors": lambda: gate_with(feature_detectors()),
            "probe": lambda: ConceptGate(gate_tables(), GATE_KINDS, {"a": 0.0},
                                         probe=probe_for("abc", steps=2, n=8)),
            "centroids": lambda: ConceptGate(gate_tables(), GATE_KINDS, {"a": 0.0},
                                             anchors={"a": "b"})}[mode]()
    values, indices = codes(image(f0=1.0), image(f4=1.0))
    with HostSyncs() as syncs:
        for row in (0, 1, 1):
            gate.update(values, indices, row)
            gate.present(0)
    assert syncs.seen == []
    with HostSyncs() as control:  # the counter does see them
        x = torch.tensor([1.0, 2.0])
        x[0].item(), x[x > 1], x.nonzero()
    assert len(control.seen) >= 3
