"""Triton kernels of gated attention pooling, GAP (FD-CMDIE eq. 25-29, SPEC 3.2).

Shapes (positions flattened, ``R = B * L``): ``x: (M, R, d)``, ``ln_w, ln_b: (M, d)``,
``W1g: (M, h, d)``, ``b1g, w2g: (M, h)``, ``b2g: (M,)``, ``W1a: (ha, d)``,
``b1a, w2a: (ha,)``, ``b2a: ()``, ``pad: (R,)`` (True = padding). Per position::

    n_m   = LayerNorm(x_m) * ln_w[m] + ln_b[m]
    g_m   = sigmoid(w2g[m] . GELU(W1g[m] n_m + b1g[m]) + b2g[m])      (exact erf GELU)
    y_m   = g_m n_m
    s_m   = w2a . tanh(W1a y_m + b1a) + b2a
    alpha = softmax_m(s),   out = sum_m alpha_m y_m                   -> (R, d)

Padded positions read ``x`` as 0 and output ``out = alpha = g = 0``; their incoming
gradients are ignored, so nothing flows back from them.

Forward: one program per block of ``BP`` positions; the M modalities are visited
once with an online softmax (running max / sum / weighted accumulator), the two
hidden layers are ``tl.dot`` tiles (``h, ha <= 128``), LayerNorm statistics in fp32.
Backward, no atomics, deterministic:
1. ``gap_bwd_scores_kernel`` (per position block) recomputes ``s_m`` and
   ``<dout, y_m>`` for every m and writes ``alpha`` and ``ds = alpha (dA - sum alpha dA)``
   with ``dA_m = dalpha_m + <dout, y_m>``, both ``(M, R)`` fp32.
2. ``gap_bwd_kernel`` (grid: programs x M) recomputes modality m's activations and
   back-propagates through the attention MLP, the gate MLP and the LayerNorm,
   writing ``dx`` and accumulating every weight gradient in registers over its
   position blocks; one partial per program, summed afterwards.
fp32 inputs use IEEE ``tl.dot`` (no TF32); fp16 / bf16 inputs compute in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT2PI = 0.3989422804014327


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


@triton.jit
def _modality_forward(
    x_ptr, lnw_ptr, lnb_ptr, W1g_ptr, b1g_ptr, w2g_ptr, b2g_ptr,
    W1a, b1a, w2a, b2a, m, rows, r_ok, pad, offs_d, d_ok, offs_h, h_ok,
    R, D, HG, eps, PRECISION: tl.constexpr,
):
    """All activations of modality ``m`` for a block of positions (BP rows)."""
    tile_ok = r_ok[:, None] & d_ok[None, :]
    x = tl.load(x_ptr + m * R * D + rows[:, None] * D + offs_d[None, :], mask=tile_ok, other=0.0)
    x = tl.where(pad[:, None], 0.0, x.to(tl.float32))
    mu = tl.sum(x, axis=1) / D
    xc = tl.where(d_ok[None, :], x - mu[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    xhat = xc * rstd[:, None]
    lnw = tl.load(lnw_ptr + m * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + m * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    n = xhat * lnw[None, :] + lnb[None, :]
    W1g = tl.load(W1g_ptr + m * HG * D + offs_h[:, None] * D + offs_d[None, :],
                  mask=h_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    b1g = tl.load(b1g_ptr + m * HG + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    w2g = tl.load(w2g_ptr + m * HG + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    b2g = tl.load(b2g_ptr + m).to(tl.float32)
    pre_g = tl.dot(n, tl.trans(W1g), input_precision=PRECISION) + b1g[None, :]
    hid = _gelu(pre_g)
    g = tl.sigmoid(tl.sum(hid * w2g[None, :], axis=1) + b2g)
    y = g[:, None] * n
    t = _tanh(tl.dot(y, tl.trans(W1a), input_precision=PRECISION) + b1a[None, :])
    s = tl.sum(t * w2a[None, :], axis=1) + b2a
    return xhat, rstd, lnw, n, W1g, w2g, pre_g, hid, g, y, t, s


@triton.jit
def _row_block(pad_ptr, blk, R, BP: tl.constexpr, HAS_PAD: tl.constexpr):
    """Positions of row block ``blk``, their bounds mask and padding flags (out of range = padded)."""
    rows = blk * BP + tl.arange(0, BP)
    r_ok = rows < R
    if HAS_PAD:
        pad = tl.load(pad_ptr + rows, mask=r_ok, other=1) != 0
    else:
        pad = rows < 0
    return rows, r_ok, pad


@triton.jit
def _feature_offsets(D, HG, HA, DP: tl.constexpr, HP: tl.constexpr, AP: tl.constexpr):
    """Offsets and bounds masks over the feature (D), gate-hidden (HG) and attention-hidden (HA) axes."""
    offs_d = tl.arange(0, DP)
    offs_h = tl.arange(0, HP)
    offs_a = tl.arange(0, AP)
    return offs_d, offs_d < D, offs_h, offs_h < HG, offs_a, offs_a < HA


@triton.jit
def _load_shared_mlp(W1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, offs_a, a_ok, offs_d, d_ok, D):
    W1a = tl.load(W1a_ptr + offs_a[:, None] * D + offs_d[None, :],
                  mask=a_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    b1a = tl.load(b1a_ptr + offs_a, mask=a_ok, other=0.0).to(tl.float32)
    w2a = tl.load(w2a_ptr + offs_a, mask=a_ok, other=0.0).to(tl.float32)
    b2a = tl.load(b2a_ptr).to(tl.float32)
    return W1a, b1a, w2a, b2a


@triton.jit
def gap_fwd_kernel(
    x_ptr, pad_ptr, lnw_ptr, lnb_ptr, W1g_ptr, b1g_ptr, w2g_ptr, b2g_ptr,
    W1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, out_ptr, alpha_ptr, g_ptr,
    R, D, HG, HA, eps,
    M: tl.constexpr, M_P: tl.constexpr, BP: tl.constexpr, DP: tl.constexpr,
    HP: tl.constexpr, AP: tl.constexpr, HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    rows, r_ok, pad = _row_block(pad_ptr, tl.program_id(0), R, BP, HAS_PAD)
    offs_d, d_ok, offs_h, h_ok, offs_a, a_ok = _feature_offsets(D, HG, HA, DP, HP, AP)
    cols = tl.arange(0, M_P)
    W1a, b1a, w2a, b2a = _load_shared_mlp(W1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, offs_a, a_ok, offs_d, d_ok, D)
    run_max = tl.full((BP,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BP,), dtype=tl.float32)
    acc = tl.zeros((BP, DP), dtype=tl.float32)
    S = tl.zeros((BP, M_P), dtype=tl.float32)
    G = tl.zeros((BP, M_P), dtype=tl.float32)
    for m in tl.static_range(M):
        _, _, _, _, _, _, _, _, g, y, _, s = _modality_forward(
            x_ptr, lnw_ptr, lnb_ptr, W1g_ptr, b1g_ptr, w2g_ptr, b2g_ptr, W1a, b1a, w2a, b2a,
            m, rows, r_ok, pad, offs_d, d_ok, offs_h, h_ok, R, D, HG, eps, PRECISION)
        new_max = tl.maximum(run_max, s)
        scale = tl.exp(run_max - new_max)
        w = tl.exp(s - new_max)
        run_sum = run_sum * scale + w
        acc = acc * scale[:, None] + w[:, None] * y
        run_max = new_max
        S = tl.where(cols[None, :] == m, s[:, None], S)
        G = tl.where(cols[None, :] == m, g[:, None], G)
    out = tl.where(pad[:, None], 0.0, acc / run_sum[:, None])
    alpha = tl.where(cols[None, :] < M, tl.exp(S - run_max[:, None]) / run_sum[:, None], 0.0)
    alpha = tl.where(pad[:, None], 0.0, alpha)
    G = tl.where(pad[:, None], 0.0, G)
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])
    mr_ok = r_ok[:, None] & (cols[None, :] < M)
    tl.store(alpha_ptr + cols[None, :] * R + rows[:, None], alpha.to(alpha_ptr.dtype.element_ty), mask=mr_ok)
    tl.store(g_ptr + cols[None, :] * R + rows[:, None], G.to(g_ptr.dtype.element_ty), mask=mr_ok)


@triton.jit
def gap_bwd_scores_kernel(
    x_ptr, pad_ptr, lnw_ptr, lnb_ptr, W1g_ptr, b1g_ptr, w2g_ptr, b2g_ptr,
    W1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr,
    dout_ptr, s_do_r, s_do_d, dal_ptr, s_da_m, s_da_r,
    alpha_ptr, ds_ptr,
    R, D, HG, HA, eps,
    M: tl.constexpr, M_P: tl.constexpr, BP: tl.constexpr, DP: tl.constexpr,
    HP: tl.constexpr, AP: tl.constexpr, HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    rows, r_ok, pad = _row_block(pad_ptr, tl.program_id(0), R, BP, HAS_PAD)
    offs_d, d_ok, offs_h, h_ok, offs_a, a_ok = _feature_offsets(D, HG, HA, DP, HP, AP)
    cols = tl.arange(0, M_P)
    W1a, b1a, w2a, b2a = _load_shared_mlp(W1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, offs_a, a_ok, offs_d, d_ok, D)
    dout = tl.load(dout_ptr + rows[:, None] * s_do_r + offs_d[None, :] * s_do_d,
                   mask=r_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    S = tl.full((BP, M_P), float("-inf"), dtype=tl.float32)
    P = tl.zeros((BP, M_P), dtype=tl.float32)
    for m in tl.static_range(M):
        _, _, _, _, _, _, _, _, _, y, _, s = _modality_forward(
            x_ptr, lnw_ptr, lnb_ptr, W1g_ptr, b1g_ptr, w2g_ptr, b2g_ptr, W1a, b1a, w2a, b2a,
            m, rows, r_ok, pad, offs_d, d_ok, offs_h, h_ok, R, D, HG, eps, PRECISION)
        S = tl.where(cols[None, :] == m, s[:, None], S)
        P = tl.where(cols[None, :] == m, tl.sum(dout * y, axis=1)[:, None], P)
    mr_ok = r_ok[:, None] & (cols[None, :] < M)
    e = tl.exp(S - tl.max(S, axis=1)[:, None])
    alpha = e / tl.sum(e, axis=1)[:, None]
    dA = tl.load(dal_ptr + cols[None, :] * s_da_m + rows[:, None] * s_da_r, mask=mr_ok, other=0.0).to(tl.float32)
    dA = dA + P
    ds = alpha * (dA - tl.sum(alpha * dA, axis=1)[:, None])
    ds = tl.where(pad[:, None], 0.0, ds)
    tl.store(alpha_ptr + cols[None, :] * R + rows[:, None], alpha, mask=mr_ok)
    tl.store(ds_ptr + cols[None, :] * R + rows[:, None], ds, mask=mr_ok)


@triton.jit
def gap_bwd_kernel(
    x_ptr, pad_ptr, lnw_ptr, lnb_ptr, W1g_ptr, b1g_ptr, w2g_ptr, b2g_ptr,
    W1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr,
    dout_ptr, s_do_r, s_do_d, dg_ptr, s_dg_m, s_dg_r, alpha_ptr, ds_ptr,
    dx_ptr, p_lnw, p_lnb, p_W1g, p_b1g, p_w2g, p_b2g, p_W1a, p_b1a, p_w2a, p_b2a,
    R, D, HG, HA, eps, n_blocks,
    BP: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr, AP: tl.constexpr,
    HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    m = tl.program_id(1)
    M = tl.num_programs(1)
    offs_d, d_ok, offs_h, h_ok, offs_a, a_ok = _feature_offsets(D, HG, HA, DP, HP, AP)
    W1a, b1a, w2a, b2a = _load_shared_mlp(W1a_ptr, b1a_ptr, w2a_ptr, b2a_ptr, offs_a, a_ok, offs_d, d_ok, D)
    acc_lnw = tl.zeros((DP,), dtype=tl.float32)
    acc_lnb = tl.zeros((DP,), dtype=tl.float32)
    acc_W1g = tl.zeros((HP, DP), dtype=tl.float32)
    acc_b1g = tl.zeros((HP,), dtype=tl.float32)
    acc_w2g = tl.zeros((HP,), dtype=tl.float32)
    acc_b2g = tl.zeros((BP,), dtype=tl.float32)
    acc_W1a = tl.zeros((AP, DP), dtype=tl.float32)
    acc_b1a = tl.zeros((AP,), dtype=tl.float32)
    acc_w2a = tl.zeros((AP,), dtype=tl.float32)
    acc_b2a = tl.zeros((BP,), dtype=tl.float32)
    for blk in range(pid, n_blocks, nprog):
        rows, r_ok, pad = _row_block(pad_ptr, blk, R, BP, HAS_PAD)
        keep = r_ok & (pad == 0)
        xhat, rstd, lnw, n, W1g, w2g, pre_g, hid, g, y, t, _ = _modality_forward(
            x_ptr, lnw_ptr, lnb_ptr, W1g_ptr, b1g_ptr, w2g_ptr, b2g_ptr, W1a, b1a, w2a, b2a,
            m, rows, r_ok, pad, offs_d, d_ok, offs_h, h_ok, R, D, HG, eps, PRECISION)
        dout = tl.load(dout_ptr + rows[:, None] * s_do_r + offs_d[None, :] * s_do_d,
                       mask=keep[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        dg = tl.load(dg_ptr + m * s_dg_m + rows * s_dg_r, mask=keep, other=0.0).to(tl.float32)
        alpha = tl.load(alpha_ptr + m * R + rows, mask=keep, other=0.0)
        ds = tl.load(ds_ptr + m * R + rows, mask=keep, other=0.0)
        # shared attention MLP: s = w2a . tanh(W1a y + b1a) + b2a
        dpre_a = ds[:, None] * w2a[None, :] * (1.0 - t * t)
        dy = alpha[:, None] * dout + tl.dot(dpre_a, W1a, input_precision=PRECISION)
        acc_W1a += tl.dot(tl.trans(dpre_a), y, input_precision=PRECISION)
        acc_b1a += tl.sum(dpre_a, axis=0)
        acc_w2a += tl.sum(ds[:, None] * t, axis=0)
        acc_b2a += ds
        # gate: y = g n, g = sigmoid(w2g . GELU(W1g n + b1g) + b2g)
        du = (dg + tl.sum(dy * n, axis=1)) * g * (1.0 - g)
        dpre_g = du[:, None] * w2g[None, :] * _gelu_grad(pre_g)
        dn = g[:, None] * dy + tl.dot(dpre_g, W1g, input_precision=PRECISION)
        acc_w2g += tl.sum(du[:, None] * hid, axis=0)
        acc_b2g += du
        acc_W1g += tl.dot(tl.trans(dpre_g), n, input_precision=PRECISION)
        acc_b1g += tl.sum(dpre_g, axis=0)
        # LayerNorm with affine
        acc_lnw += tl.sum(dn * xhat, axis=0)
        acc_lnb += tl.sum(dn, axis=0)
        dxhat = tl.where(d_ok[None, :], dn * lnw[None, :], 0.0)
        c1 = tl.sum(dxhat, axis=1) / D
        c2 = tl.sum(dxhat * xhat, axis=1) / D
        dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])
        dx = tl.where(keep[:, None], dx, 0.0)
        tl.store(dx_ptr + m * R * D + rows[:, None] * D + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & d_ok[None, :])
    slot = pid * M + m
    hd = offs_h[:, None] * D + offs_d[None, :]
    ad = offs_a[:, None] * D + offs_d[None, :]
    tl.store(p_lnw + slot * D + offs_d, acc_lnw, mask=d_ok)
    tl.store(p_lnb + slot * D + offs_d, acc_lnb, mask=d_ok)
    tl.store(p_W1g + slot * HG * D + hd, acc_W1g, mask=h_ok[:, None] & d_ok[None, :])
    tl.store(p_b1g + slot * HG + offs_h, acc_b1g, mask=h_ok)
    tl.store(p_w2g + slot * HG + offs_h, acc_w2g, mask=h_ok)
    tl.store(p_b2g + slot, tl.sum(acc_b2g, axis=0))
    tl.store(p_W1a + slot * HA * D + ad, acc_W1a, mask=a_ok[:, None] & d_ok[None, :])
    tl.store(p_b1a + slot * HA + offs_a, acc_b1a, mask=a_ok)
    tl.store(p_w2a + slot * HA + offs_a, acc_w2a, mask=a_ok)
    tl.store(p_b2a + slot, tl.sum(acc_b2a, axis=0))


def _config(x: torch.Tensor, D: int, HG: int, HA: int) -> dict:
    return dict(
        BP=32,
        DP=max(16, triton.next_power_of_2(D)),
        HP=max(16, triton.next_power_of_2(HG)),
        AP=max(16, triton.next_power_of_2(HA)),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )


def _prepare(x, mask, weights):
    M, B, L, D = x.shape
    R = B * L
    x2 = x.reshape(M, R, D).contiguous()
    pad = mask.reshape(R).to(torch.uint8).contiguous() if mask is not None else x2
    weights = [w.contiguous() for w in weights]
    HG, HA = weights[2].shape[1], weights[6].shape[0]
    return x2, pad, weights, (M, B, L, D, R, HG, HA)


def gap_forward(x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a, mask, eps):
    """Returns ``(out (B, L, d), alpha (M, B, L), g (M, B, L))`` in ``x``'s dtype."""
    x2, pad, ws, (M, B, L, D, R, HG, HA) = _prepare(x, mask, (ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a))
    out = x.new_empty((R, D))
    alpha = x.new_empty((M, R))
    g = x.new_empty((M, R))
    if R:
        cfg = _config(x, D, HG, HA)
        gap_fwd_kernel[(triton.cdiv(R, cfg["BP"]),)](
            x2, pad, *ws, out, alpha, g, R, D, HG, HA, float(eps),
            M=M, M_P=max(2, triton.next_power_of_2(M)), HAS_PAD=mask is not None, **cfg)
    return out.view(B, L, D), alpha.view(M, B, L), g.view(M, B, L)


