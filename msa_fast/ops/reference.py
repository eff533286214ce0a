"""Eager PyTorch reference of every msa_fast op: the executable specification.

One vectorised function per op of contract §3, on any device, in fp64 / fp32 /
bf16 (half-precision inputs are computed in fp32 where a reduction needs it and
returned in the input dtype). Every fast path (Triton, C++, CUDA) is tested
against these functions, forward and backward. No input validation here: the
public wrappers in ``msa_fast/ops/<op>.py`` validate, then dispatch.

Equation numbers refer to the FD-CMDIE paper (``shared/papers/001_...``); the AGFN
dual gate follows contract §3.1.
"""

from __future__ import annotations

import math

import torch

# shared with the production ops (not oracles): defined once in _common, re-exported here
from msa_fast.ops import _common
from msa_fast.ops._common import (  # noqa: F401
    T_S,
    MinedPairs,
    mining_queries,
    reduce_loss,
    sentiment_classes,
    sinusoidal_position_encoding,
)

# --------------------------------------------------------------------------- #
# Pair mining (FD-CMDIE eq. 7-8, contract §3.4)
# --------------------------------------------------------------------------- #


def _mining_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` per row in the mining dtype; a zero row stays zero (similarity 0)."""
    x = x.to(_mining_dtype(x.dtype))
    norm = x.norm(dim=-1, keepdim=True)
    return x * torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))


def _topk_ties_low(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries per row, sorted descending, ties to the lower column.

    ``torch.topk`` breaks ties arbitrarily, so it only finds the k-th value; the
    selection is then rebuilt exactly: every entry above it, plus the
    lowest-indexed entries equal to it.
    """
    q, n = scores.shape
    kk = min(k, n)
    kth = scores.topk(kk, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    room = kk - above.sum(dim=1, keepdim=True, dtype=torch.int32)
    chosen = above | (tied & (tied.to(torch.int32).cumsum(dim=1, dtype=torch.int32) <= room))
    idx = chosen.nonzero()[:, 1].view(q, kk)  # ascending column order per row
    val = scores.gather(1, idx)
    order = val.sort(dim=1, descending=True, stable=True).indices  # stable: lower index first
    return idx.gather(1, order), val.gather(1, order)


def _pad_k(idx: torch.Tensor, val: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    missing = k - idx.shape[1]
    if missing > 0:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], missing), -1)], dim=1)
        val = torch.cat([val, val.new_full((val.shape[0], missing), float("nan"))], dim=1)
    return idx, val


def mine_pairs(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    queries: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
) -> MinedPairs:
    """Label-aware nearest / farthest neighbours by cosine similarity (eq. 7-8).

    ``features: (N, D)``, ``labels: (N,)`` int64 class ids. Queries default to the
    rows of ``features`` (``query_index[i] = i``); ``query_index[i] = -1`` marks a
    query that is not a row of ``features`` (nothing excluded).
    ``sim(q, f) = <q, f> / (|q| |f|)``, 0 when either vector is zero (eq. 7).
    For each query, ``pos`` = the ``k`` most similar rows with the same label,
    excluding the query's own row, sorted descending; ``neg`` = the ``k`` least
    similar rows with a different label, sorted ascending; ties go to the lower
    row index; missing slots are ``-1`` / ``nan``. A row with a non-finite entry
    (NaN or +-inf, in ``features`` or ``queries``) has no valid similarity: it is
    never mined for any query, and as a query it mines nothing (all ``-1`` /
    ``nan``) -- every backend does the same. Similarities are computed in
    fp32 (fp64 for fp64 inputs) and are not differentiable (mining selects pairs;
    the loss recomputes the cosines it trains on).

    This reference materialises the ``Q x N`` similarity matrix; the ``cpp``,
    ``cuda`` and ``triton`` kernels never do.
    """
    n = features.shape[0]
    queries, query_labels, query_index = mining_queries(features, labels, queries, query_labels, query_index)
    with torch.no_grad():
        sim = normalize_rows(queries) @ normalize_rows(features).T  # (Q, N)
        same = query_labels[:, None] == labels[None, :]
        is_self = query_index[:, None] == torch.arange(n, device=features.device)[None, :]
        # a non-finite row has no valid similarity (NaN): neither mined nor mining
        finite = torch.isfinite(queries).all(dim=1)[:, None] & torch.isfinite(features).all(dim=1)[None, :]
        pos_ok = same & ~is_self & finite
        neg_ok = ~same & finite
        pos_idx, pos_sim = _topk_ties_low(sim.masked_fill(~pos_ok, float("-inf")), k)
        # Least similar = largest of -sim; negating keeps "ties to the lower index".
        neg_idx, neg_sim = _topk_ties_low((-sim).masked_fill(~neg_ok, float("-inf")), k)
        neg_sim = -neg_sim
        pos_bad = pos_ok.gather(1, pos_idx).logical_not_()
        neg_bad = neg_ok.gather(1, neg_idx).logical_not_()
        pos_idx, pos_sim = pos_idx.masked_fill(pos_bad, -1), pos_sim.masked_fill(pos_bad, float("nan"))
        neg_idx, neg_sim = neg_idx.masked_fill(neg_bad, -1), neg_sim.masked_fill(neg_bad, float("nan"))
        pos_idx, pos_sim = _pad_k(pos_idx, pos_sim, k)
        neg_idx, neg_sim = _pad_k(neg_idx, neg_sim, k)
    return MinedPairs(pos_idx, pos_sim, neg_idx, neg_sim)


# --------------------------------------------------------------------------- #
# Dual-gate fusion (AGFN, contract §3.1)            -- section owned by the nn-ops work
# --------------------------------------------------------------------------- #


_F = torch.nn.functional  # alias, not an import: keeps this section self-contained


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp16 / bf16 inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dual_gate(
    h: torch.Tensor,
    u: torch.Tensor,
    w_z: torch.Tensor,
    b_z: torch.Tensor,
    g_logits: torch.Tensor,
    tau: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy gate and importance gate of the AGFN dual-gate fusion (contract §3.1).

    Shapes: ``h: (..., M, D)``, ``u: (..., M, C)`` (entropy logits), ``w_z: (M, D)``,
    ``b_z: (M,)``, ``g_logits: (..., M)``.

    * entropy gate: ``log q_m = log_softmax(u_m)`` over C,
      ``H_m = -sum_C q_m log q_m / log C`` (normalised entropy in [0, 1], natural log;
      from log-softmax so that it is finite for any finite ``u``, and ``q log q -> 0``
      where ``q`` underflows; ``C = 1``: ``H = 0``, a single class is certain),
      ``z_m = h_m . w_z[m] + b_z[m]``, ``e = softmax_m(z_m - H_m / tau)``,
      ``h_ent = sum_m e_m h_m`` -> ``(..., D)``. The entropy enters as a subtracted
      logit, so a higher entropy lowers ``e_m`` whatever the sign of ``z_m``;
    * importance gate: ``g = sigmoid(g_logits)``, ``h_imp_in = concat_m(g_m h_m)``
      -> ``(..., M*D)`` (modality-major: ``h_imp_in[..., m*D:(m+1)*D] = g_m h_m``).

    Returns ``(h_ent, h_imp_in, e, g, H)`` in the dtype of ``h``; ``e``, ``g`` and ``H``
    have shape ``(..., M)``. fp16 / bf16 inputs are computed in fp32.
    """
    dtype = h.dtype
    acc = _acc_dtype(dtype)
    hc = h.to(acc)
    c = u.shape[-1]
    logq = torch.log_softmax(u.to(acc), dim=-1)
    entropy = -(logq.exp() * logq).sum(dim=-1) * (1.0 / math.log(c) if c > 1 else 0.0)  # (..., M)
    z = (hc * w_z.to(acc)).sum(dim=-1) + b_z.to(acc)
    e = torch.softmax(z - entropy / tau, dim=-1)
    h_ent = (e.unsqueeze(-1) * hc).sum(dim=-2)
    g = torch.sigmoid(g_logits.to(acc))
    h_imp_in = (g.unsqueeze(-1) * hc).flatten(-2)
    return h_ent.to(dtype), h_imp_in.to(dtype), e.to(dtype), g.to(dtype), entropy.to(dtype)


# --------------------------------------------------------------------------- #
# Gated attention pooling, GAP (eq. 25-29, contract §3.2)
# --------------------------------------------------------------------------- #


def gated_attention_pool(
    x: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    W1g: torch.Tensor,
    b1g: torch.Tensor,
    w2g: torch.Tensor,
    b2g: torch.Tensor,
    W1a: torch.Tensor,
    b1a: torch.Tensor,
    w2a: torch.Tensor,
    b2a: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated attention pooling of M sequences into one (eq. 25-29, contract §3.2).

    Shapes: ``x: (M, B, L, d)``; ``ln_w, ln_b: (M, d)``; ``W1g: (M, h, d)``,
    ``b1g: (M, h)``, ``w2g: (M, h)``, ``b2g: (M,)`` (one GateMLP per modality);
    ``W1a: (ha, d)``, ``b1a: (ha,)``, ``w2a: (ha,)``, ``b2a: ()`` (one attention MLP
    shared by all modalities); ``mask: (B, L)`` bool, True = padding.

    Per modality m and position: ``n_m = LayerNorm_m(x_m)`` (own affine, ``eps``);
    ``g_m = sigmoid(w2g_m . GELU(W1g_m n_m + b1g_m) + b2g_m)`` (eq. 25, exact erf
    GELU); ``y_m = g_m n_m`` (eq. 26: the gate multiplies the *normalised* feature,
    as the paper's text says); ``s_m = w2a . tanh(W1a y_m + b1a) + b2a`` (eq. 27);
    ``alpha = softmax_m(s)`` (eq. 28); ``out = sum_m alpha_m y_m`` (eq. 29).

    Returns ``(out (B, L, d), alpha (M, B, L), g (M, B, L))`` in the dtype of ``x``
    (fp16 / bf16 computed in fp32). Padded positions: ``x`` is zeroed there before
    the math (so even non-finite padding is harmless) and ``out``, ``alpha`` and ``g``
    are exactly 0 there, with zero gradient to every input from those positions.
    """
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    xc = x.to(acc)
    if mask is not None:
        xc = xc.masked_fill(mask[None, :, :, None], 0.0)
    d = xc.shape[-1]
    n = _F.layer_norm(xc, (d,), eps=eps) * ln_w.to(acc)[:, None, None, :] + ln_b.to(acc)[:, None, None, :]
    hid = _F.gelu(torch.einsum("mbld,mhd->mblh", n, W1g.to(acc)) + b1g.to(acc)[:, None, None, :])
    g = torch.sigmoid(torch.einsum("mblh,mh->mbl", hid, w2g.to(acc)) + b2g.to(acc)[:, None, None])
    y = g.unsqueeze(-1) * n
    s = torch.tanh(_F.linear(y, W1a.to(acc), b1a.to(acc))) @ w2a.to(acc) + b2a.to(acc)
    alpha = torch.softmax(s, dim=0)
    out = (alpha.unsqueeze(-1) * y).sum(dim=0)
    if mask is not None:
        # where (not multiply) so that the padded values' gradient is exactly zero
        out = out.masked_fill(mask[..., None], 0.0)
        alpha = alpha.masked_fill(mask[None], 0.0)
        g = g.masked_fill(mask[None], 0.0)
    return out.to(dtype), alpha.to(dtype), g.to(dtype)



# --------------------------------------------------------------------------- #
# Attention, add + LayerNorm, DIPU (eq. 13-24, contract §3.3)
# --------------------------------------------------------------------------- #


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with a key padding mask (eq. 15 / 18, contract §3.3).

    Shapes: ``q: (B, H, Lq, Dh)``, ``k, v: (B, H, Lk, Dh)``, ``key_padding_mask:
    (B, Lk)`` bool, True = ignore that key (PyTorch's convention). ``scale``
    defaults to ``Dh ** -0.5``. ``out = softmax(q k^T * scale) v`` -> ``(B, H, Lq, Dh)``.

    A query whose keys are all masked outputs exactly 0 with zero gradient (never
    NaN): the row maximum is replaced by 0 when it is -inf, so ``exp`` gives 0
    everywhere, and the empty denominator is replaced by 1. Elsewhere it equals
    ``torch.nn.functional.scaled_dot_product_attention``. fp16 / bf16 inputs are
    computed in fp32 and returned in the input dtype.
    """
    dtype = q.dtype
    acc = _acc_dtype(dtype)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    # softmax is shift invariant, so the (detached) max only guards exp
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(den > 0, den, torch.ones_like(den))
    return torch.matmul(p, v.to(acc)).to(dtype)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``LayerNorm(x + residual)`` over the last dim (the residual + LNorm of eq. 13-22).

    Shapes: ``x, residual: (..., d)``, ``weight, bias: (d,)``; biased variance, ``eps``
    inside the square root (as ``torch.nn.LayerNorm``). fp16 / bf16 computed in fp32.
    """
    dtype = x.dtype
    acc = _acc_dtype(dtype)
    s = x.to(acc) + residual.to(acc)
    return _F.layer_norm(s, (s.shape[-1],), weight.to(acc), bias.to(acc), eps).to(dtype)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, L, d) -> (B, H, L, Dh)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)  # (B, H, L, Dh) -> (B, L, d)


def dipu(
    G: torch.Tensor,
    X: torch.Tensor,
    params: dict[str, torch.Tensor],
    heads: int,
    g_mask: torch.Tensor | None = None,
    x_mask: torch.Tensor | None = None,
    eps: float = 1e-5,
    cross2: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One deep interaction promotion unit, DIPU (FD-CMDIE eq. 13-24), dropout-free.

    Shapes: ``G: (B, Lg, d)`` global similarity feature, ``X: (B, Lx, d)`` one
    modality's dissimilarity feature, ``g_mask: (B, Lg)``, ``x_mask: (B, Lx)`` bool,
    True = padding. ``params`` holds exactly the tensors of
    ``dict(msa_fast.nn.DIPU(d, heads, ffn_dim, cross2=cross2).named_parameters())``:

    * ``norm_g_in.*``, ``norm_x_in.*``: eq. 13-14, ``G0 = LN(G + PE)``, ``X0 = LN(X + PE)``;
    * ``cross.in_proj.{weight,bias}`` ``(3d, d)`` = ``[W_Q; W_K; W_V]`` and
      ``cross.out_proj.*``: ONE multi-head cross-attention shared by both directions
      and both stages, as the paper states (eq. 16-17 use the same ``W_Q, W_K, W_V``;
      eq. 21-22 reuse ``W_Q`` and the keys / values of eq. 16-17). The output
      projection, which eq. 15 leaves implicit, is shared the same way;
    * ``norm_g1.*``, ``norm_x1.*``: ``G1 = LN(CA(G0 W_Q, X0 W_K, X0 W_V) + G0)``,
      ``X1 = LN(CA(X0 W_Q, G0 W_K, G0 W_V) + X0)`` (eq. 16-17);
    * ``self_g.*``, ``self_x.*`` (own ``in_proj``/``out_proj`` each: the paper gives no
      sharing for self-attention and G and X live in different spaces) and
      ``norm_g2.*``, ``norm_x2.*``: ``G2 = LN(SA(G1) + G1)``, ``X2 = LN(SA(X1) + X1)``
      (eq. 18-20);
    * ``norm_g3.*``, ``norm_x3.*`` (only when ``cross2``): ``G3 = LN(CA(G2 W_Q, K_X, V_X)
      + G2)``, ``X3 = LN(CA(X2 W_Q, K_G, V_G) + X2)`` with ``K_X, V_X, K_G, V_G`` the
      tensors of eq. 16-17 (eq. 21-22). ``cross2=False`` (the "w/o CrossAtt-2"
      ablation) sets ``G3, X3 = G2, X2``;
    * ``ffn_g.fc1/fc2``, ``ffn_x.fc1/fc2``: ``G_next = G3 + fc2(GELU(fc1(G3)))``, same for
      X (eq. 23-24; exact erf GELU; no LayerNorm after, as in the paper).

    Multi-head: ``heads`` divides ``d``, ``Dh = d / heads``, scores scaled by
    ``Dh ** -0.5`` (eq. 15's ``sqrt(d_k)`` read per head, as in every Transformer).

    Masks: a padded position is never a key (so it never influences a real
    position); padded inputs are zeroed first (non-finite padding is harmless,
    their gradient is 0) and padded outputs are set to exactly 0. A fully padded
    sequence (a missing modality) gives zero attention output, never NaN.
    Returns ``(G_next (B, Lg, d), X_next (B, Lx, d))`` in the dtype of ``G``;
    fp16 / bf16 are computed in fp32.
    """
    dtype = G.dtype
    acc = _acc_dtype(dtype)
    p = {name: t.to(acc) for name, t in params.items()}
    G, X = G.to(acc), X.to(acc)
    if g_mask is not None:
        G = G.masked_fill(g_mask[..., None], 0.0)
    if x_mask is not None:
        X = X.masked_fill(x_mask[..., None], 0.0)
    d = G.shape[-1]

    def norm(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return add_layer_norm(a, b, p[f"{name}.weight"], p[f"{name}.bias"], eps)

    def lin(name: str, a: torch.Tensor) -> torch.Tensor:
        return _F.linear(a, p[f"{name}.weight"], p[f"{name}.bias"])

    def attend(proj: str, q, k, v, key_mask) -> torch.Tensor:
        out = attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads), key_mask)
        return lin(f"{proj}.out_proj", _merge_heads(out))

    def self_attend(proj: str, a: torch.Tensor, key_mask) -> torch.Tensor:
        q, k, v = lin(f"{proj}.in_proj", a).chunk(3, dim=-1)
        return attend(proj, q, k, v, key_mask)

    G0 = norm("norm_g_in", G, sinusoidal_position_encoding(G.shape[1], d, device=G.device, dtype=acc).expand_as(G))
    X0 = norm("norm_x_in", X, sinusoidal_position_encoding(X.shape[1], d, device=X.device, dtype=acc).expand_as(X))
    q_g, k_g, v_g = lin("cross.in_proj", G0).chunk(3, dim=-1)
    q_x, k_x, v_x = lin("cross.in_proj", X0).chunk(3, dim=-1)
    G1 = norm("norm_g1", attend("cross", q_g, k_x, v_x, x_mask), G0)
    X1 = norm("norm_x1", attend("cross", q_x, k_g, v_g, g_mask), X0)
    G2 = norm("norm_g2", self_attend("self_g", G1, g_mask), G1)
    X2 = norm("norm_x2", self_attend("self_x", X1, x_mask), X1)
    if cross2:
        w_q, b_q = p["cross.in_proj.weight"][:d], p["cross.in_proj.bias"][:d]
        G3 = norm("norm_g3", attend("cross", _F.linear(G2, w_q, b_q), k_x, v_x, x_mask), G2)
        X3 = norm("norm_x3", attend("cross", _F.linear(X2, w_q, b_q), k_g, v_g, g_mask), X2)
    else:
        G3, X3 = G2, X2
    G_next = G3 + lin("ffn_g.fc2", _F.gelu(lin("ffn_g.fc1", G3)))
    X_next = X3 + lin("ffn_x.fc2", _F.gelu(lin("ffn_x.fc1", X3)))
    if g_mask is not None:
        G_next = G_next.masked_fill(g_mask[..., None], 0.0)
    if x_mask is not None:
        X_next = X_next.masked_fill(x_mask[..., None], 0.0)
    return G_next.to(dtype), X_next.to(dtype)



# --------------------------------------------------------------------------- #
# Contrastive losses (eq. 9-12, contract §3.4)       -- section owned by the loss work
# --------------------------------------------------------------------------- #


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half inputs: the exp / log-sum-exp and the norms run in fp32.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def unit_vectors(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` along the last dim, zero-safe in value *and* gradient.

    A vector with ``||x|| <= finfo.tiny`` (zero, or so small that its squared
    entries underflow) maps to the zero vector, so every cosine with it is 0
    (as in :func:`mine_pairs`). The reciprocal is taken of ``where(norm > tiny,
    norm, 1)`` (the "double where"), so its backward never sees ``1/0``: the
    gradient at a zero vector is exactly 0. A clamped norm (``F.normalize``)
    would give the same value but a gradient of ``1/eps`` (1e12) at zero, which
    blows up a training step; this is why it is not used. Above ``tiny`` the
    gradient is the exact derivative of ``x / ||x||``.
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    ok = norm > torch.finfo(norm.dtype).tiny
    inv = torch.where(ok, torch.where(ok, norm, torch.ones_like(norm)).reciprocal(), torch.zeros_like(norm))
    return x * inv


