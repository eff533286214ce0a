"""``DIPU`` and ``CMDIE``: FD-CMDIE's cross-modal deep interaction enhancement (eq. 13-29, SPEC 3.3).

Both are built from :func:`msa_fast.ops.attention`, :func:`msa_fast.ops.add_layer_norm`
and :class:`msa_fast.nn.GatedAttentionPooling`, so every backend of those ops
speeds them up; the GEMMs stay in cuBLAS / MKL.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from msa_fast import ops
from msa_fast.nn.gap import GatedAttentionPooling
from msa_fast.ops import _validate as V
from msa_fast.ops.reference import sinusoidal_position_encoding

__all__ = ["CMDIE", "DIPU"]


class _Attention(nn.Module):
    """Projections of one multi-head attention: ``in_proj`` = [W_Q; W_K; W_V] (d -> 3d), ``out_proj``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)


class _FeedForward(nn.Module):
    """``fc2(Dropout(GELU(fc1(x))))`` (eq. 23-24's FNN; the residual is added by the caller)."""

    def __init__(self, d: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


def _check_pair(op: str, G, X, g_mask, x_mask, d: int, names=("G", "X")) -> None:
    V.tensor(op, names[0], G, ndim=3, shape=(None, None, d), layout="(B, Lg, d)")
    V.tensor(op, names[1], X, ndim=3, shape=(G.shape[0], None, d), like=G, layout="(B, L, d)")
    V.mask(op, f"{names[0].lower()}_mask", g_mask, G.shape[:2], G.device)
    V.mask(op, f"{names[1].lower()[0]}_mask", x_mask, X.shape[:2], G.device)


class DIPU(nn.Module):
    """Deep interaction promotion unit (FD-CMDIE eq. 13-24): ``(G, X) -> (G_next, X_next)``.

    ``G: (B, Lg, d)`` global similarity feature, ``X: (B, Lx, d)`` one modality's
    dissimilarity feature, ``g_mask: (B, Lg)`` / ``x_mask: (B, Lx)`` bool, True =
    padding. In eval mode (or ``dropout=0``) it equals
    ``msa_fast.ops.reference.dipu(G, X, dict(self.named_parameters()), heads, ...)``,
    whose docstring states the weight sharing (one cross-attention ``cross`` for
    eq. 16, 17, 21 and 22, its keys / values of eq. 16-17 computed once and reused;
    separate self-attentions ``self_g``, ``self_x``; separate LayerNorms and FFNs per
    stream) and the mask rules (padded positions are never keys, their inputs are
    zeroed and their outputs are 0). ``cross2=False`` drops eq. 21-22 (the paper's
    "w/o CrossAtt-2" ablation) and with it ``norm_g3`` / ``norm_x3``.
    ``dropout`` (train mode only) acts on every attention output before its
    residual, and inside and after each FFN.
    """

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float = 0.0, cross2: bool = True,
                 backend: str | None = None, eps: float = 1e-5) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"DIPU: heads: expected a divisor of d = {d}, got {heads}")
        self.d, self.heads, self.ffn_dim, self.cross2, self.backend, self.eps = d, heads, ffn_dim, cross2, backend, eps
        self.norm_g_in, self.norm_x_in = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.cross = _Attention(d)
        self.norm_g1, self.norm_x1 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.self_g, self.self_x = _Attention(d), _Attention(d)
        self.norm_g2, self.norm_x2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        if cross2:
            self.norm_g3, self.norm_x3 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.ffn_g, self.ffn_x = _FeedForward(d, ffn_dim, dropout), _FeedForward(d, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def _norm(self, norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return ops.add_layer_norm(x, residual, norm.weight, norm.bias, self.eps, backend=self.backend)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def _attend(self, proj: _Attention, q, k, v, key_mask) -> torch.Tensor:
        out = ops.attention(self._heads(q), self._heads(k), self._heads(v), key_mask, backend=self.backend)
        return self.dropout(proj.out_proj(out.transpose(1, 2).flatten(2)))

    def _self_attend(self, proj: _Attention, x: torch.Tensor, key_mask) -> torch.Tensor:
        q, k, v = proj.in_proj(x).chunk(3, dim=-1)
        return self._attend(proj, q, k, v, key_mask)

    def _with_pe(self, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        pe = sinusoidal_position_encoding(x.shape[1], self.d, device=x.device, dtype=x.dtype)
        return self._norm(norm, x, pe.expand_as(x))

    def forward(self, G: torch.Tensor, X: torch.Tensor, g_mask: torch.Tensor | None = None,
                x_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair("DIPU", G, X, g_mask, x_mask, self.d)
        if g_mask is not None:
            G = G.masked_fill(g_mask[..., None], 0.0)
        if x_mask is not None:
            X = X.masked_fill(x_mask[..., None], 0.0)
        G0, X0 = self._with_pe(self.norm_g_in, G), self._with_pe(self.norm_x_in, X)  # eq. 13-14
        q_g, k_g, v_g = self.cross.in_proj(G0).chunk(3, dim=-1)
        q_x, k_x, v_x = self.cross.in_proj(X0).chunk(3, dim=-1)
        G1 = self._norm(self.norm_g1, self._attend(self.cross, q_g, k_x, v_x, x_mask), G0)  # eq. 16
        X1 = self._norm(self.norm_x1, self._attend(self.cross, q_x, k_g, v_g, g_mask), X0)  # eq. 17
        G2 = self._norm(self.norm_g2, self._self_attend(self.self_g, G1, g_mask), G1)  # eq. 19
        X2 = self._norm(self.norm_x2, self._self_attend(self.self_x, X1, x_mask), X1)  # eq. 20
        if self.cross2:
            w_q, b_q = self.cross.in_proj.weight[: self.d], self.cross.in_proj.bias[: self.d]
            G3 = self._norm(self.norm_g3, self._attend(self.cross, F.linear(G2, w_q, b_q), k_x, v_x, x_mask), G2)
            X3 = self._norm(self.norm_x3, self._attend(self.cross, F.linear(X2, w_q, b_q), k_g, v_g, g_mask), X2)
        else:
            G3, X3 = G2, X2
        G_next = G3 + self.dropout(self.ffn_g(G3))  # eq. 23
        X_next = X3 + self.dropout(self.ffn_x(X3))  # eq. 24
        if g_mask is not None:
            G_next = G_next.masked_fill(g_mask[..., None], 0.0)
        if x_mask is not None:
            X_next = X_next.masked_fill(x_mask[..., None], 0.0)
        return G_next, X_next

    def extra_repr(self) -> str:
        return (f"d={self.d}, heads={self.heads}, ffn_dim={self.ffn_dim}, cross2={self.cross2}, "
                f"backend={self.backend!r}")


class CMDIE(nn.Module):
    """Cross-modal deep interaction enhancement network (FD-CMDIE section 2.4, eq. 13-29).

    ``forward(G, T_d, A_d, V_d, g_mask, t_mask, a_mask, v_mask) -> (G, T_d, A_d, V_d)``.
    Each input is a sequence ``(B, L, d)`` with an optional bool padding mask
    ``(B, L)`` (True = padding); lengths may differ between modalities (unaligned
    data). ``G`` is a sequence of its own length ``Lg`` with its own ``g_mask``:
    eq. 16 writes ``G_s in R^{T_s x d}`` next to ``X_d in R^{T_x x d}``, i.e. G's length
    is independent of X's, and every attention of the DIPU works for any pair of
    lengths. The paper does not give how ``G_s`` is built from ``T_s, V_s, A_s``; the
    caller builds it, e.g. with :meth:`global_feature` (concatenation in time,
    which keeps every token of every modality and works unaligned).

    Per layer ``i`` (``layers``, default 3 as Table 2): ``G_X, X_d <- DIPU_{i,X}(G, X_d)``
    for X in (t, a, v), each with its own DIPU; ``G <- GAP_i(stack(G_t, G_a, G_v),
    g_mask)`` with an own GAP per layer (eq. 25-29), or the plain mean of the three
    when ``pool="mean"`` (the paper's "w/o GAP" ablation). ``cross2=False`` is the
    "w/o CrossAtt-2" ablation of every DIPU. Padded positions of every output are 0.
    """

    def __init__(self, d: int, heads: int, layers: int = 3, ffn_dim: int | None = None, dropout: float = 0.0,
                 pool: str = "gap", cross2: bool = True, backend: str | None = None) -> None:
        super().__init__()
        V.choice("CMDIE", "pool", pool, ("gap", "mean"))
        V.positive_int("CMDIE", "layers", layers)
        ffn_dim = 4 * d if ffn_dim is None else ffn_dim
        self.d, self.heads, self.pool_mode, self.backend = d, heads, pool, backend
        self.units = nn.ModuleList(
            nn.ModuleList(DIPU(d, heads, ffn_dim, dropout, cross2, backend) for _ in range(3))
            for _ in range(layers))
        self.pools = nn.ModuleList(
            GatedAttentionPooling(d, 3, backend=backend) for _ in range(layers)) if pool == "gap" else None

    @staticmethod
    def global_feature(T_s: torch.Tensor, A_s: torch.Tensor, V_s: torch.Tensor,
                       t_mask: torch.Tensor | None = None, a_mask: torch.Tensor | None = None,
                       v_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``G_s = concat_time(T_s, A_s, V_s)`` -> ``(G (B, Lt+La+Lv, d), g_mask (B, Lt+La+Lv))``.

        Padded tokens stay padded (a missing mask means no padding); interior
        padding is harmless because every op masks by position, not by length.
        """
        seqs, masks = (T_s, A_s, V_s), (t_mask, a_mask, v_mask)
        full = [torch.zeros(s.shape[:2], dtype=torch.bool, device=s.device) if m is None else m
                for s, m in zip(seqs, masks)]
        return torch.cat(seqs, dim=1), torch.cat(full, dim=1)

    def forward(self, G: torch.Tensor, T_d: torch.Tensor, A_d: torch.Tensor, V_d: torch.Tensor,
                g_mask: torch.Tensor | None = None, t_mask: torch.Tensor | None = None,
                a_mask: torch.Tensor | None = None, v_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        for name, x, m in (("T_d", T_d, t_mask), ("A_d", A_d, a_mask), ("V_d", V_d, v_mask)):
            _check_pair("CMDIE", G, x, g_mask, m, self.d, names=("G", name))
        xs, masks = [T_d, A_d, V_d], (t_mask, a_mask, v_mask)
        for i, units in enumerate(self.units):
            enhanced = []
            for j, unit in enumerate(units):
                g_j, xs[j] = unit(G, xs[j], g_mask, masks[j])
                enhanced.append(g_j)
            stacked = torch.stack(enhanced)  # (3, B, Lg, d), modalities t, a, v
            # padded positions of each G_j are 0 already, so the mean keeps them 0
            G = self.pools[i](stacked, g_mask) if self.pools is not None else stacked.mean(dim=0)
        return G, xs[0], xs[1], xs[2]

    def extra_repr(self) -> str:
        return f"d={self.d}, heads={self.heads}, pool={self.pool_mode!r}, backend={self.backend!r}"