def gap_backward(dout, dalpha, dg, x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a, mask, eps,
                 max_programs: int | None = None):
    """Returns the gradients of ``(x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a)``.

    ``dout: (B, L, d)``, ``dalpha, dg: (M, B, L)`` may be ``None`` or arbitrarily strided.
    """
    x2, pad, ws, (M, B, L, D, R, HG, HA) = _prepare(x, mask, (ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a))
    dev = x.device

    def grad2d(t, shape):
        if t is None:
            return torch.zeros((), dtype=x.dtype, device=dev).expand(shape)
        return t.reshape(shape)

    dout2, dal2, dg2 = grad2d(dout, (R, D)), grad2d(dalpha, (M, R)), grad2d(dg, (M, R))
    cfg = _config(x, D, HG, HA)
    n_blocks = triton.cdiv(R, cfg["BP"])
    if max_programs is None:
        max_programs = 4 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    nprog = max(1, min(n_blocks, max_programs))
    f32 = dict(dtype=torch.float32, device=dev)
    alpha = torch.empty((M, R), **f32)
    ds = torch.empty((M, R), **f32)
    dx = torch.zeros_like(x2)
    parts = [torch.zeros((nprog, M, *shape), **f32)
             for shape in ((D,), (D,), (HG, D), (HG,), (HG,), (), (HA, D), (HA,), (HA,), ())]
    if R:
        common = dict(HAS_PAD=mask is not None, **cfg)
        gap_bwd_scores_kernel[(n_blocks,)](
            x2, pad, *ws, dout2, dout2.stride(0), dout2.stride(1), dal2, dal2.stride(0), dal2.stride(1),
            alpha, ds, R, D, HG, HA, float(eps), M=M, M_P=max(2, triton.next_power_of_2(M)), **common)
        gap_bwd_kernel[(nprog, M)](
            x2, pad, *ws, dout2, dout2.stride(0), dout2.stride(1), dg2, dg2.stride(0), dg2.stride(1),
            alpha, ds, dx, *parts, R, D, HG, HA, float(eps), n_blocks, **common)
    # per-modality weights: sum over programs; shared attention MLP: over programs and modalities
    d_lnw, d_lnb, d_W1g, d_b1g, d_w2g, d_b2g = (p.sum(0) for p in parts[:6])
    d_W1a, d_b1a, d_w2a, d_b2a = (p.sum((0, 1)) for p in parts[6:])
    grads = (dx.view(x.shape), d_lnw, d_lnb, d_W1g, d_b1g, d_w2g, d_b2g, d_W1a, d_b1a, d_w2a, d_b2a)
    return tuple(gr.to(w.dtype) for gr, w in zip(grads, (x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a)))
