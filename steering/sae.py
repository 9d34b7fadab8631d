"""TopK sparse autoencoder, stored exactly in EleutherAI sparsify's on-disk layout.

Layout (one folder): ``cfg.json`` = sparsify's ``SparseCoderConfig`` fields plus ``d_in``;
``sae.safetensors`` with ``encoder.weight`` [n, d_in], ``encoder.bias`` [n],
``W_dec`` [n, d_in] (row j = feature j's direction) and ``b_dec`` [d_in].

    pre = E (x - b_dec) + b_enc;   z = TopK_k(ReLU(pre));   x_hat = sum_j z_j d_j + b_dec
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

# Keys sparsify writes for a plain TopK SAE (W_skip appears only with skip_connection).
_REQUIRED_KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")

# sparsify config flags naming variants this project does not implement.
_UNSUPPORTED_FLAGS = {
    "skip_connection": "skip connection (W_skip)",
    "transcode": "transcoder (transcode=true)",
    "embed_skip": "embedding skip connection (embed_skip=true)",
    "gram_lookup": "n-gram lookup (gram_lookup=true)",
    "multi_topk": None,  # a training-loss option only; the stored weights are a plain TopK SAE
}


# sae.safetensors metadata: the module's dtype when the weights are stored narrower
_DTYPE_KEY = "module_dtype"


def _stored_module_dtype(meta: dict[str, str], name: str) -> torch.dtype | None:
    """The module dtype a narrower-stored file asks to be upcast to, if it names one."""
    raw = meta.get(_DTYPE_KEY)
    if raw is None:
        return None
    dtype = getattr(torch, raw, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name}: metadata {_DTYPE_KEY}={raw!r} is not a float dtype "
                         "(e.g. 'float32'); re-save the SAE")
    return dtype


class UnsupportedSaeError(ValueError):
    """Raised for sparsify SAE variants we cannot run, so users get a named refusal."""


@dataclass
class SaeConfig:
    """Shape and sparsity of a TopK SAE, convertible to/from sparsify's cfg.json."""

    d_in: int
    num_latents: int
    k: int
    normalize_decoder: bool = True

    def __post_init__(self) -> None:
        """Reject impossible sizes early, before any tensor is allocated."""
        if self.d_in <= 0 or self.num_latents <= 0:
            raise ValueError(
                f"SAE sizes must be positive, got d_in={self.d_in}, num_latents={self.num_latents}"
            )
        if not 0 < self.k <= self.num_latents:
            raise ValueError(f"SAE k must be in [1, num_latents={self.num_latents}], got {self.k}")

    def to_sparsify_cfg(self) -> dict[str, Any]:
        """Return the cfg.json dict sparsify writes ({**cfg.to_dict(), "d_in": d_in})."""
        return {
            "activation": "topk",
            "expansion_factor": max(1, self.num_latents // self.d_in),
            "normalize_decoder": self.normalize_decoder,
            "num_latents": self.num_latents,
            "k": self.k,
            "multi_topk": False,
            "skip_connection": False,
            "transcode": False,
            "d_in": self.d_in,
        }

    @classmethod
    def from_sparsify_cfg(cls, cfg: dict[str, Any]) -> SaeConfig:
        """Parse a sparsify cfg.json dict, refusing unsupported variants by name."""
        for flag, label in _UNSUPPORTED_FLAGS.items():
            if label is not None and cfg.get(flag):
                raise UnsupportedSaeError(
                    f"cfg.json describes a {label} sparse coder; only TopK SAEs without "
                    "skip connection or transcoder are supported"
                )
        activation = cfg.get("activation", "topk")
        if activation != "topk":
            raise UnsupportedSaeError(
                f"cfg.json has activation={activation!r}; only TopK SAEs without "
                "skip connection or transcoder are supported"
            )
        if "d_in" not in cfg:
            raise ValueError("cfg.json has no 'd_in' field (sparsify writes it beside the config)")
        d_in = int(cfg["d_in"])
        num_latents = int(cfg.get("num_latents", 0) or 0)
        if num_latents == 0:
            num_latents = int(cfg.get("expansion_factor", 32)) * d_in
        return cls(
            d_in=d_in,
            num_latents=num_latents,
            k=int(cfg.get("k", 32)),
            normalize_decoder=bool(cfg.get("normalize_decoder", True)),
        )


class TopKSAE(nn.Module):
    """TopK SAE with sparsify's parameter names; decoding touches only the k active rows."""

    def __init__(
        self,
        cfg: SaeConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        """Build with unit-norm random decoder rows, encoder = decoder copy, zero biases."""
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.d_in, cfg.num_latents, device=device, dtype=dtype)
        w = torch.randn(cfg.num_latents, cfg.d_in, device=device, dtype=self.encoder.weight.dtype)
        self.W_dec = nn.Parameter(w)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=w.dtype))
        # dtype of sae.safetensors (None: the module's); e.g. float16 halves a bundle's SAE
        # and loading upcasts back to the module's dtype
        self.storage_dtype: torch.dtype | None = None
        self.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            self.encoder.weight.copy_(self.W_dec)
            self.encoder.bias.zero_()

    # -- sizes -------------------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        """Width of the activations the SAE reads."""
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        """Number of dictionary features n."""
        return self.cfg.num_latents

    @property
    def k(self) -> int:
        """Number of active features per token."""
        return self.cfg.k

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype (inputs are cast to it)."""
        return self.W_dec.dtype

    @property
    def device(self) -> torch.device:
        """Device the parameters live on."""
        return self.W_dec.device

    # -- maths -------------------------------------------------------------------------------

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations E (x - b_dec) + b_enc for x of shape [..., d_in]."""
        return self.encoder(x.to(self.dtype) - self.b_dec)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (values, indices), each [..., k]: the top-k of ReLU(pre_acts), unsorted."""
        values, indices = torch.topk(F.relu(self.pre_acts(x)), self.k, dim=-1, sorted=False)
        return values, indices

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """Sparse decode sum_j z_j d_j + b_dec reading only the active rows of W_dec."""
        if values.shape != indices.shape:
            raise ValueError(
                f"decode: values {list(values.shape)} and indices {list(indices.shape)} differ"
            )
        lead = values.shape[:-1]
        width = values.shape[-1]
        idx2 = indices.reshape(-1, width)
        val2 = values.to(self.dtype).reshape(-1, width)
        out = F.embedding_bag(idx2, self.W_dec, per_sample_weights=val2, mode="sum")
        return out.reshape(*lead, self.d_in) + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct x (shape [..., d_in]) through encode + sparse decode."""
        values, indices = self.encode(x)
        return self.decode(values, indices)

    def dense_latents(self, values: Tensor, indices: Tensor) -> Tensor:
        """Scatter (values, indices) into a dense z [..., n]; a test oracle only."""
        z = values.new_zeros(*values.shape[:-1], self.num_latents)
        return z.scatter(-1, indices, values)

    def decode_dense(self, z: Tensor) -> Tensor:
        """Dense decode z @ W_dec + b_dec; a test oracle only (n-wide, slow at SD scale)."""
        return z.to(self.dtype) @ self.W_dec + self.b_dec

    # -- training helpers ---------------------------------------------------------------------

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every decoder row to unit L2 norm (done after each optimiser step)."""
        eps = torch.finfo(self.W_dec.dtype).eps
        norm = torch.linalg.vector_norm(self.W_dec.data, dim=1, keepdim=True)
        self.W_dec.data /= norm + eps

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of W_dec.grad each row's component along that (unit) row."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec.data
        parallel = (self.W_dec.grad * w).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * w

    # -- storage -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write cfg.json and sae.safetensors in sparsify's layout, in ``storage_dtype`` if set
        (the module's dtype is noted in the metadata, so loading upcasts back) else the
        module's dtype."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "encoder.weight": self.encoder.weight,
            "encoder.bias": self.encoder.bias,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
        }
        stored = self.storage_dtype or self.dtype
        tensors = {k: v.detach().to("cpu", stored).contiguous() for k, v in tensors.items()}
        meta = None if stored == self.dtype else {_DTYPE_KEY: str(self.dtype).removeprefix(
            "torch.")}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata=meta)
        with open(directory / CFG_FILE, "w") as f:
            json.dump(self.cfg.to_sparsify_cfg(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> TopKSAE:
        """Load a sparsify-layout folder, naming the missing file, key or wrong shape."""
        directory = Path(directory)
        cfg_path = directory / CFG_FILE
        weights_path = directory / WEIGHTS_FILE
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p.name} not found in {directory} (a sparsify SAE folder)"
                )
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{CFG_FILE}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{CFG_FILE}: expected a JSON object")
        cfg = SaeConfig.from_sparsify_cfg(raw)
        n, d = cfg.num_latents, cfg.d_in
        expected = {
            "encoder.weight": (n, d),
            "encoder.bias": (n,),
            "W_dec": (n, d),
            "b_dec": (d,),
        }
        names = {
            "encoder.weight": "[n, d_in]",
            "encoder.bias": "[n]",
            "W_dec": "[n, d_in]",
            "b_dec": "[d_in]",
        }
        tensors: dict[str, Tensor] = {}
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            module_dtype = _stored_module_dtype(f.metadata() or {}, weights_path.name)
            keys = set(f.keys())
            if "W_skip" in keys:
                raise UnsupportedSaeError(
                    f"{WEIGHTS_FILE} has W_skip (a skip connection); only TopK SAEs without "
                    "skip connection or transcoder are supported"
                )
            for key in _REQUIRED_KEYS:
                if key not in keys:
                    raise ValueError(
                        f"{WEIGHTS_FILE}: missing tensor {key!r} (has {sorted(keys)})"
                    )
                t = f.get_tensor(key)
                if tuple(t.shape) != expected[key]:
                    raise ValueError(
                        f"{WEIGHTS_FILE}: {key} has shape {list(t.shape)} but {CFG_FILE} says "
                        f"{names[key]} = {list(expected[key])}"
                    )
                tensors[key] = t
        stored = tensors["W_dec"].dtype
        load_dtype = dtype if dtype is not None else (module_dtype or stored)
        sae = cls(cfg, device="meta", dtype=load_dtype)
        if stored != load_dtype and dtype is None:
            sae.storage_dtype = stored  # saved back as it was read
        sae.encoder.weight = nn.Parameter(tensors["encoder.weight"].to(device, load_dtype))
        sae.encoder.bias = nn.Parameter(tensors["encoder.bias"].to(device, load_dtype))
        sae.W_dec = nn.Parameter(tensors["W_dec"].to(device, load_dtype))
        sae.b_dec = nn.Parameter(tensors["b_dec"].to(device, load_dtype))
        return sae
