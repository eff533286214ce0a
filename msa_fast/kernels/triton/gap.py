"""Triton kernels of gated attention pooling, GAP (FD-CMDIE eq. 25-29, contract §3.2).

Shapes (positions flattened, ``R = B * L``): ``x: (M, R, d)``, ``ln_w, ln_b: (M, d)``,
``W1g: (M, h, d)``, ``b1g, w2g: (M, h)``, ``b2g: (M,)``, ``W1a: (ha, d)``,
``b1a, w2a: (ha,)``, ``b2a: ()``, ``pad: (R,)`` (True = padding). Per position::

    n_m   = LayerNorm(x_m) * ln_w[m] + ln_b[m]
    g_m   = sigmoid(w2g[m] . GELU(W1g[m] n_m + b1g[m]) + b2g[m])      (exact erf GELU)
    y_m   = g_m n_m
    s_m   = w2a . tanh(W1a y_m + b1a) + b2a = w2a . tanh(g_m (W1a n_m) + b1a) + b2a
    alpha = softmax_m(s),   out = sum_m alpha_m y_m                   -> (R, d)

Padded positions read ``x`` as 0 and output ``out = alpha = g = 0``; their incoming
gradients are ignored, so nothing flows back from them.

Design: the two hidden layers are GEMMs over all ``M * R`` positions, run by
``torch`` (cuBLAS; fp32, so IEEE for fp32 inputs as ``torch.backends.cuda.matmul``
leaves TF32 off by default); the Triton kernels do what is row-local and would
otherwise cost several passes:

* ``gap_layer_norm_kernel``: ``n = LayerNorm(x)`` per modality (fp32 statistics), pads zeroed.
* forward ``pre_g = n W1g^T + b1g`` and ``na = n W1a^T`` (because ``g_m`` is a scalar
  per position, ``W1a y_m = g_m na_m``: one GEMM serves the attention MLP);
* ``gap_pool_kernel``: GELU, gate, tanh scores and an online softmax over the M
  modalities, ``out``, ``alpha``, ``g``;
* backward (recomputing ``n``, ``pre_g``, ``na``): ``gap_pool_bwd_kernel`` computes
  per position ``ds`` (softmax), ``dpre_a``, ``du`` (gate logit), ``dpre_g`` and the
  coefficient of ``dout`` in ``dn``, plus per-program partial sums of ``dw2g`` and
  ``dw2a``; ``dn`` and every weight gradient are then GEMMs and sums, and the
  LayerNorm backward is ``gap_layer_norm_bwd_kernel``. No atomics: deterministic.

A tile of a kernel is at most ``TILE`` fp32 elements, so that nothing spills
(``tools/compile_gate.py``): rows per program shrink as ``d`` or ``h`` grow,
and any ``d, h, ha <= MAX_WIDTH`` is taken. No ``tl.dot``: the widths need not be
multiples of 16. fp16 / bf16 inputs compute in fp32 (as the
reference does) and return their own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_fast.kernels.triton._common import on_tensor_device, pid64

_INV_SQRT2 = tl.constexpr(0.7071067811865476)  # a plain float global does not compile
_INV_SQRT2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * _INV_SQRT2))


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.erf(x * _INV_SQRT2)) + x * _INV_SQRT2PI * tl.exp(-0.5 * x * x)


@triton.jit
def _tanh(x):
    # tanh without libdevice (unavailable to the interpreter); exact in fp32.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0




TILE = 2048  # fp32 elements per (rows, width) tile: 16 registers per thread at 4 warps
MAX_WIDTH = 2048  # d, h, ha: a tile of one row at most


@triton.jit
def _rows(pad_ptr, blk, R, BP: tl.constexpr, HAS_PAD: tl.constexpr):
    """Positions of row block ``blk``, in bounds, and whether each holds a real (unpadded) position."""
    rows = blk * BP + tl.arange(0, BP)
    r_ok = rows < R
    keep = r_ok
    if HAS_PAD:
        keep = keep & (tl.load(pad_ptr + rows, mask=r_ok, other=1) == 0)
    return rows, r_ok, keep


@triton.jit
def _tile(ptr, base, rows, r_ok, W, WP: tl.constexpr):
    """A ``(BP, WP)`` fp32 tile of rows of width ``W`` (row stride ``W``) at ``ptr + base``."""
    offs = tl.arange(0, WP)
    ok = r_ok[:, None] & (offs < W)[None, :]
    return tl.load(ptr + base + rows[:, None] * W + offs[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _vec(ptr, base, W, WP: tl.constexpr):
    offs = tl.arange(0, WP)
    return tl.load(ptr + base + offs, mask=offs < W, other=0.0).to(tl.float32)


@triton.jit
def gap_layer_norm_kernel(x_ptr, pad_ptr, lnw_ptr, lnb_ptr, n_ptr, mean_ptr, rstd_ptr, R, D, eps,
                          BP: tl.constexpr, DP: tl.constexpr, HAS_PAD: tl.constexpr):
    """``n[m] = LayerNorm(x[m]) * ln_w[m] + ln_b[m]`` (fp32) for a block of rows; padded rows read x = 0."""
    m = pid64(1)
    rows, r_ok, keep = _rows(pad_ptr, pid64(0), R, BP, HAS_PAD)
    offs = tl.arange(0, DP)
    d_ok = offs < D
    x = _tile(x_ptr, m * R * D, rows, keep, D, DP)
    mu = tl.sum(x, axis=1) / D
    xc = tl.where(d_ok[None, :], x - mu[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    n = xc * rstd[:, None] * _vec(lnw_ptr, m * D, D, DP)[None, :] + _vec(lnb_ptr, m * D, D, DP)[None, :]
    tl.store(n_ptr + m * R * D + rows[:, None] * D + offs[None, :], n, mask=r_ok[:, None] & d_ok[None, :])
    tl.store(mean_ptr + m * R + rows, mu, mask=r_ok)
    tl.store(rstd_ptr + m * R + rows, rstd, mask=r_ok)


@triton.jit
def _modality(pg_ptr, na_ptr, b1g_ptr, w2g_ptr, b2g_ptr, b1a_ptr, w2a_ptr, b2a_ptr, m, rows, r_ok,
              R, HG, HA, HP: tl.constexpr, AP: tl.constexpr):
    """Gate and score of modality ``m`` from its hidden pre-activations: ``(pre_g, hid, g, na, t, s)``."""
    pre_g = _tile(pg_ptr, m * R * HG, rows, r_ok, HG, HP) + _vec(b1g_ptr, m * HG, HG, HP)[None, :]
    hid = _gelu(pre_g)
    g = tl.sigmoid(tl.sum(hid * _vec(w2g_ptr, m * HG, HG, HP)[None, :], axis=1) + tl.load(b2g_ptr + m).to(tl.float32))
    na = _tile(na_ptr, m * R * HA, rows, r_ok, HA, AP)
    t = _tanh(g[:, None] * na + _vec(b1a_ptr, 0, HA, AP)[None, :])
    s = tl.sum(t * _vec(w2a_ptr, 0, HA, AP)[None, :], axis=1) + tl.load(b2a_ptr).to(tl.float32)
    return pre_g, hid, g, na, t, s


@triton.jit
def _pick(X, cols, m):
    """Column ``m`` of a ``(BP, M_P)`` register matrix."""
    return tl.sum(tl.where(cols[None, :] == m, X, 0.0), axis=1)


@triton.jit
def gap_pool_kernel(n_ptr, pg_ptr, na_ptr, pad_ptr, b1g_ptr, w2g_ptr, b2g_ptr, b1a_ptr, w2a_ptr, b2a_ptr,
                    out_ptr, alpha_ptr, g_ptr, R, D, HG, HA,
                    M: tl.constexpr, M_P: tl.constexpr, BP: tl.constexpr, DP: tl.constexpr,
                    HP: tl.constexpr, AP: tl.constexpr, HAS_PAD: tl.constexpr):
    """Forward: per position, the M gates and scores, an online softmax and ``out = sum alpha g n``."""
    rows, r_ok, keep = _rows(pad_ptr, pid64(0), R, BP, HAS_PAD)
    cols = tl.arange(0, M_P)
    offs_d = tl.arange(0, DP)
    run_max = tl.full((BP,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BP,), dtype=tl.float32)
    acc = tl.zeros((BP, DP), dtype=tl.float32)
    S = tl.zeros((BP, M_P), dtype=tl.float32)
    G = tl.zeros((BP, M_P), dtype=tl.float32)
    for m in tl.static_range(M):
        _pg, _hid, g, _na, _t, s = _modality(pg_ptr, na_ptr, b1g_ptr, w2g_ptr, b2g_ptr, b1a_ptr, w2a_ptr, b2a_ptr,
                                             m, rows, r_ok, R, HG, HA, HP, AP)
        n = _tile(n_ptr, m * R * D, rows, r_ok, D, DP)
        new_max = tl.maximum(run_max, s)
        scale = tl.exp(run_max - new_max)
        w = tl.exp(s - new_max)
        run_sum = run_sum * scale + w
        acc = acc * scale[:, None] + (w * g)[:, None] * n
        run_max = new_max
        S = tl.where(cols[None, :] == m, s[:, None], S)
        G = tl.where(cols[None, :] == m, g[:, None], G)
    out = tl.where(keep[:, None], acc / run_sum[:, None], 0.0)
    alpha = tl.where(keep[:, None] & (cols[None, :] < M), tl.exp(S - run_max[:, None]) / run_sum[:, None], 0.0)
    G = tl.where(keep[:, None], G, 0.0)
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & (offs_d < D)[None, :])
    mr_ok = r_ok[:, None] & (cols[None, :] < M)
    tl.store(alpha_ptr + cols[None, :] * R + rows[:, None], alpha.to(alpha_ptr.dtype.element_ty), mask=mr_ok)
    tl.store(g_ptr + cols[None, :] * R + rows[:, None], G.to(g_ptr.dtype.element_ty), mask=mr_ok)


@triton.jit
def gap_pool_bwd_kernel(n_ptr, pg_ptr, na_ptr, pad_ptr, b1g_ptr, w2g_ptr, b2g_ptr, b1a_ptr, w2a_ptr, b2a_ptr,
                        dout_ptr, s_do_r, s_do_d, dal_ptr, s_da_m, s_da_r, dg_ptr, s_dg_m, s_dg_r,
                        dpg_ptr, dpa_ptr, du_ptr, ds_ptr, c_ptr, gate_ptr, p_w2g, p_w2a, R, D, HG, HA,
                        M: tl.constexpr, M_P: tl.constexpr, BP: tl.constexpr, DP: tl.constexpr,
                        HP: tl.constexpr, AP: tl.constexpr, HAS_PAD: tl.constexpr):
    """Backward of the pooling, per position block (see the module docstring).

    Writes ``dpre_g (M, R, h)``, ``dpre_a (M, R, ha)`` (gradient of ``W1a y + b1a``),
    ``du = dL/d(gate logit)``, ``ds = dL/ds``, ``c = alpha g`` (the coefficient of
    ``dout`` in ``dn``) and the gate ``g``, all ``(M, R)``, and this program's partial sums of ``dw2g``
    ``(M, h)`` and ``dw2a`` ``(M, ha)``; everything is 0 at padded positions.
    """
    pid = pid64(0)
    rows, r_ok, keep = _rows(pad_ptr, pid, R, BP, HAS_PAD)
    cols = tl.arange(0, M_P)
    offs_d = tl.arange(0, DP)
    offs_h = tl.arange(0, HP)
    offs_a = tl.arange(0, AP)
    dout = tl.load(dout_ptr + rows[:, None] * s_do_r + offs_d[None, :] * s_do_d,
                   mask=keep[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
    S = tl.full((BP, M_P), float("-inf"), dtype=tl.float32)
    Q = tl.zeros((BP, M_P), dtype=tl.float32)  # <dout, n_m>
    G = tl.zeros((BP, M_P), dtype=tl.float32)
    for m in tl.static_range(M):
        _pg, _hid, g, _na, _t, s = _modality(pg_ptr, na_ptr, b1g_ptr, w2g_ptr, b2g_ptr, b1a_ptr, w2a_ptr, b2a_ptr,
                                             m, rows, r_ok, R, HG, HA, HP, AP)
        q = tl.sum(dout * _tile(n_ptr, m * R * D, rows, r_ok, D, DP), axis=1)
        S = tl.where(cols[None, :] == m, s[:, None], S)
        Q = tl.where(cols[None, :] == m, q[:, None], Q)
        G = tl.where(cols[None, :] == m, g[:, None], G)
    mr_ok = r_ok[:, None] & (cols[None, :] < M)
    e = tl.exp(S - tl.max(S, axis=1)[:, None])
    alpha = e / tl.sum(e, axis=1)[:, None]
    dA = tl.load(dal_ptr + cols[None, :] * s_da_m + rows[:, None] * s_da_r, mask=mr_ok, other=0.0).to(tl.float32)
    dA = dA + G * Q  # dL/dalpha_m = dalpha_m + <dout, y_m>
    DS = tl.where(keep[:, None], alpha * (dA - tl.sum(alpha * dA, axis=1)[:, None]), 0.0)
    tl.store(ds_ptr + cols[None, :] * R + rows[:, None], DS, mask=mr_ok)
    tl.store(c_ptr + cols[None, :] * R + rows[:, None], tl.where(keep[:, None], alpha * G, 0.0), mask=mr_ok)
    tl.store(gate_ptr + cols[None, :] * R + rows[:, None], tl.where(keep[:, None], G, 0.0), mask=mr_ok)
    for m in tl.static_range(M):
        pre_g, hid, g, na, t, _s = _modality(pg_ptr, na_ptr, b1g_ptr, w2g_ptr, b2g_ptr, b1a_ptr, w2a_ptr, b2a_ptr,
                                             m, rows, r_ok, R, HG, HA, HP, AP)
        ds = _pick(DS, cols, m)
        dpre_a = ds[:, None] * _vec(w2a_ptr, 0, HA, AP)[None, :] * (1.0 - t * t)
        dg_ext = tl.load(dg_ptr + m * s_dg_m + rows * s_dg_r, mask=keep, other=0.0).to(tl.float32)
        # the gate g_m reaches the loss through y_m in out, in the score, and directly
        dg = dg_ext + _pick(alpha, cols, m) * _pick(Q, cols, m) + tl.sum(dpre_a * na, axis=1)
        du = tl.where(keep, dg * g * (1.0 - g), 0.0)
        dpre_g = du[:, None] * _vec(w2g_ptr, m * HG, HG, HP)[None, :] * _gelu_grad(pre_g)
        tl.store(dpg_ptr + m * R * HG + rows[:, None] * HG + offs_h[None, :], dpre_g,
                 mask=r_ok[:, None] & (offs_h < HG)[None, :])
        tl.store(dpa_ptr + m * R * HA + rows[:, None] * HA + offs_a[None, :], dpre_a,
                 mask=r_ok[:, None] & (offs_a < HA)[None, :])
        tl.store(du_ptr + m * R + rows, du, mask=r_ok)
        tl.store(p_w2g + (pid * M + m) * HG + offs_h, tl.sum(du[:, None] * hid, axis=0), mask=offs_h < HG)
        tl.store(p_w2a + (pid * M + m) * HA + offs_a, tl.sum(ds[:, None] * t, axis=0), mask=offs_a < HA)


@triton.jit
def gap_layer_norm_bwd_kernel(dn_ptr, x_ptr, pad_ptr, lnw_ptr, mean_ptr, rstd_ptr, dx_ptr, R, D,
                              BP: tl.constexpr, DP: tl.constexpr, HAS_PAD: tl.constexpr):
    """``dx`` of ``n = LayerNorm(x) * ln_w + ln_b`` given ``dn`` (fp32), 0 at padded rows."""
    m = pid64(1)
    rows, r_ok, keep = _rows(pad_ptr, pid64(0), R, BP, HAS_PAD)
    offs = tl.arange(0, DP)
    d_ok = offs < D
    mu = tl.load(mean_ptr + m * R + rows, mask=r_ok, other=0.0)
    rstd = tl.load(rstd_ptr + m * R + rows, mask=r_ok, other=0.0)
    x = _tile(x_ptr, m * R * D, rows, keep, D, DP)
    xhat = tl.where(d_ok[None, :], (x - mu[:, None]) * rstd[:, None], 0.0)
    dxhat = _tile(dn_ptr, m * R * D, rows, r_ok, D, DP) * _vec(lnw_ptr, m * D, D, DP)[None, :]
    c1 = tl.sum(dxhat, axis=1) / D
    c2 = tl.sum(dxhat * xhat, axis=1) / D
    dx = tl.where(keep[:, None] & d_ok[None, :], rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None]), 0.0)
    tl.store(dx_ptr + m * R * D + rows[:, None] * D + offs[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


def _pow2(w: int) -> int:
    return max(2, triton.next_power_of_2(w))


def _block_rows(*widths: int) -> int:
    """Rows per program: the widest tile stays within ``TILE`` fp32 elements."""
    return max(1, min(64, TILE // _pow2(max(widths))))


def _prepare(x, mask, weights):
    M, B, L, D = x.shape
    R = B * L
    x2 = x.reshape(M, R, D).contiguous()
    pad = mask.reshape(R).to(torch.uint8).contiguous() if mask is not None else x2
    weights = [w.contiguous() for w in weights]
    HG, HA = weights[2].shape[1], weights[6].shape[0]
    return x2, pad, weights, (M, B, L, D, R, HG, HA)


def _hidden(x2, pad, has_pad, ws, dims, eps):
    """``n, mean, rstd`` (gap_layer_norm_kernel) and the two GEMMs ``pre_g`` (without b1g), ``na``."""
    M, B, L, D, R, HG, HA = dims
    lnw, lnb, W1g, _b1g, _w2g, _b2g, W1a = ws[:7]
    f32 = dict(dtype=torch.float32, device=x2.device)
    n = torch.empty((M, R, D), **f32)
    mean = torch.empty((M, R), **f32)
    rstd = torch.empty((M, R), **f32)
    bp = _block_rows(D)
    gap_layer_norm_kernel[(triton.cdiv(R, bp), M)](x2, pad, lnw, lnb, n, mean, rstd, R, D, float(eps),
                                                  BP=bp, DP=_pow2(D), HAS_PAD=has_pad)
    pre_g = torch.bmm(n, W1g.float().transpose(1, 2))
    na = torch.matmul(n, W1a.float().t())
    return n, mean, rstd, pre_g, na


def _pool_meta(M, D, HG, HA, has_pad) -> dict:
    return dict(M=M, M_P=_pow2(M), BP=_block_rows(D, HG, HA), DP=_pow2(D), HP=_pow2(HG), AP=_pow2(HA),
                HAS_PAD=has_pad)


@on_tensor_device
def gap_forward(x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a, mask, eps):
    """Returns ``(out (B, L, d), alpha (M, B, L), g (M, B, L))`` in ``x``'s dtype."""
    x2, pad, ws, dims = _prepare(x, mask, (ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a))
    M, B, L, D, R, HG, HA = dims
    out = x.new_empty((R, D))
    alpha = x.new_empty((M, R))
    g = x.new_empty((M, R))
    if R:
        n, _mean, _rstd, pre_g, na = _hidden(x2, pad, mask is not None, ws, dims, eps)
        meta = _pool_meta(M, D, HG, HA, mask is not None)
        gap_pool_kernel[(triton.cdiv(R, meta["BP"]),)](
            n, pre_g, na, pad, ws[3], ws[4], ws[5], ws[7], ws[8], ws[9], out, alpha, g, R, D, HG, HA, **meta)
    return out.view(B, L, D), alpha.view(M, B, L), g.view(M, B, L)


