"""The functional multi-head core every attention module and DIPU runs on (contract §3.3).

:func:`multihead_attention` (heads split, one :func:`msa_fast.ops.attention` launch),
:func:`linear` (one stream or ``n`` stacked streams, one GEMM) and :func:`add_norm`
(residual + LayerNorm through :func:`msa_fast.ops.add_layer_norm`). It lives in the ops
layer so that both :mod:`msa_fast.ops.dipu` and the modules of :mod:`msa_fast.nn.attention`
use it without an op importing a module (layers only point down). The GEMMs stay in
cuBLAS / MKL.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from msa_fast.ops.attention import attention
from msa_fast.ops.layer_norm import add_layer_norm

__all__ = ["add_norm", "linear", "multihead_attention"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b``; ``weight (out, in)`` for one stream, ``(n, out, in)`` stacked.

    Stacked: ``x: (n, ..., in) -> (n, ..., out)``, stream ``i`` with ``weight[i], bias[i]``
    (one batched GEMM, ``baddbmm``).
    """
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    n, i = x.shape[0], x.shape[-1]
    flat = x.reshape(n, math.prod(x.shape[1:-1]), i)
    w = weight.transpose(1, 2)
    if bias is None:
        y = torch.bmm(flat, w)
    elif torch.compiler.is_compiling():
        # inductor runs baddbmm as a copy of the broadcast bias into the output, then the GEMM;
        # a separate add fuses into the kernel that reads y next (same values)
        y = torch.bmm(flat, w) + bias[:, None, :]
    else:
        y = torch.baddbmm(bias[:, None, :], flat, w)
    return y.view(*x.shape[:-1], weight.shape[1])


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             eps: float = 1e-5, backend: str | None = None) -> torch.Tensor:
    """``LayerNorm(x + residual)`` through :func:`msa_fast.ops.add_layer_norm`.

    ``weight, bias: (d,)``, or ``(n, d)`` stacked for ``x: (n, ..., d)`` (then the op
    normalises without affine and the per-stream affine follows: the op takes one
    ``(d,)`` affine). Under autocast the residual is cast to ``x``'s dtype (the op wants
    one dtype; a residual from an fp32 parameter meets a bf16 GEMM output).
    """
    dt = x.dtype
    residual = residual.to(dt)
    if weight.dim() == 1:
        return add_layer_norm(x, residual, weight.to(dt), bias.to(dt), eps, backend=backend)
    d = x.shape[-1]
    y = add_layer_norm(x, residual, x.new_ones(d), x.new_zeros(d), eps, backend=backend)
    shape = (weight.shape[0],) + (1,) * (x.dim() - 2) + (d,)
    return torch.addcmul(bias.to(dt).view(shape), y, weight.to(dt).view(shape))


def _split(x: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    # (..., L, d) -> (n, H, L, Dh), n the product of the leading dims (given: it may be 0)
    return x.reshape(n, *x.shape[-2:]).unflatten(-1, (heads, x.shape[-1] // heads)).transpose(1, 2)


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: torch.Tensor | None, heads: int,
                        backend: str | None = None) -> torch.Tensor:
    """Multi-head attention of projected inputs, before the output projection.

    ``q: (..., Lq, d)``, ``k, v: (..., Lk, d)`` with the same number of leading
    elements, ``key_padding_mask: (..., Lk)`` bool (True = not a key) or None ->
    ``(..., Lq, d)``: ``d`` split into ``heads`` heads of ``d / heads``, each
    ``softmax(q k^T / sqrt(Dh)) v`` by :func:`msa_fast.ops.attention` (all leading
    dims and heads in one launch; a query with no key gets 0). ``k, v`` are cast to
    ``q``'s dtype: under autocast keys may come from fp32 parameters while the queries
    come out of a bf16 GEMM.
    """
    k, v = k.to(q.dtype), v.to(q.dtype)
    n = math.prod(q.shape[:-2])  # not Size.numel(), which fixes a symbolic batch in torch.export
    mask = None if key_padding_mask is None else key_padding_mask.reshape(n, key_padding_mask.shape[-1])
    out = attention(_split(q, n, heads), _split(k, n, heads), _split(v, n, heads), mask, backend=backend)
    return out.transpose(1, 2).flatten(2).view(q.shape)
