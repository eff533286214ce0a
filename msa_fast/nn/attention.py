"""``MultiheadAttention`` and ``AddNorm``: the one multi-head attention of every model (SPEC 3.3).

DIPU / CMDIE, AGFN's cross-modal blocks and ProMMA's backbone all use these, and
``msa_fast.ops.dipu`` uses the functional core (:func:`multihead_attention`,
:func:`linear`, :func:`add_norm`), so that attention always runs through
:func:`msa_fast.ops.attention` and residual + LayerNorm through
:func:`msa_fast.ops.add_layer_norm` -- every fused backend of those two ops speeds every
model up. The GEMMs stay in cuBLAS / MKL.

Groups: ``groups = n > 1`` holds ``n`` independent streams with stacked weights (the
three streams of ProMMA, the three DIPUs of one CMDIE layer); their inputs carry a
leading ``n`` dimension, ``(n, ..., L, d)``, and one call serves all ``n`` (one GEMM per
projection, one attention launch). Stacked weights are ``torch.stack`` of the per-stream
``nn.Linear`` / ``nn.LayerNorm`` parameters: ``(n, out, in)``, ``(n, out)``, ``(n, d)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from msa_fast import ops

__all__ = ["AddNorm", "MultiheadAttention", "StackedLinear", "add_norm", "linear", "multihead_attention"]


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
        return ops.add_layer_norm(x, residual, weight.to(dt), bias.to(dt), eps, backend=backend)
    d = x.shape[-1]
    y = ops.add_layer_norm(x, residual, x.new_ones(d), x.new_zeros(d), eps, backend=backend)
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
    out = ops.attention(_split(q, n, heads), _split(k, n, heads), _split(v, n, heads), mask, backend=backend)
    return out.transpose(1, 2).flatten(2).view(q.shape)


class StackedLinear(nn.Module):
    """``n`` independent ``nn.Linear(in_features, out_features)`` applied to ``x: (n, ..., in)``.

    ``weight (n, out, in)``, ``bias (n, out)``, initialised as ``nn.Linear``
    (``U(-1/sqrt(in), 1/sqrt(in))`` for both).
    """

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, out_features).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        n, o, i = self.weight.shape
        return f"groups={n}, in_features={i}, out_features={o}, bias={self.bias is not None}"


def _linear_layer(groups: int, i: int, o: int) -> nn.Module:
    return nn.Linear(i, o) if groups == 1 else StackedLinear(groups, i, o)


class AddNorm(nn.Module):
    """Residual + LayerNorm, ``LN(x + residual)``, through :func:`msa_fast.ops.add_layer_norm`.

    ``weight`` (ones) and ``bias`` (zeros) are ``(d,)`` as ``nn.LayerNorm``'s, or
    ``(groups, d)`` for ``groups`` streams ``x: (groups, ..., d)``; see :func:`add_norm`.
    """

    def __init__(self, d: int, groups: int = 1, eps: float = 1e-5, backend: str | None = None) -> None:
        super().__init__()
        shape = (d,) if groups == 1 else (groups, d)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return add_norm(x, residual, self.weight, self.bias, self.eps, self.backend)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, eps={self.eps}, backend={self.backend!r}"


class MultiheadAttention(nn.Module):
    """Multi-head attention ``Dropout(W_o MHA(x_q W_Q, x_kv W_K, x_kv W_V))``.

    ``in_proj`` = ``[W_Q; W_K; W_V]`` (``nn.Linear(d, 3d)``; stacked ``(groups, 3d, d)``),
    ``out_proj`` (``d -> d``). ``forward(query, key_value=None, key_padding_mask=None)``:
    ``query (..., Lq, d)``, ``key_value (..., Lk, d)`` (None = self-attention, one GEMM for
    q, k, v), ``key_padding_mask (..., Lk)`` bool True = padding -> ``(..., Lq, d)``; a
    query with no key gets ``out_proj``'s bias (its attention is 0). With ``groups > 1``
    every input has a leading ``groups`` dim. The parts are public for the models that
    reuse keys / values (DIPU eq. 21-22) or mix attention outputs before the output
    projection (ProMMA): :meth:`qkv`, :meth:`q`, :meth:`kv`, :meth:`attend`,
    :meth:`output`. ``dropout`` acts on the output (train mode only).
    """

    def __init__(self, d: int, heads: int, groups: int = 1, dropout: float = 0.0,
                 backend: str | None = None) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"MultiheadAttention: heads: expected a divisor of d = {d}, got {heads}")
        if groups < 1:
            raise ValueError(f"MultiheadAttention: groups: expected an int >= 1, got {groups}")
        self.d, self.heads, self.groups, self.backend = d, heads, groups, backend
        self.in_proj = _linear_layer(groups, d, 3 * d)
        self.out_proj = _linear_layer(groups, d, d)
        self.dropout = nn.Dropout(dropout)

    def _part(self, start: int, stop: int):
        w, b = self.in_proj.weight, self.in_proj.bias
        return (w[start:stop], b[start:stop]) if w.dim() == 2 else (w[:, start:stop], b[:, start:stop])

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v)`` of ``x``, one GEMM."""
        return self.in_proj(x).chunk(3, dim=-1)

    def q(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, *self._part(0, self.d))

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return linear(x, *self._part(self.d, 3 * self.d)).chunk(2, dim=-1)

    def attend(self, q, k, v, key_padding_mask=None) -> torch.Tensor:
        """:func:`multihead_attention` with this module's heads and backend (no projection)."""
        return multihead_attention(q, k, v, key_padding_mask, self.heads, self.backend)

    def output(self, att: torch.Tensor) -> torch.Tensor:
        """``Dropout(out_proj(att))``."""
        return self.dropout(self.out_proj(att))

    def forward(self, query: torch.Tensor, key_value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_value is None:
            q, k, v = self.qkv(query)
        else:
            q, (k, v) = self.q(query), self.kv(key_value)
        return self.output(self.attend(q, k, v, key_padding_mask))

    def extra_repr(self) -> str:
        return f"d={self.d}, heads={self.heads}, groups={self.groups}, backend={self.backend!r}"
