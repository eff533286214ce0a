"""``MultiheadAttention`` and ``AddNorm``: the one multi-head attention of every model (contract §3.3).

DIPU / CMDIE, AGFN's cross-modal blocks and ProMMA's backbone all use these, and
``msa_fast.ops.dipu`` uses their functional core (:mod:`msa_fast.ops.multihead`:
:func:`multihead_attention`, :func:`linear`, :func:`add_norm`, re-exported here), so
that attention always runs through :func:`msa_fast.ops.attention` and residual + LayerNorm through
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

from msa_fast.ops.multihead import add_norm, linear, multihead_attention

__all__ = ["AddNorm", "MultiheadAttention", "StackedLinear", "add_norm", "linear", "multihead_attention"]


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
