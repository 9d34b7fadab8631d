"""The gate's learned read-out (bundle format 4): scores, storage, the gate deciding by it, and
the bundle's checks; the shipped toy bundle carries one."""

import pytest
import torch

from steering.bundle import BUNDLE_FORMAT_VERSION, SteeringBundle
from steering.gate import ConceptGate
from steering.gate_probe import GATE_PROBE_FILE, GateProbe
from steering.manifest import BundleError
from tests.steering.test_recipe import GATE_KINDS, codes, gate_tables


def probe_for(concepts, steps, n, seed=0) -> GateProbe:
    g = torch.Generator().manual_seed(seed)
    return GateProbe(list(concepts), torch.randn(len(concepts), steps, n, generator=g),
                     torch.randn(len(concepts), steps, generator=g))


def test_scores_are_one_affine_map_per_concept_and_row():
    probe = probe_for("abc", steps=2, n=8)
    x = torch.randn(5, 8)
    want = x @ probe.weight[[2, 0], 1].float().T + probe.bias[[2, 0], 1]
    torch.testing.assert_close(probe.scores(x, [2, 0], row=1), want)


def test_round_trip_and_refusals(tmp_path):
    probe = probe_for("abc", steps=2, n=8)
    probe.save(tmp_path / "p.safetensors")
    back = GateProbe.load(tmp_path / "p.safetensors")
    assert back.concepts == ["a", "b", "c"]
    assert torch.equal(back.weight, probe.weight) and torch.equal(back.bias, probe.bias)
    back.validate(["a", "b", "c"], n_latents=8, num_steps=2)
    with pytest.raises(ValueError, match="steer bundle fit-gate"):
        back.validate(["a", "c", "b"], n_latents=8, num_steps=2)  # order matters: indices
    with pytest.raises(ValueError, match=r"\[n_latents, steps\] = \[8, 2\]"):
        back.validate(["a", "b", "c"], n_latents=8, num_steps=3)
    with pytest.raises(ValueError, match=r"\[C, steps, n\]"):
        GateProbe(["a"], torch.zeros(2, 2, 8), torch.zeros(2, 2))


def test_the_gate_decides_by_the_probe_when_it_has_one():
    # Both images' codes are nearest to a's mean (feature 0 and 1); the probe reads feature 5,
    # which only image 1 has, as b.
    values, indices = codes([{0: 3.0, 1: 1.0}, {0: 2.0, 1: 1.0}],
                            [{0: 3.0, 1: 1.0}, {5: 4.0, 1: 1.0}])
    weight = torch.zeros(3, 2, 8)
    weight[1, :, 5] = 1.0  # b's score: feature 5's mean over tokens
    probe = GateProbe(["a", "b", "c"], weight, torch.tensor([[0.5, 0.5], [0, 0], [0, 0]]))
    centroid = ConceptGate(gate_tables(), GATE_KINDS, {"a": 0.0})
    learned = ConceptGate(gate_tables(), GATE_KINDS, {"a": 0.0}, probe=probe)
    for gate in (centroid, learned):
        gate.update(values, indices, row=0)
    assert centroid.present(0).tolist() == [True, True]
    assert learned.present(0).tolist() == [True, False]  # image 1: b scores 2 > a's 0.5
    torch.testing.assert_close(learned.running["k"], torch.tensor([[0.5, 0.0], [0.5, 2.0]]))


def saved_with_a_probe(tmp_path):
    """A small bundle given a random probe, saved to tmp_path/b4, and loaded back."""
    from tests.steering.test_bundle import _make

    bundle, _ = _make(tmp_path)
    m = bundle.manifest
    bundle.gate_probe = probe_for(bundle.concept_names, m.steps, m.n_latents)
    out = tmp_path / "b4"
    bundle.save(out)
    return bundle, out, SteeringBundle.load(out)


def test_bundle_format_4_stores_and_checks_the_probe(tmp_path):
    bundle, out, loaded = saved_with_a_probe(tmp_path)
    m = bundle.manifest
    assert loaded.manifest.format_version == BUNDLE_FORMAT_VERSION >= 4
    assert GATE_PROBE_FILE in loaded.manifest.files
    assert torch.equal(loaded.gate_probe.weight, bundle.gate_probe.weight)

    loaded.gate_probe = None  # saving without it drops the file and its listing
    loaded.save(out)
    assert not (out / GATE_PROBE_FILE).exists() and SteeringBundle.load(out).gate_probe is None

    bundle.gate_probe = probe_for(bundle.concept_names[::-1], m.steps, m.n_latents)
    with pytest.raises(BundleError, match=f"{GATE_PROBE_FILE}: made for concepts"):
        bundle.save(tmp_path / "bad")
    bundle.gate_probe = probe_for(bundle.concept_names, m.steps, m.n_latents)
    bundle.save(out)
    (out / GATE_PROBE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(BundleError, match=GATE_PROBE_FILE):
        SteeringBundle.load(out)


def test_shipped_toy_bundle_gates_by_detectors_not_the_probe():
    from tests.conftest import ASSETS

    bundle = SteeringBundle.load(ASSETS / "toy-bundle")
    assert bundle.gate_probe is None  # format 5: the per-concept detectors replace it
    assert bundle.detectors is not None and bundle.detectors.concepts == bundle.concept_names


def test_saving_a_loaded_bundle_back_keeps_its_unchanged_optional_files(tmp_path):
    bundle, out, loaded = saved_with_a_probe(tmp_path)
    m = bundle.manifest
    (out / GATE_PROBE_FILE).touch()
    before = (out / GATE_PROBE_FILE).stat().st_mtime_ns
    loaded.manifest.command = "steer eval --write-defaults"  # only the manifest changes
    loaded.save(out)
    assert (out / GATE_PROBE_FILE).stat().st_mtime_ns == before  # not rewritten
    loaded.gate_probe = probe_for(bundle.concept_names, m.steps, m.n_latents, seed=1)
    loaded.save(out)  # a new probe is written
    assert torch.equal(SteeringBundle.load(out).gate_probe.weight, loaded.gate_probe.weight)
