"""Round trips between our SAE folders / bundles and EleutherAI sparsify's checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sparsify import SparseCoder, SparseCoderConfig

from steering.fingerprint import HOOK_POINT
from steering.sae import SaeConfig, TopKSAE, UnsupportedSaeError
from tests.conftest import make_bundle
from training.sparsify_format import export_sparsify, import_sparsify


def _random_sae(seed: int = 0, d: int = 16, n: int = 64, k: int = 4) -> TopKSAE:
    """An SAE with non-trivial biases so every term of encode/decode is exercised."""
    torch.manual_seed(seed)
    sae = TopKSAE(SaeConfig(d_in=d, num_latents=n, k=k))
    with torch.no_grad():
        sae.encoder.weight.add_(0.1 * torch.randn(n, d))
        sae.encoder.bias.copy_(0.1 * torch.randn(n))
        sae.b_dec.copy_(torch.randn(d))
    return sae


def _dense(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(*values.shape[:-1], n).scatter(-1, indices, values.float())


def _assert_same_outputs(ours: TopKSAE, theirs: SparseCoder) -> None:
    x = torch.randn(32, ours.d_in)
    v1, i1 = ours.encode(x)
    out2 = theirs.encode(x)
    n = ours.num_latents
    torch.testing.assert_close(_dense(v1, i1, n), _dense(out2.top_acts, out2.top_indices, n))
    torch.testing.assert_close(ours.decode(v1, i1), theirs.decode(out2.top_acts, out2.top_indices))


def test_export_of_our_sae_loads_in_sparsify(tmp_path: Path) -> None:
    sae = _random_sae()
    sae.save_pretrained(tmp_path / "sae")
    folder = export_sparsify(tmp_path / "sae", tmp_path / "out")
    assert folder == tmp_path / "out" / HOOK_POINT
    theirs = SparseCoder.load_from_disk(folder)
    assert (theirs.d_in, theirs.num_latents, theirs.cfg.k) == (16, 64, 4)
    _assert_same_outputs(sae, theirs)


def test_export_of_a_bundle_uses_its_hook_point(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tiny_pipeline_dir, tmp_path / "bundle")
    folder = export_sparsify(bundle, tmp_path / "out", hookpoint="up1.1")
    theirs = SparseCoder.load_from_disk(folder)
    _assert_same_outputs(TopKSAE.from_pretrained(bundle), theirs)
    with pytest.raises(FileExistsError, match="not empty"):
        export_sparsify(bundle, tmp_path / "out", hookpoint="up1.1")


def test_sparsify_checkpoint_imports_with_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(1)
    theirs = SparseCoder(16, SparseCoderConfig(num_latents=48, k=5))
    with torch.no_grad():
        theirs.encoder.bias.copy_(0.1 * torch.randn(48))
        theirs.b_dec.copy_(torch.randn(16))
    # A training run's root: one subfolder per hookpoint.
    theirs.save_to_disk(tmp_path / "ckpt" / "layers.3")
    ours = import_sparsify(tmp_path / "ckpt", tmp_path / "ours")
    _assert_same_outputs(TopKSAE.from_pretrained(tmp_path / "ours"), theirs)
    _assert_same_outputs(ours, theirs)


def test_several_hookpoints_need_a_choice(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    for hook in ("layers.1", "layers.2"):
        SparseCoder(8, SparseCoderConfig(num_latents=16, k=2)).save_to_disk(root / hook)
    with pytest.raises(ValueError, match=r"layers\.1, layers\.2.*--hookpoint"):
        import_sparsify(root, tmp_path / "a")
    import_sparsify(root, tmp_path / "b", hookpoint="layers.2")
    assert TopKSAE.from_pretrained(tmp_path / "b").num_latents == 16
    with pytest.raises(FileNotFoundError, match=r"available: layers\.1, layers\.2$"):
        import_sparsify(root, tmp_path / "c", hookpoint="layers.9")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"skip_connection": True}, "skip connection"),
        ({"transcode": True}, "transcoder"),
        ({"activation": "groupmax"}, "groupmax"),
        ({"input_unit_norm": True}, "input normalisation"),
        ({"sample_topk": True}, "per-image TopK"),
    ],
)
def test_unsupported_variants_are_refused_by_name(
    tmp_path: Path, flags: dict, named: str
) -> None:
    SparseCoder(8, SparseCoderConfig(num_latents=16, k=2)).save_to_disk(tmp_path / "src")
    cfg_path = tmp_path / "src" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(flags)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedSaeError, match=named):
        import_sparsify(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_saeuron_style_cfg_without_d_in_imports(tmp_path: Path) -> None:
    theirs = SparseCoder(8, SparseCoderConfig(num_latents=16, k=2))
    theirs.save_to_disk(tmp_path / "src")
    cfg_path = tmp_path / "src" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["d_in"], cfg["activation"]
    cfg.update(batch_topk=True, sample_topk=False, input_unit_norm=False)
    cfg_path.write_text(json.dumps(cfg))
    ours = import_sparsify(tmp_path / "src", tmp_path / "out")
    assert (ours.d_in, ours.num_latents, ours.k) == (8, 16, 2)
    _assert_same_outputs(ours, theirs)
