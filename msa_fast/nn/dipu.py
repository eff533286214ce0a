"""``DIPU`` and ``CMDIE``: FD-CMDIE's cross-modal deep interaction enhancement (eq. 13-29, contract §3.3).

One implementation: a DIPU's forward is the public op :func:`msa_fast.ops.dipu` on the
module's parameters, built from :class:`msa_fast.nn.MultiheadAttention`'s
functional core on :func:`msa_fast.ops.attention` and :func:`msa_fast.ops.add_layer_norm`,
so every backend of those ops speeds it up; the GEMMs stay in cuBLAS / MKL. CMDIE keeps
the three DIPUs of a layer as one ``DIPU(groups=3)`` with stacked weights and runs them
as one batched call (contract §3.3); ``batched=False`` runs the same weights unit by unit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from msa_fast.nn.attention import AddNorm, MultiheadAttention, StackedLinear
from msa_fast.nn.gap import GatedAttentionPooling
from msa_fast.ops import _validate as V
from msa_fast.ops import dipu

__all__ = ["CMDIE", "DIPU"]


class _FeedForward(nn.Module):
    """``fc2(Dropout(GELU(fc1(x))))`` (eq. 23-24's FNN; the residual is added by the caller)."""

    def __init__(self, d: int, ffn_dim: int, dropout: float, groups: int = 1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, ffn_dim) if groups == 1 else StackedLinear(groups, d, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d) if groups == 1 else StackedLinear(groups, ffn_dim, d)
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
    padding. The forward is :func:`msa_fast.ops.dipu` with ``params =
    dict(self.named_parameters())`` and ``dropout_p = dropout`` in train mode (0 in
    eval), so in eval mode it equals ``msa_fast.ops.reference.dipu(G, X, params,
    heads, ...)``, whose docstring states the weight sharing (one cross-attention
    ``cross`` for eq. 16, 17, 21 and 22, its keys / values of eq. 16-17 computed once and
    reused; separate self-attentions ``self_g``, ``self_x``; separate LayerNorms and FFNs
    per stream) and the mask rules (padded positions are never keys, their inputs are
    zeroed and their outputs are 0). ``cross2=False`` drops eq. 21-22 (the paper's
    "w/o CrossAtt-2" ablation) and with it ``norm_g3`` / ``norm_x3``. ``dropout`` (train
    mode only) acts on every attention output before its residual, and inside and after
    each FFN.

    ``groups = n > 1``: ``n`` independent units with stacked weights (every parameter
    ``(n, *dipu_param_shapes(...)[key])``), inputs ``(n, B, L, d)`` and masks ``(n, B, L)``,
    one batched call (what :class:`CMDIE` runs); :meth:`unit_params` gives unit ``i``'s
    parameters as views.
    """

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float = 0.0, cross2: bool = True,
                 backend: str | None = None, eps: float = 1e-5, groups: int = 1) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"DIPU: heads: expected a divisor of d = {d}, got {heads}")
        V.positive_int("DIPU", "groups", groups)
        self.d, self.heads, self.ffn_dim, self.cross2, self.backend, self.eps = d, heads, ffn_dim, cross2, backend, eps
        self.groups, self.dropout_p = groups, float(dropout)

        def norm() -> AddNorm:
            return AddNorm(d, groups, eps, backend)

        self.norm_g_in, self.norm_x_in = norm(), norm()
        self.cross = MultiheadAttention(d, heads, groups, backend=backend)
        self.norm_g1, self.norm_x1 = norm(), norm()
        self.self_g = MultiheadAttention(d, heads, groups, backend=backend)
        self.self_x = MultiheadAttention(d, heads, groups, backend=backend)
        self.norm_g2, self.norm_x2 = norm(), norm()
        if cross2:
            self.norm_g3, self.norm_x3 = norm(), norm()
        self.ffn_g = _FeedForward(d, ffn_dim, dropout, groups)
        self.ffn_x = _FeedForward(d, ffn_dim, dropout, groups)

    def _dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def unit_params(self, i: int | None = None) -> dict[str, torch.Tensor]:
        """The parameter dict :func:`msa_fast.ops.dipu` takes (unit ``i`` of a stacked DIPU)."""
        params = dict(self.named_parameters())
        return params if i is None else {k: v[i] for k, v in params.items()}

    def forward(self, G: torch.Tensor, X: torch.Tensor, g_mask: torch.Tensor | None = None,
                x_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # the op checks the inputs and the parameters (measured: ~20 us a call for a stacked
        # DIPU(32, 4, 64, groups=3), against a 5.3 ms eager forward at batch 8 x 50 steps)
        return dipu(G, X, self.unit_params(), self.heads, g_mask, x_mask, self.eps, self.cross2,
                    dropout_p=self._dropout(), backend=self.backend)

    def extra_repr(self) -> str:
        return (f"d={self.d}, heads={self.heads}, ffn_dim={self.ffn_dim}, cross2={self.cross2}, "
                f"groups={self.groups}, backend={self.backend!r}")


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

    ``batched=True`` runs the three DIPUs of a layer as one call of a stacked
    ``DIPU(groups=3)`` (``units[i]``, parameters ``(3, ...)`` in the order t, a, v; G
    repeated for the three pairs, the three X's right-padded to their longest length with
    masks): one GEMM per projection, one attention launch per attention step. ``batched=
    False`` runs the same weights unit by unit (a loop of the DIPU of :func:`msa_fast.ops.dipu`);
    both compute the same function. ``"auto"`` (default) batches unless padding would
    cost more than it saves or the batch is large (:meth:`use_batched`: aligned data
    batched up to 512 tokens per unit, e.g. batch 8 of 50 steps; unaligned MOSI's 50 / 375 /
    500 steps looped). The attribute may be switched on a built model.
    """

    def __init__(self, d: int, heads: int, layers: int = 3, ffn_dim: int | None = None, dropout: float = 0.0,
                 pool: str = "gap", cross2: bool = True, backend: str | None = None,
                 batched: bool | str = "auto") -> None:
        super().__init__()
        V.choice("CMDIE", "pool", pool, ("gap", "mean"))
        V.positive_int("CMDIE", "layers", layers)
        if not isinstance(batched, bool) and batched != "auto":
            V.fail("CMDIE", "batched", "True, False or 'auto'", repr(batched))
        ffn_dim = 4 * d if ffn_dim is None else ffn_dim
        self.d, self.heads, self.pool_mode, self.backend, self.batched = d, heads, pool, backend, batched
        # one stacked DIPU per layer: unit j (t, a, v) is index j of every parameter
        self.units = nn.ModuleList(DIPU(d, heads, ffn_dim, dropout, cross2, backend, groups=3) for _ in range(layers))
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
        xs, masks = [T_d, A_d, V_d], [t_mask, a_mask, v_mask]
        if self.use_batched(G.shape[1], [x.shape[1] for x in xs], G.shape[0]):
            return self._batched(G, xs, g_mask, masks)
        for i, unit in enumerate(self.units):
            enhanced = []
            for j in range(3):
                g_j, xs[j] = dipu(G, xs[j], unit.unit_params(j), self.heads, g_mask, masks[j], unit.eps,
                                  unit.cross2, dropout_p=unit._dropout(), backend=self.backend)
                enhanced.append(g_j)
            G = self._pool(i, torch.stack(enhanced), g_mask)  # (3, B, Lg, d), modalities t, a, v
        return G, xs[0], xs[1], xs[2]

    # padded attention work at most this much above the loop's: the saved launches win
    # (measured on a CPU: aligned MOSI ~1.4x faster batched; unaligned 50 / 375 / 500, a
    # ratio of 1.7, ~2x slower batched)
    AUTO_MAX_PADDING = 1.25
    # ... and only while a unit's work is small, batch x longest X length at most this many
    # tokens: batching saves launches, which stop mattering once each GEMM is large, while
    # the stacking (G three times, the gathers) keeps costing. Measured, FD-CMDIE on aligned
    # MOSI (L = 50), 1 CPU thread, batched vs loop: batch 1 12.1 vs 19.7 ms, batch 8 18.6 vs
    # 23.9 ms; batch 16 39 vs 33, 32 90 vs 65, 64 205 vs 111 ms (compiled: 22.7 / 51 / 111 vs
    # 20.3 / 39 / 81 ms at batch 16 / 32 / 64).
    AUTO_MAX_TOKENS = 512

    def use_batched(self, lg: int, lengths: list[int], batch: int | None = None) -> bool:
        """Whether ``forward`` runs the batched path for X lengths ``lengths``, G length ``lg``
        and ``batch`` rows.

        ``batched=True`` / ``False``: always / never. ``"auto"``: when padding the X's to
        the longest costs at most :attr:`AUTO_MAX_PADDING` times the attention work of
        the loop (``sum_j L_j (L_j + 2 Lg)`` against ``3 L_max (L_max + 2 Lg)``) -- always
        for aligned data -- and ``batch * L_max <= AUTO_MAX_TOKENS`` (``batch`` None: no
        such limit).
        """
        if self.batched != "auto":
            return bool(self.batched)
        top = max(lengths)
        if batch is not None and batch * top > self.AUTO_MAX_TOKENS:
            return False
        padded = 3 * top * (top + 2 * lg)
        return padded <= self.AUTO_MAX_PADDING * sum(n * (n + 2 * lg) for n in lengths)

    def _pool(self, i: int, stacked: torch.Tensor, g_mask: torch.Tensor | None) -> torch.Tensor:
        # padded positions of each G_j are 0 already, so the mean keeps them 0
        return self.pools[i](stacked, g_mask) if self.pools is not None else stacked.mean(dim=0)

    def _batched(self, G, xs, g_mask, masks):
        """The three DIPUs of each layer as one call: the X's padded to a common length.

        Padding at the end changes nothing for the real positions (never keys, their
        position encodings unchanged, LayerNorm and FFN per position), so this equals
        the per-unit loop up to float rounding; the padded outputs are cut off at the end.
        """
        lengths = [x.shape[1] for x in xs]
        L = max(lengths)
        X = torch.stack([F.pad(x, (0, 0, 0, L - n)) for x, n in zip(xs, lengths)])  # (3, B, L, d)
        x_mask = None
        if any(m is not None for m in masks) or min(lengths) < L:
            B = G.shape[0]
            x_mask = torch.stack([
                F.pad(torch.zeros(B, n, dtype=torch.bool, device=G.device) if m is None else m, (0, L - n), value=True)
                for m, n in zip(masks, lengths)])
        gs_mask = None if g_mask is None else g_mask.expand(3, *g_mask.shape)
        for i, unit in enumerate(self.units):
            Gs, X = unit(G.expand(3, *G.shape), X, gs_mask, x_mask)
            G = self._pool(i, Gs, g_mask)
        return G, X[0, :, :lengths[0]], X[1, :, :lengths[1]], X[2, :, :lengths[2]]

    def extra_repr(self) -> str:
        return (f"d={self.d}, heads={self.heads}, pool={self.pool_mode!r}, batched={self.batched}, "
                f"backend={self.backend!r}")