@on_tensor_device
def gap_backward(dout, dalpha, dg, x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a, mask, eps):
    """Returns the gradients of ``(x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a)``.

    ``dout: (B, L, d)``, ``dalpha, dg: (M, B, L)`` may be ``None`` or arbitrarily strided.
    """
    x2, pad, ws, dims = _prepare(x, mask, (ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a))
    M, B, L, D, R, HG, HA = dims
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    inputs = (x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a)
    if R == 0:
        return tuple(torch.zeros_like(t) for t in inputs)

    def grad2d(t, shape):
        if t is None:
            return torch.zeros((), dtype=x.dtype, device=dev).expand(shape)
        return t.reshape(shape)

    dout2, dal2, dg2 = grad2d(dout, (R, D)), grad2d(dalpha, (M, R)), grad2d(dg, (M, R))
    has_pad = mask is not None
    n, mean, rstd, pre_g, na = _hidden(x2, pad, has_pad, ws, dims, eps)
    meta = _pool_meta(M, D, HG, HA, has_pad)
    nprog = triton.cdiv(R, meta["BP"])
    dpre_g = torch.empty((M, R, HG), **f32)
    dpre_a = torch.empty((M, R, HA), **f32)
    du, ds, c, gate = (torch.empty((M, R), **f32) for _ in range(4))
    p_w2g = torch.empty((nprog, M, HG), **f32)
    p_w2a = torch.empty((nprog, M, HA), **f32)
    gap_pool_bwd_kernel[(nprog,)](
        n, pre_g, na, pad, ws[3], ws[4], ws[5], ws[7], ws[8], ws[9],
        dout2, dout2.stride(0), dout2.stride(1), dal2, dal2.stride(0), dal2.stride(1),
        dg2, dg2.stride(0), dg2.stride(1), dpre_g, dpre_a, du, ds, c, gate, p_w2g, p_w2a, R, D, HG, HA, **meta,
        num_warps=8)  # the two passes over M keep several tiles live: 4 warps spill (Triton 3.6, bf16)
    # W1a y_m = g_m (W1a n_m): the gradient reaching the attention GEMM's output na is g dpre_a
    dna = dpre_a * gate[..., None]
    dn = c[..., None] * dout2.float()[None] + torch.bmm(dpre_g, W1g.float()) + torch.matmul(dna, W1a.float())
    dx = torch.empty_like(x2)
    bp = _block_rows(D)
    gap_layer_norm_bwd_kernel[(triton.cdiv(R, bp), M)](dn, x2, pad, ws[0], mean, rstd, dx, R, D,
                                                      BP=bp, DP=_pow2(D), HAS_PAD=has_pad)
    xf = x2.float() if mask is None else x2.float().masked_fill(mask.reshape(1, R, 1), 0.0)
    xhat = (xf - mean[..., None]) * rstd[..., None]
    grads = (
        dx.view(x.shape),
        (dn * xhat).sum(1), dn.sum(1),
        torch.bmm(dpre_g.transpose(1, 2), n), dpre_g.sum(1), p_w2g.sum(0), du.sum(1),
        torch.matmul(dna.reshape(M * R, HA).t(), n.reshape(M * R, D)), dpre_a.sum((0, 1)), p_w2a.sum((0, 1)),
        ds.sum(),
    )
    return tuple(gr.to(w.dtype) for gr, w in zip(grads, inputs))