def nt_xent(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    negatives_mask: torch.Tensor | None = None,
    tau: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """NT-Xent over explicit (anchor, positive, negatives) rows (eq. 9, contract §3.4).

    Shapes: ``anchor (P, D)``, ``positive (P, D)``, ``negatives (P, K, D)``,
    ``negatives_mask (P, K)`` bool, True = valid (None: all valid). With
    ``c = cos(anchor, .)`` (:func:`unit_vectors`, 0 for zero vectors), the row loss is

        ``l_p = -log(exp(c_p/tau) / (exp(c_p/tau) + sum_{k valid} exp(c_k/tau)))``
        ``    = logsumexp([c_p, c_k valid] / tau) - c_p / tau``

    i.e. eq. 9 read as standard NT-Xent: the denominator runs over every pair
    sharing the anchor, the positive included, so ``l_p >= 0`` and a row with no
    valid negative has loss 0. Log-sum-exp keeps it stable for any ``tau > 0``;
    masked negatives get ``-inf`` logits (exactly zero weight and gradient).
    ``reduction``: ``"mean"`` / ``"sum"`` over rows, or ``"none"`` -> ``(P,)``; the
    mean of ``P = 0`` rows is 0 (not NaN), with zero gradients.
    Computed in fp32 for half inputs (fp64 for fp64), returned in the input dtype.
    """
    ct = _loss_dtype(anchor.dtype)
    a = unit_vectors(anchor.to(ct))
    c_pos = (a * unit_vectors(positive.to(ct))).sum(-1) / tau  # (P,)
    c_neg = torch.einsum("pd,pkd->pk", a, unit_vectors(negatives.to(ct))) / tau  # (P, K)
    if negatives_mask is not None:
        c_neg = c_neg.masked_fill(~negatives_mask, float("-inf"))
    loss = torch.logsumexp(torch.cat([c_pos[:, None], c_neg], dim=1), dim=1) - c_pos
    return reduce_loss(loss, reduction).to(anchor.dtype)


def triplet(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cosine triplet loss (eq. 10-11, contract §3.4).

    Shapes: ``anchor, positive, negative (P, D)``. Row loss
    ``max(0, d(a, p) - d(a, n) + margin)`` with ``d(x, y) = 1 - cos(x, y)`` (eq. 11;
    cos 0 for zero vectors, see :func:`unit_vectors`). ``reduction`` as in
    :func:`nt_xent` (the mean of zero rows is 0); fp32 math for half inputs, returned in the input dtype.
    """
    ct = _loss_dtype(anchor.dtype)
    a = unit_vectors(anchor.to(ct))
    d_pos = 1 - (a * unit_vectors(positive.to(ct))).sum(-1)
    d_neg = 1 - (a * unit_vectors(negative.to(ct))).sum(-1)
    loss = torch.relu(d_pos - d_neg + margin)
    return reduce_loss(loss, reduction).to(anchor.dtype)


def _anchor_group_nt_xent(logits: torch.Tensor, is_pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Eq. 9 for anchor groups: ``logits (B, ..., C)`` = cos(anchor, candidate)/tau.

    Returns, per sample ``(B,)``, the sum over valid positives ``beta`` of
    ``logsumexp_{valid gamma}(logits) - logits[beta]``. A group with no valid
    candidate gets finite dummy logits (0) so its log-sum-exp, and hence its
    backward, stays finite; it has no valid positive, so it contributes 0.
    """
    has_any = valid.any(dim=-1, keepdim=True)
    lse = torch.logsumexp(
        logits.masked_fill(~valid, float("-inf")).masked_fill(~has_any, 0.0), dim=-1, keepdim=True)
    per_pair = torch.where(is_pos & valid, lse - logits, torch.zeros_like(logits))
    return per_pair.flatten(1).sum(dim=1)


def fd_cmdie_contrastive_loss(
    sim_feats: torch.Tensor,
    diff_feats: torch.Tensor,
    pos_partner_feats: torch.Tensor,
    neg_partner_feats: torch.Tensor,
    tau: float = 0.5,
    margin: float = 0.5,
    lambda_tri: float = 0.1,
    pos_partner_mask: torch.Tensor | None = None,
    neg_partner_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """FD-CMDIE contrastive loss ``L_cl`` (section 2.3.2, eq. 9-12).

    Shapes (modality order t, a, v everywhere; ``s`` = similarity, ``d`` =
    dissimilarity features):

    * ``sim_feats (B, 3, D)`` = ``[T_s, A_s, V_s]`` of each sample i;
    * ``diff_feats (B, 3, D)`` = ``[T_d, A_d, V_d]``;
    * ``pos_partner_feats (B, Kp, 2, 3, D)``: the partners j in ``similar^i``,
      ``[:, :, 0]`` their similarity and ``[:, :, 1]`` their dissimilarity features;
    * ``neg_partner_feats (B, Kn, 3, D)``: similarity features of the partners k in
      ``different^i``;
    * ``pos_partner_mask (B, Kp)`` / ``neg_partner_mask (B, Kn)``: bool, True =
      the partner exists (mining returns -1 when a class is too small); masked
      slots may hold any finite values. None = all valid. Kp, Kn may be 0.

    Pair sets of sample i (a pair ``(alpha, beta)`` is ordered, ``alpha`` is its
    anchor, exactly as written in the paper):

    * ``Positive_in``: ``(T_s^i, V_s^i), (T_s^i, A_s^i)`` and, for every j,
      ``(T_s^j, V_s^j), (T_s^j, A_s^j)`` (text-anchored, as the paper's examples
      and contract §3.4; ``(A_s, V_s)`` is not a pair);
    * ``Positive_out``: ``(X_s^i, X_s^j)`` for X in {T, A, V}, every j;
    * ``Negative_in``: ``(T_s^i, X_d^i)`` for X in {T, A, V} and, for every j,
      ``(T_s^j, X_d^j)``;
    * ``Negative_out``: ``(X_s^i, X_s^k)`` for X in {T, A, V}, every k in
      ``different^i``.

    Eq. 9 (NT-Xent, as contract §3.4 reads it): for each ``(alpha, beta)`` in ``P^i``,
    ``-log(exp(cos(alpha, beta)/tau) / sum_{(alpha, gamma) in P^i u N^i}
    exp(cos(alpha, gamma)/tau))`` -- the denominator runs over every pair of
    ``P^i u N^i`` with the same anchor, ``beta`` and the other positives included.
    So the anchors and their candidate sets are: ``T_s^i`` -> {V_s^i, A_s^i, T_s^j,
    T_d^i, A_d^i, V_d^i, T_s^k}; ``A_s^i`` -> {A_s^j, A_s^k}; ``V_s^i`` -> {V_s^j,
    V_s^k}; each ``T_s^j`` -> {V_s^j, A_s^j, T_d^j, A_d^j, V_d^j}.
    ``l_NT^i`` is the sum over all positive pairs of ``P^i``.

    Eq. 10-11 (triplet): ``Pair_Tri^i = {(T_s^i, p, n) : p in {V_s^i, A_s^i},
    n in {T_d^i, A_d^i, V_d^i}}``, the full 2 x 3 product of sample i's own
    features (the paper anchors triplets at ``T_s^i`` only; partner triplets are
    not used); ``l_Tri^i = sum max(0, d(a, p) - d(a, n) + margin)``,
    ``d = 1 - cos``.

    The sets above are the default of a table in :mod:`msa_fast.ops._common`, read at every
    call through :func:`~msa_fast.ops._common.fd_cmdie_table` (over the rows ``T_S .. V_D``
    of a sample's stacked ``[T_s, A_s, V_s, T_d, A_d, V_d]``), which the Triton kernels read
    too: ``FD_CMDIE_INTRA_POSITIVES`` / ``FD_CMDIE_INTRA_NEGATIVES`` (Positive_in /
    Negative_in, of every sample and every similar partner), ``FD_CMDIE_TRIPLETS``
    (Pair_Tri) and ``FD_CMDIE_INTER_MODALITIES`` (the X of Positive_out / Negative_out; the
    pairs of ``T_s^i`` join its intra group, one group per anchor).

    Eq. 12: ``L_cl = mean_i l_NT^i + lambda_tri * mean_i l_Tri^i``. ``reduction``:
    ``"mean"`` (eq. 12), ``"sum"`` or ``"none"`` -> ``(B,)`` per-sample
    ``l_NT^i + lambda_tri * l_Tri^i``. The mean over ``B = 0`` samples is 0 (not NaN).
    Cosines are zero-safe
    (:func:`unit_vectors`); fp32 math for half inputs, returned in the input dtype.
    Cost: O(B (Kp + Kn) D), no pair is materialised twice.
    """
    ct = _loss_dtype(sim_feats.dtype)
    dev = sim_feats.device
    # one stack per sample and per similar partner, indexed by the pair table of _common
    own = unit_vectors(torch.cat([sim_feats, diff_feats], dim=1).to(ct))  # (B, 6, D) [T_s..V_d]
    ps = unit_vectors(pos_partner_feats.to(ct)).flatten(2, 3)  # (B, Kp, 6, D), same rows
    ns = unit_vectors(neg_partner_feats.to(ct))  # (B, Kn, 3, D) [T_s, A_s, V_s]
    b, kp, kn = own.shape[0], ps.shape[1], ns.shape[1]
    pm = pos_partner_mask if pos_partner_mask is not None else torch.ones(b, kp, dtype=torch.bool, device=dev)
    nm = neg_partner_mask if neg_partner_mask is not None else torch.ones(b, kn, dtype=torch.bool, device=dev)
    yes = lambda *shape: torch.ones(shape, dtype=torch.bool, device=dev)
    no = lambda *shape: torch.zeros(shape, dtype=torch.bool, device=dev)
    # the pair table, read and checked at every call (the Triton kernels read the same one)
    pos_in, neg_in, triplets, inter = _common.fd_cmdie_table()  # [V_s, A_s], [T_d, A_d, V_d], 6, [T_s, A_s, V_s]
    n_pos, n_neg = len(pos_in), len(neg_in)
    # T_s^i's inter-sample pairs (T_s^j, T_s^k) join its intra ones: one group per anchor.
    t_inter = slice(None) if T_S in inter else slice(0)
    pt, nt, pmt, nmt = ps[:, t_inter, T_S], ns[:, t_inter, T_S], pm[:, t_inter], nm[:, t_inter]

    # Anchor T_s^i: Positive_in, partner T_s^j, Negative_in, T_s^k.
    cand = torch.cat([own[:, pos_in], pt, own[:, neg_in], nt], dim=1)  # (B, 5+Kp+Kn, D) by default
    logits = torch.einsum("bd,bcd->bc", own[:, T_S], cand) / tau
    valid = torch.cat([yes(b, n_pos), pmt, yes(b, n_neg), nmt], dim=1)
    is_pos = torch.cat([yes(b, n_pos), pmt, no(b, n_neg), no(*nmt.shape)], dim=1)
    l_nt = _anchor_group_nt_xent(logits, is_pos, valid)

    # Anchors A_s^i, V_s^i: inter-sample pairs only, same modality.
    mods = [m for m in inter if m != T_S]
    if mods:
        cand = torch.cat([ps[:, :, mods], ns[:, :, mods]], dim=1).transpose(1, 2)  # (B, len(mods), Kp+Kn, D)
        logits = torch.einsum("bmd,bmcd->bmc", own[:, mods], cand) / tau
        valid = torch.cat([pm, nm], dim=1)[:, None, :].expand(b, len(mods), kp + kn)
        is_pos = torch.cat([yes(b, kp), no(b, kn)], dim=1)[:, None, :].expand(b, len(mods), kp + kn)
        l_nt = l_nt + _anchor_group_nt_xent(logits, is_pos, valid)

    # Anchors T_s^j of the similar partners: their own Positive_in / Negative_in.
    cand = torch.cat([ps[:, :, pos_in], ps[:, :, neg_in]], dim=2)  # (B, Kp, 5, D) by default
    logits = torch.einsum("bjd,bjcd->bjc", ps[:, :, T_S], cand) / tau
    valid = pm[:, :, None].expand(b, kp, n_pos + n_neg)
    is_pos = torch.cat([yes(b, kp, n_pos), no(b, kp, n_neg)], dim=2)
    l_nt = l_nt + _anchor_group_nt_xent(logits, is_pos, valid)

    # Triplets (eq. 10-11): the rows (anchor, positive, negative) of Pair_Tri.
    a, p, n = ([t[k] for t in triplets] for k in range(3))
    dist = lambda x, y: 1 - (x * y).sum(-1)  # d = 1 - cos of unit vectors
    l_tri = torch.relu(dist(own[:, a], own[:, p]) - dist(own[:, a], own[:, n]) + margin).sum(dim=1)

    return reduce_loss(l_nt + lambda_tri * l_tri, reduction).to(sim_feats.dtype)
