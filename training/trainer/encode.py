"""Training-time TopK encode with a sparse backward (no dense n-wide gradient, no n-wide ReLU).

Forward: one GEMM into a reused [B, n] buffer, top-k, ReLU on the k values (TopK∘ReLU and
ReLU∘TopK give the same values; they differ only in which zero-valued latents are listed).
With dead latents, also the top-k_aux pre-activations among them (AuxK, unrectified, as in
sparsify). Backward: the gradient reaches only the (B·(k + k_aux)) selected entries, so the
encoder weight gradient is a sparse [n, B] × dense [B, d] product and nothing B×n is built.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

# CSR × dense is all this module uses of torch.sparse; its "beta" notice is noise here.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class Encoded(NamedTuple):
    """Top-k of ReLU(pre) and, when dead latents exist, top-k_aux of pre over the dead ones."""

    values: Tensor        # [B, k] float32, >= 0
    indices: Tensor       # [B, k] int64
    aux_values: Tensor    # [B, k_aux] float32 (k_aux = 0 without dead latents)
    aux_indices: Tensor   # [B, k_aux] int64


def sparse_rows_matmul(indices: Tensor, weights: Tensor, dense: Tensor,
                       n: int) -> tuple[Tensor, Tensor]:
    """Return (G @ dense, G @ 1) for the sparse G [n, B] with G[indices[b, i], b] += weights[b, i].

    Row j of G @ dense is Σ_{(b,i): indices[b,i]=j} weights[b,i]·dense[b]; G is built as a CSR
    matrix (stable sort by latent), so the sum order and the result are deterministic.
    """
    batch, width = indices.shape
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=crow[1:])
    rows = torch.arange(batch, device=indices.device).repeat_interleave(width)
    g = torch.sparse_csr_tensor(crow, rows[order], weights.reshape(-1)[order].to(dense.dtype),
                                (n, batch), check_invariants=False)
    return g @ dense, (g @ dense.new_ones(batch, 1)).squeeze(1)


class _TopKEncode(torch.autograd.Function):
    """Autograd function behind :func:`topk_encode`."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, b_dec: Tensor, weight: Tensor, bias: Tensor,
                k: int, pre: Tensor, dead: Tensor | None, k_aux: int) -> tuple[Tensor, ...]:
        xc = x - b_dec
        gemm_dtype = pre.dtype
        torch.addmm(bias.to(gemm_dtype), xc.to(gemm_dtype), weight.to(gemm_dtype).t(), out=pre)
        values, indices = pre.topk(k, dim=1, sorted=False)
        values = values.float().relu_()
        if dead is not None and k_aux > 0:
            sub = pre.index_select(1, dead)
            aux_values, local = sub.topk(k_aux, dim=1, sorted=False)
            aux_values = aux_values.float()
            aux_indices = dead[local]
        else:
            aux_values = values.new_zeros(x.shape[0], 0)
            aux_indices = indices.new_zeros(x.shape[0], 0)
        ctx.save_for_backward(xc, weight, values, indices, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx: FunctionCtx, g_values: Tensor | None, _gi: None,
                 g_aux: Tensor | None, _gai: None) -> tuple[Tensor | None, ...]:
        xc, weight, values, indices, aux_indices = ctx.saved_tensors  # type: ignore[attr-defined]
        if g_values is None:
            g_values = torch.zeros_like(values)
        g = g_values * (values > 0)
        idx = indices
        if aux_indices.shape[1] and g_aux is not None:
            idx = torch.cat([indices, aux_indices], dim=1)
            g = torch.cat([g, g_aux], dim=1)
        grad_weight, grad_bias = sparse_rows_matmul(idx, g, xc, weight.shape[0])
        grad_weight = grad_weight.to(weight.dtype)
        # Σ_b ∂L/∂xc[b] = Σ_j grad_bias[j] · W[j], and xc = x - b_dec.
        grad_b_dec = -(grad_bias @ weight)
        return None, grad_b_dec, grad_weight, grad_bias, None, None, None, None


def topk_encode(x: Tensor, b_dec: Tensor, weight: Tensor, bias: Tensor, k: int, pre: Tensor,
                dead: Tensor | None = None, k_aux: int = 0) -> Encoded:
    """TopK SAE encode of x [B, d] for training; ``pre`` [B, n] is a reused scratch buffer.

    ``pre``'s dtype is the GEMM's (bfloat16 for bf16 training). ``dead`` lists dead latent ids
    (AuxK); k_aux is clamped to their number. ``x`` gets no gradient.
    """
    if pre.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"scratch buffer is {list(pre.shape)}, expected "
                         f"{[x.shape[0], weight.shape[0]]}")
    if dead is not None:
        k_aux = min(k_aux, dead.numel())
        if k_aux == 0:
            dead = None
    out = _TopKEncode.apply(x.detach(), b_dec, weight, bias, k, pre, dead, k_aux)
    return Encoded(*out)
