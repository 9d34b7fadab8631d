"""Tests for the TopK SAE: maths against dense oracles, training helpers, sparsify layout."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from steering.sae import SaeConfig, TopKSAE, UnsupportedSaeError

D, N, K = 16, 64, 4


@pytest.fixture
def sae() -> TopKSAE:
    torch.manual_seed(0)
    m = TopKSAE(SaeConfig(d_in=D, num_latents=N, k=K))
    with torch.no_grad():  # non-trivial biases so b_dec / b_enc paths are exercised
        m.b_dec.normal_()
        m.encoder.bias.normal_(std=0.1)
        m.encoder.weight.add_(0.1 * torch.randn_like(m.encoder.weight))
    return m


def _dense_oracle(m: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    pre = torch.relu((x - m.b_dec) @ m.encoder.weight.T + m.encoder.bias)
    vals, idx = pre.topk(m.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals)


def test_init_unit_norm_and_tied(sae: TopKSAE) -> None:
    m = TopKSAE(SaeConfig(d_in=D, num_latents=N, k=K))
    norms = m.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones(N), atol=1e-5)
    assert torch.equal(m.encoder.weight, m.W_dec)
    assert torch.count_nonzero(m.encoder.bias) == 0 and torch.count_nonzero(m.b_dec) == 0
    assert (m.d_in, m.num_latents, m.k) == (D, N, K)


def test_encode_matches_dense_topk_of_relu(sae: TopKSAE) -> None:
    x = torch.randn(3, 5, D)
    vals, idx = sae.encode(x)
    assert vals.shape == (3, 5, K) and idx.shape == (3, 5, K)
    assert idx.dtype == torch.int64
    z = sae.dense_latents(vals, idx)
    assert z.shape == (3, 5, N)
    torch.testing.assert_close(z, _dense_oracle(sae, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.pre_acts(x), (x - sae.b_dec) @ sae.encoder.weight.T
                               + sae.encoder.bias)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 5), ()])
def test_sparse_decode_equals_dense(sae: TopKSAE, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    lead = shape if shape else tuple(torch.randint(1, 4, (3,), generator=g).tolist())
    x = torch.randn(*lead, D, generator=g)
    vals, idx = sae.encode(x)
    sparse = sae.decode(vals, idx)
    dense = sae.decode_dense(sae.dense_latents(vals, idx))
    assert sparse.shape == x.shape
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), sparse)


def test_sparse_decode_gradient_matches_dense(sae: TopKSAE) -> None:
    x = torch.randn(9, D)
    target = torch.randn(9, D)

    def grads(dense: bool) -> list[torch.Tensor]:
        sae.zero_grad(set_to_none=True)
        vals, idx = sae.encode(x)
        out = sae.decode_dense(sae.dense_latents(vals, idx)) if dense else sae.decode(vals, idx)
        (out - target).pow(2).sum().backward()
        return [p.grad.clone() for p in (sae.W_dec, sae.b_dec, sae.encoder.weight,
                                         sae.encoder.bias)]

    sparse_g, dense_g = grads(False), grads(True)
    assert sparse_g[0].abs().sum() > 0
    for a, b in zip(sparse_g, dense_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unit_norm_and_parallel_gradient_removal(sae: TopKSAE) -> None:
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N, 1) * 3 + 0.5)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(N), rtol=1e-5, atol=1e-5)

    sae.W_dec.grad = torch.randn(N, D) + 2 * sae.W_dec.detach()
    before = sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions()
    g = sae.W_dec.grad
    # nothing left along each row, and the orthogonal part is unchanged
    torch.testing.assert_close((g * sae.W_dec).sum(1), torch.zeros(N), atol=1e-5, rtol=0)
    w = sae.W_dec.detach()
    orth = before - (before * w).sum(1, keepdim=True) * w
    torch.testing.assert_close(g, orth)


def test_save_load_roundtrip_bit_exact(sae: TopKSAE, tmp_path) -> None:
    sae.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_in"] == D and cfg["num_latents"] == N and cfg["k"] == K
    assert cfg["activation"] == "topk" and cfg["skip_connection"] is False
    keys = set(load_file(str(tmp_path / "sae.safetensors")))
    assert keys == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}

    back = TopKSAE.from_pretrained(tmp_path)
    for a, b in zip(sae.state_dict().values(), back.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    x = torch.randn(4, D)
    assert torch.equal(sae(x), back(x))

    half = TopKSAE.from_pretrained(tmp_path, dtype=torch.float16)
    assert half.W_dec.dtype == torch.float16
    half.save_pretrained(tmp_path / "h")
    assert load_file(str(tmp_path / "h" / "sae.safetensors"))["W_dec"].dtype == torch.float16


def _write_sparsify_dir(path, cfg: dict, tensors: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae.safetensors"))


def _sparsify_cfg(**over) -> dict:
    # Field names exactly as sparsify's SparseCoderConfig.to_dict() plus "d_in".
    cfg = {
        "activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
        "num_latents": 0, "k": 3, "multi_topk": False, "skip_connection": False,
        "transcode": False, "d_in": 8,
    }  # fmt: skip
    cfg.update(over)
    return cfg


def _sparsify_tensors(n: int = 32, d: int = 8, skip: bool = False) -> dict:
    g = torch.Generator().manual_seed(3)
    t = {
        "encoder.weight": torch.randn(n, d, generator=g),
        "encoder.bias": torch.randn(n, generator=g) * 0.1,
        "W_dec": torch.randn(n, d, generator=g),
        "b_dec": torch.randn(d, generator=g),
    }
    if skip:
        t["W_skip"] = torch.zeros(d, d)
    return t


def test_hand_written_sparsify_dir_loads_and_encodes(tmp_path) -> None:
    tensors = _sparsify_tensors()
    _write_sparsify_dir(tmp_path, _sparsify_cfg(), tensors)  # num_latents 0 -> 4 * 8
    m = TopKSAE.from_pretrained(tmp_path)
    assert (m.d_in, m.num_latents, m.k) == (8, 32, 3)
    assert torch.equal(m.W_dec, tensors["W_dec"])
    x = torch.randn(5, 8)
    vals, idx = m.encode(x)
    pre = torch.relu((x - tensors["b_dec"]) @ tensors["encoder.weight"].T
                     + tensors["encoder.bias"])
    ref_vals, _ = pre.topk(3, dim=-1)
    torch.testing.assert_close(vals.sort(-1).values, ref_vals.sort(-1).values)
    ref_out = (m.dense_latents(vals, idx) @ tensors["W_dec"]) + tensors["b_dec"]
    torch.testing.assert_close(m.decode(vals, idx), ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flag,word", [("skip_connection", "skip"), ("transcode", "transcoder")])
def test_unsupported_variants_refused_by_name(tmp_path, flag: str, word: str) -> None:
    _write_sparsify_dir(tmp_path, _sparsify_cfg(**{flag: True}),
                        _sparsify_tensors(skip=flag == "skip_connection"))
    with pytest.raises(UnsupportedSaeError, match=word) as ei:
        TopKSAE.from_pretrained(tmp_path)
    assert "only TopK SAEs" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_groupmax_activation_refused() -> None:
    with pytest.raises(UnsupportedSaeError, match="groupmax"):
        SaeConfig.from_sparsify_cfg(_sparsify_cfg(activation="groupmax"))


def test_wrong_shape_and_missing_key_messages(tmp_path) -> None:
    t = _sparsify_tensors()
    t["W_dec"] = torch.randn(32, 7)
    _write_sparsify_dir(tmp_path / "a", _sparsify_cfg(), t)
    with pytest.raises(ValueError) as ei:
        TopKSAE.from_pretrained(tmp_path / "a")
    msg = str(ei.value)
    assert "sae.safetensors: W_dec has shape [32, 7]" in msg
    assert "cfg.json says [n, d_in] = [32, 8]" in msg

    t = _sparsify_tensors()
    del t["b_dec"]
    _write_sparsify_dir(tmp_path / "b", _sparsify_cfg(), t)
    with pytest.raises(ValueError, match="missing tensor 'b_dec'"):
        TopKSAE.from_pretrained(tmp_path / "b")

    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        TopKSAE.from_pretrained(tmp_path / "c")
