"""Tests for the steering bundle (checksums, shapes, fingerprint) and the pipeline fingerprint."""

import hashlib
import json

import pytest
import torch

from steering.bundle import BUNDLE_FORMAT_VERSION, BundleError, SteeringBundle, sha256_file
from steering.concepts import ConceptSpec
from steering.fingerprint import HOOK_POINT, pipeline_fingerprint
from steering.importance_tables import ImportanceTables
from steering.sae import SaeConfig, TopKSAE

D, N, K, T = 8, 32, 4, 5
NAMES = ["red", "green", "circle"]
KINDS = ["colour", "colour", "shape"]
FP = "a" * 64
SCHED = {"class_name": "DDIMScheduler", "config": {"num_train_timesteps": 1000}}


def _specs() -> list[ConceptSpec]:
    return [ConceptSpec(n, k, 5.0, (0.0, 30.0), 99.0) for n, k in zip(NAMES, KINDS, strict=True)]


def _tables(c: int = 3, t: int = T, n: int = N, names=NAMES) -> ImportanceTables:
    g = torch.Generator().manual_seed(1)
    return ImportanceTables(
        concepts=list(names),
        scores=torch.randn(c, t, n, generator=g),
        means=torch.rand(c, t, n, generator=g),
        timesteps=torch.linspace(980, 20, t).round().long(),
    )


def _make(tmp_path) -> tuple[SteeringBundle, object]:
    torch.manual_seed(0)
    sae = TopKSAE(SaeConfig(D, N, K))
    b = SteeringBundle.create(sae, _tables(), _specs(), FP, SCHED, "steer export --test")
    path = tmp_path / "bundle"
    b.save(path)
    return b, path


def _fix_checksum(path, name: str) -> None:
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["files"][name] = sha256_file(path / name)
    mpath.write_text(json.dumps(m, indent=2))


def test_round_trip(tmp_path) -> None:
    b, path = _make(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [
        "cfg.json", "importance.safetensors", "manifest.json", "sae.safetensors",
    ]  # fmt: skip
    back = SteeringBundle.load(path, expected_fingerprint=FP)
    m = back.manifest
    assert m.format_version == BUNDLE_FORMAT_VERSION
    assert (m.d_in, m.n_latents, m.k, m.steps) == (D, N, K, T)
    assert m.hook_point == HOOK_POINT and m.scheduler == SCHED
    assert m.concepts == _specs() and m.command == "steer export --test"
    assert m.to_dict() == b.manifest.to_dict()
    for a, c in zip(b.sae.state_dict().values(), back.sae.state_dict().values(), strict=True):
        assert torch.equal(a, c)
    assert torch.equal(back.tables.scores, b.tables.scores)
    assert back.sha256 == hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    assert back.sha256 == b.sha256
    assert back.concept("circle").kind == "shape"
    assert back.concepts_of_kind("colour") == ["red", "green"]
    with pytest.raises(KeyError, match="red, green, circle"):
        back.concept("blue")


@pytest.mark.parametrize("name", ["sae.safetensors", "importance.safetensors", "cfg.json"])
def test_flipped_byte_refused(tmp_path, name: str) -> None:
    _, path = _make(tmp_path)
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / name).write_bytes(bytes(data))
    with pytest.raises(BundleError) as ei:
        SteeringBundle.load(path)
    msg = str(ei.value)
    assert msg.startswith(f"{name}: sha256 is ")
    assert "changed or corrupted" in msg and "re-export" in msg


def test_missing_manifest_and_newer_version(tmp_path) -> None:
    _, path = _make(tmp_path)
    m = json.loads((path / "manifest.json").read_text())
    m["format_version"] = BUNDLE_FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="upgrade sae-steering"):
        SteeringBundle.load(path)
    (path / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json not found"):
        SteeringBundle.load(path)


def test_wrong_sae_shape_refused(tmp_path) -> None:
    _, path = _make(tmp_path)
    TopKSAE(SaeConfig(D + 2, N, K)).save_pretrained(path)  # self-consistent, wrong d_in
    _fix_checksum(path, "cfg.json")
    _fix_checksum(path, "sae.safetensors")
    with pytest.raises(BundleError) as ei:
        SteeringBundle.load(path)
    msg = str(ei.value)
    assert msg.startswith("sae.safetensors:")
    assert f"[{N}, {D + 2}]" in msg and f"[{N}, {D}]" in msg


def test_wrong_tables_shape_refused(tmp_path) -> None:
    _, path = _make(tmp_path)
    _tables(t=T + 1).save(path / "importance.safetensors")  # self-consistent, wrong steps
    _fix_checksum(path, "importance.safetensors")
    with pytest.raises(BundleError) as ei:
        SteeringBundle.load(path)
    msg = str(ei.value)
    assert msg.startswith("importance.safetensors:")
    assert f"[3, {T + 1}, {N}]" in msg and f"[3, {T}, {N}]" in msg


def test_concept_names_must_match(tmp_path) -> None:
    _, path = _make(tmp_path)
    _tables(names=["red", "circle", "green"]).save(path / "importance.safetensors")
    _fix_checksum(path, "importance.safetensors")
    with pytest.raises(BundleError, match=r"importance\.safetensors: concepts are"):
        SteeringBundle.load(path)


def test_wrong_fingerprint_refused(tmp_path) -> None:
    _, path = _make(tmp_path)
    with pytest.raises(BundleError) as ei:
        SteeringBundle.load(path, expected_fingerprint="b" * 64)
    msg = str(ei.value)
    assert FP in msg and "b" * 64 in msg and "rebuild the bundle" in msg


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
        layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8,
    )  # fmt: skip


def test_fingerprint_stable_across_dtypes_and_sensitive_to_weights() -> None:
    unet = _tiny_unet()
    fp32 = pipeline_fingerprint(unet)
    assert len(fp32) == 64 and fp32 == pipeline_fingerprint(unet, HOOK_POINT)
    half = _tiny_unet().half()
    assert pipeline_fingerprint(half) == fp32
    # a weight outside the hooked block does not matter (only config + hooked block are hashed)
    with torch.no_grad():
        unet.conv_in.weight.add_(1.0)
    assert pipeline_fingerprint(unet) == fp32
    with torch.no_grad():
        w = unet.get_submodule(HOOK_POINT).proj_in.weight
        w[0, 0] += 0.5
    assert pipeline_fingerprint(unet) != fp32
    other = _tiny_unet()
    other.register_to_config(_name_or_path="somewhere/else")
    assert pipeline_fingerprint(other) == fp32
