"""Triton kernels of the AGFN dual gate (SPEC 3.1), forward and backward in one pass each.

Shapes (rows flattened): ``h: (R, M, D)``, ``w_z: (M, D)``, ``b_z: (M,)``,
``g_logits: (R, M)``. Per row ``r`` and modality ``m``::

    logp_m = log_softmax(h_m)            (over D)
    H_m    = -sum_D exp(logp_m) logp_m    (entropy, natural log)
    z_m    = <h_m, w_z[m]> + b_z[m]
    e      = softmax_m(z_m * exp(-H_m / tau))
    h_ent  = sum_m e_m h_m                -> (R, D)
    g      = sigmoid(g_logits)
    h_imp_in[m] = g_m h_m                 -> (R, M*D)

Numerics: every row is loaded once as an ``(M_P, D_P)`` tile (M and D padded to
powers of two, masked) and reduced in fp32 whatever the storage dtype; the
outputs are stored in the input dtype (``e`` and ``g`` too). The backward
recomputes the cheap row statistics (log-softmax, entropy, gate) from ``h``
instead of saving them, so the forward writes nothing but its outputs, and uses
``dH/dh_j = -p_j (log p_j + H)``. Weight gradients (``w_z``, ``b_z``) are
accumulated in registers over ``ROWS`` rows per program and written as one
partial per program, summed afterwards: no atomics, deterministic.
Incoming gradients are read through their strides (``out.sum().backward()``
hands stride-0 tensors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_stats(h, w, bz, m_ok, d_ok, tau):
    """log-softmax, entropy, gate logits and gate weights of one (M_P, D_P) row tile."""
    neg_inf = float("-inf")
    hm = tl.where(d_ok[None, :], h, neg_inf)
    mx = tl.max(hm, axis=1)
    ex = tl.where(d_ok[None, :], tl.exp(hm - mx[:, None]), 0.0)
    lse = mx + tl.log(tl.sum(ex, axis=1))
    logp = tl.where(d_ok[None, :], h - lse[:, None], 0.0)
    p = tl.exp(logp) * d_ok[None, :]
    ent = -tl.sum(p * logp, axis=1)
    z = tl.sum(h * w, axis=1) + bz
    c = tl.exp(-ent / tau)
    s = tl.where(m_ok, z * c, neg_inf)
    s = s - tl.max(s, axis=0)
    es = tl.where(m_ok, tl.exp(s), 0.0)
    e = es / tl.sum(es, axis=0)
    return logp, p, ent, z, c, e


@triton.jit
def _gate_weights(wz_ptr, bz_ptr, M, D, M_P: tl.constexpr, D_P: tl.constexpr):
    """Index tiles of one (M_P, D_P) row and the gate weights ``w_z``, ``b_z`` in fp32,
    loaded once per program and shared by all its rows."""
    offs_m = tl.arange(0, M_P)
    offs_d = tl.arange(0, D_P)
    m_ok = offs_m < M
    d_ok = offs_d < D
    tile_ok = m_ok[:, None] & d_ok[None, :]
    tile = offs_m[:, None] * D + offs_d[None, :]
    w = tl.load(wz_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
    bz = tl.load(bz_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    return offs_m, offs_d, m_ok, d_ok, tile, tile_ok, w, bz


@triton.jit
def dual_gate_fwd_kernel(
    h_ptr, wz_ptr, bz_ptr, gl_ptr,
    hent_ptr, himp_ptr, e_ptr, g_ptr,
    R, M, D, tau,
    ROWS: tl.constexpr, M_P: tl.constexpr, D_P: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m, offs_d, m_ok, d_ok, tile, tile_ok, w, bz = _gate_weights(wz_ptr, bz_ptr, M, D, M_P, D_P)
    for i in range(ROWS):
        r = pid * ROWS + i
        if r < R:
            h = tl.load(h_ptr + r * M * D + tile, mask=tile_ok, other=0.0).to(tl.float32)
            _, _, _, _, _, e = _row_stats(h, w, bz, m_ok, d_ok, tau)
            gl = tl.load(gl_ptr + r * M + offs_m, mask=m_ok, other=0.0).to(tl.float32)
            g = tl.sigmoid(gl)
            hent = tl.sum(e[:, None] * h, axis=0)
            out_ty = hent_ptr.dtype.element_ty
            tl.store(hent_ptr + r * D + offs_d, hent.to(out_ty), mask=d_ok)
            tl.store(himp_ptr + r * M * D + tile, (g[:, None] * h).to(out_ty), mask=tile_ok)
            tl.store(e_ptr + r * M + offs_m, e.to(out_ty), mask=m_ok)
            tl.store(g_ptr + r * M + offs_m, g.to(out_ty), mask=m_ok)


@triton.jit
def dual_gate_bwd_kernel(
    h_ptr, wz_ptr, bz_ptr, gl_ptr,
    dhent_ptr, s_dhent_r, s_dhent_d,
    dhimp_ptr, s_dhimp_r, s_dhimp_c,
    de_ptr, s_de_r, s_de_m,
    dg_ptr, s_dg_r, s_dg_m,
    dh_ptr, dgl_ptr, dwz_part_ptr, dbz_part_ptr,
    R, M, D, tau,
    ROWS: tl.constexpr, M_P: tl.constexpr, D_P: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m, offs_d, m_ok, d_ok, tile, tile_ok, w, bz = _gate_weights(wz_ptr, bz_ptr, M, D, M_P, D_P)
    dw_acc = tl.zeros((M_P, D_P), dtype=tl.float32)
    db_acc = tl.zeros((M_P,), dtype=tl.float32)
    for i in range(ROWS):
        r = pid * ROWS + i
        if r < R:
            h = tl.load(h_ptr + r * M * D + tile, mask=tile_ok, other=0.0).to(tl.float32)
            logp, p, ent, z, c, e = _row_stats(h, w, bz, m_ok, d_ok, tau)
            g = tl.sigmoid(tl.load(gl_ptr + r * M + offs_m, mask=m_ok, other=0.0).to(tl.float32))
            dhent = tl.load(dhent_ptr + r * s_dhent_r + offs_d * s_dhent_d, mask=d_ok, other=0.0).to(tl.float32)
            dhimp = tl.load(dhimp_ptr + r * s_dhimp_r + tile * s_dhimp_c, mask=tile_ok, other=0.0).to(tl.float32)
            de = tl.load(de_ptr + r * s_de_r + offs_m * s_de_m, mask=m_ok, other=0.0).to(tl.float32)
            dg = tl.load(dg_ptr + r * s_dg_r + offs_m * s_dg_m, mask=m_ok, other=0.0).to(tl.float32)
            # importance gate: h_imp_in[m] = g_m h_m
            dg_tot = dg + tl.sum(dhimp * h, axis=1)
            tl.store(dgl_ptr + r * M + offs_m, (dg_tot * g * (1.0 - g)).to(dgl_ptr.dtype.element_ty), mask=m_ok)
            dh = g[:, None] * dhimp + e[:, None] * dhent[None, :]
            # entropy gate: e = softmax(s), s = z c, c = exp(-H / tau)
            de_tot = de + tl.sum(h * dhent[None, :], axis=1)
            ds = e * (de_tot - tl.sum(e * de_tot, axis=0))
            ds = tl.where(m_ok, ds, 0.0)
            dz = ds * c
            dent = -ds * z * c / tau
            dh += dz[:, None] * w - dent[:, None] * p * (logp + ent[:, None])
            dw_acc += dz[:, None] * h
            db_acc += dz
            tl.store(dh_ptr + r * M * D + tile, dh.to(dh_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dwz_part_ptr + pid * M * D + tile, dw_acc, mask=tile_ok)
    tl.store(dbz_part_ptr + pid * M + offs_m, db_acc, mask=m_ok)


def _num_warps(m_p: int, d_p: int) -> int:
    # 8 warps once a row's (M_P, D_P) tile passes 2048 elements: at D = 768 the
    # 16-bit backward spills with 4 (compile gate)
    return 8 if m_p * d_p > 2048 else 4


def _launch_shape(R: int, M: int, D: int) -> tuple[int, int, int, int]:
    m_p = triton.next_power_of_2(M)
    d_p = triton.next_power_of_2(D)
    # Enough rows per program to amortise the weight-gradient partial, few enough
    # that the grid still fills an H100 (132 SMs x several programs).
    rows = 1 if R <= 2048 else 4 if R <= 16384 else 16
    return rows, m_p, d_p, triton.cdiv(R, rows)


def dual_gate_forward(h: torch.Tensor, w_z: torch.Tensor, b_z: torch.Tensor, g_logits: torch.Tensor,
                      tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on ``h: (..., M, D)``; returns ``(h_ent, h_imp_in, e, g)``."""
    *lead, M, D = h.shape
    h2 = h.reshape(-1, M, D).contiguous()
    R = h2.shape[0]
    h_ent = h.new_empty((R, D))
    h_imp = h.new_empty((R, M * D))
    e = h.new_empty((R, M))
    g = h.new_empty((R, M))
    if R:
        rows, m_p, d_p, grid = _launch_shape(R, M, D)
        dual_gate_fwd_kernel[(grid,)](
            h2, w_z.contiguous(), b_z.contiguous(), g_logits.reshape(R, M).contiguous(),
            h_ent, h_imp, e, g, R, M, D, float(tau), ROWS=rows, M_P=m_p, D_P=d_p, num_warps=_num_warps(m_p, d_p))
    return (h_ent.view(*lead, D), h_imp.view(*lead, M * D), e.view(*lead, M), g.view(*lead, M))


def dual_gate_backward(h, w_z, b_z, g_logits, tau, d_hent, d_himp, d_e, d_g):
    """Launch the fused backward; returns ``(dh, dw_z, db_z, dg_logits)``.

    Incoming gradients may be ``None`` (unused output) or arbitrarily strided.
    """
    *lead, M, D = h.shape
    h2 = h.reshape(-1, M, D).contiguous()
    R = h2.shape[0]

    def grad2d(t, cols):
        if t is None:
            return torch.zeros((), dtype=h.dtype, device=h.device).expand(R, cols)
        return t.reshape(R, cols) if t.dim() != 2 else t

    dhent, dhimp, de, dg = grad2d(d_hent, D), grad2d(d_himp, M * D), grad2d(d_e, M), grad2d(d_g, M)
    dh = torch.empty_like(h2)
    dgl = torch.empty((R, M), dtype=g_logits.dtype, device=h.device)
    rows, m_p, d_p, grid = _launch_shape(R, M, D)
    dw_part = torch.zeros((max(grid, 1), M, D), dtype=torch.float32, device=h.device)
    db_part = torch.zeros((max(grid, 1), M), dtype=torch.float32, device=h.device)
    if R:
        dual_gate_bwd_kernel[(grid,)](
            h2, w_z.contiguous(), b_z.contiguous(), g_logits.reshape(R, M).contiguous(),
            dhent, dhent.stride(0), dhent.stride(1),
            dhimp, dhimp.stride(0), dhimp.stride(1),
            de, de.stride(0), de.stride(1),
            dg, dg.stride(0), dg.stride(1),
            dh, dgl, dw_part, db_part, R, M, D, float(tau), ROWS=rows, M_P=m_p, D_P=d_p, num_warps=_num_warps(m_p, d_p))
    return (dh.view(h.shape), dw_part.sum(0).to(w_z.dtype), db_part.sum(0).to(b_z.dtype),
            dgl.view(g_logits.shape))
