"""Triton kernels of the AGFN dual gate (contract §3.1), forward and backward in one pass each.

Shapes (rows flattened): ``h: (R, M, D)``, ``u: (R, M, C)``, ``w_z: (M, D)``,
``b_z: (M,)``, ``g_logits: (R, M)``. Per row ``r`` and modality ``m``::

    logq_m = log_softmax(u_m)                       (over C)
    H_m    = -sum_C exp(logq_m) logq_m / log C       (normalised entropy; C = 1: 0)
    z_m    = <h_m, w_z[m]> + b_z[m]
    e      = softmax_m(z_m - H_m / tau)
    h_ent  = sum_m e_m h_m                           -> (R, D)
    g      = sigmoid(g_logits)
    h_imp_in[m] = g_m h_m                            -> (R, M*D)

Numerics: every row is loaded once as an ``(M_P, D_P)`` tile of ``h`` and an
``(M_P, C_P)`` tile of ``u`` (M, D, C padded to powers of two, masked) and reduced in
fp32 whatever the storage dtype; the outputs (``e``, ``g``, ``H`` too) are stored in
the input dtype. ``1 / log C`` comes from the host as ``inv_log_c`` (0 for C = 1, so
that a single class has entropy 0 and no gradient). The backward recomputes the cheap
row statistics (log-softmax, entropy, gate) from ``h`` and ``u`` instead of saving
them, so the forward writes nothing but its outputs, and uses
``dH/du_j = -q_j (log q_j + H log C) / log C``. Weight gradients (``w_z``, ``b_z``)
are accumulated in registers over ``ROWS`` rows per program and written as one
partial per program, summed afterwards: no atomics, deterministic. Incoming
gradients are read through their strides (``out.sum().backward()`` hands stride-0
tensors).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from msa_fast.kernels.triton._common import on_tensor_device, pid64


@triton.jit
def _row_stats(h, u, w, bz, m_ok, c_ok, tau, inv_log_c):
    """log-softmax of ``u``, its normalised entropy, the relevance logit and the gate
    weights of one row (``h``: (M_P, D_P), ``u``: (M_P, C_P) tiles)."""
    neg_inf = float("-inf")
    um = tl.where(c_ok[None, :], u, neg_inf)
    mx = tl.max(um, axis=1)  # padded modality rows hold u = 0: finite, masked out of e below
    ex = tl.where(c_ok[None, :], tl.exp(um - mx[:, None]), 0.0)
    lse = mx + tl.log(tl.sum(ex, axis=1))
    logq = tl.where(c_ok[None, :], u - lse[:, None], 0.0)
    q = tl.exp(logq) * c_ok[None, :]
    ent = -tl.sum(q * logq, axis=1) * inv_log_c
    z = tl.sum(h * w, axis=1) + bz
    s = tl.where(m_ok, z - ent / tau, neg_inf)
    s = s - tl.max(s, axis=0)
    es = tl.where(m_ok, tl.exp(s), 0.0)
    e = es / tl.sum(es, axis=0)
    return logq, q, ent, e


@triton.jit
def _gate_weights(wz_ptr, bz_ptr, M, D, C, M_P: tl.constexpr, D_P: tl.constexpr, C_P: tl.constexpr):
    """Index tiles of one row and the gate weights ``w_z``, ``b_z`` in fp32, loaded once
    per program and shared by all its rows."""
    offs_m = tl.arange(0, M_P)
    offs_d = tl.arange(0, D_P)
    offs_c = tl.arange(0, C_P)
    m_ok = offs_m < M
    d_ok = offs_d < D
    c_ok = offs_c < C
    tile_ok = m_ok[:, None] & d_ok[None, :]
    tile = offs_m[:, None] * D + offs_d[None, :]
    utile_ok = m_ok[:, None] & c_ok[None, :]
    utile = offs_m[:, None] * C + offs_c[None, :]
    w = tl.load(wz_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
    bz = tl.load(bz_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    return offs_m, offs_d, m_ok, d_ok, c_ok, tile, tile_ok, utile, utile_ok, w, bz


@triton.jit
def dual_gate_fwd_kernel(
    h_ptr, u_ptr, wz_ptr, bz_ptr, gl_ptr,
    hent_ptr, himp_ptr, e_ptr, g_ptr, ent_ptr,
    R, M, D, C, tau, inv_log_c,
    ROWS: tl.constexpr, M_P: tl.constexpr, D_P: tl.constexpr, C_P: tl.constexpr,
):
    pid = pid64(0)
    offs_m, offs_d, m_ok, d_ok, c_ok, tile, tile_ok, utile, utile_ok, w, bz = _gate_weights(
        wz_ptr, bz_ptr, M, D, C, M_P, D_P, C_P)
    for i in range(ROWS):
        r = pid * ROWS + i
        if r < R:
            h = tl.load(h_ptr + r * M * D + tile, mask=tile_ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + r * M * C + utile, mask=utile_ok, other=0.0).to(tl.float32)
            _, _, ent, e = _row_stats(h, u, w, bz, m_ok, c_ok, tau, inv_log_c)
            gl = tl.load(gl_ptr + r * M + offs_m, mask=m_ok, other=0.0).to(tl.float32)
            g = tl.sigmoid(gl)
            hent = tl.sum(e[:, None] * h, axis=0)
            out_ty = hent_ptr.dtype.element_ty
            tl.store(hent_ptr + r * D + offs_d, hent.to(out_ty), mask=d_ok)
            tl.store(himp_ptr + r * M * D + tile, (g[:, None] * h).to(out_ty), mask=tile_ok)
            tl.store(e_ptr + r * M + offs_m, e.to(out_ty), mask=m_ok)
            tl.store(g_ptr + r * M + offs_m, g.to(out_ty), mask=m_ok)
            tl.store(ent_ptr + r * M + offs_m, ent.to(out_ty), mask=m_ok)


@triton.jit
def dual_gate_bwd_kernel(
    h_ptr, u_ptr, wz_ptr, bz_ptr, gl_ptr,
    dhent_ptr, s_dhent_r, s_dhent_d,
    dhimp_ptr, s_dhimp_r, s_dhimp_c,
    de_ptr, s_de_r, s_de_m,
    dg_ptr, s_dg_r, s_dg_m,
    dent_ptr, s_dent_r, s_dent_m,
    dh_ptr, du_ptr, dgl_ptr, dwz_part_ptr, dbz_part_ptr,
    R, M, D, C, tau, inv_log_c,
    ROWS: tl.constexpr, M_P: tl.constexpr, D_P: tl.constexpr, C_P: tl.constexpr,
):
    pid = pid64(0)
    offs_m, offs_d, m_ok, d_ok, c_ok, tile, tile_ok, utile, utile_ok, w, bz = _gate_weights(
        wz_ptr, bz_ptr, M, D, C, M_P, D_P, C_P)
    dw_acc = tl.zeros((M_P, D_P), dtype=tl.float32)
    db_acc = tl.zeros((M_P,), dtype=tl.float32)
    for i in range(ROWS):
        r = pid * ROWS + i
        if r < R:
            h = tl.load(h_ptr + r * M * D + tile, mask=tile_ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + r * M * C + utile, mask=utile_ok, other=0.0).to(tl.float32)
            logq, q, ent, e = _row_stats(h, u, w, bz, m_ok, c_ok, tau, inv_log_c)
            g = tl.sigmoid(tl.load(gl_ptr + r * M + offs_m, mask=m_ok, other=0.0).to(tl.float32))
            dhent = tl.load(dhent_ptr + r * s_dhent_r + offs_d * s_dhent_d, mask=d_ok, other=0.0).to(tl.float32)
            dhimp = tl.load(dhimp_ptr + r * s_dhimp_r + tile * s_dhimp_c, mask=tile_ok, other=0.0).to(tl.float32)
            de = tl.load(de_ptr + r * s_de_r + offs_m * s_de_m, mask=m_ok, other=0.0).to(tl.float32)
            dg = tl.load(dg_ptr + r * s_dg_r + offs_m * s_dg_m, mask=m_ok, other=0.0).to(tl.float32)
            dent = tl.load(dent_ptr + r * s_dent_r + offs_m * s_dent_m, mask=m_ok, other=0.0).to(tl.float32)
            # importance gate: h_imp_in[m] = g_m h_m
            dg_tot = dg + tl.sum(dhimp * h, axis=1)
            tl.store(dgl_ptr + r * M + offs_m, (dg_tot * g * (1.0 - g)).to(dgl_ptr.dtype.element_ty), mask=m_ok)
            # entropy gate: e = softmax(s), s = z - H / tau
            de_tot = de + tl.sum(h * dhent[None, :], axis=1)
            ds = e * (de_tot - tl.sum(e * de_tot, axis=0))
            ds = tl.where(m_ok, ds, 0.0)
            dh = g[:, None] * dhimp + e[:, None] * dhent[None, :] + ds[:, None] * w
            dw_acc += ds[:, None] * h
            db_acc += ds
            tl.store(dh_ptr + r * M * D + tile, dh.to(dh_ptr.dtype.element_ty), mask=tile_ok)
            # H = -inv_log_c sum q logq: dH/du_j = -inv_log_c q_j (logq_j + H / inv_log_c)
            dent_tot = (dent - ds / tau) * inv_log_c
            du = -dent_tot[:, None] * q * (logq + tl.sum(-q * logq, axis=1)[:, None])
            tl.store(du_ptr + r * M * C + utile, du.to(du_ptr.dtype.element_ty), mask=utile_ok)
    tl.store(dwz_part_ptr + pid * M * D + tile, dw_acc, mask=tile_ok)
    tl.store(dbz_part_ptr + pid * M + offs_m, db_acc, mask=m_ok)


def _num_warps(m_p: int, d_p: int, c_p: int, backward: bool = False) -> int:
    # 8 warps once a row's tiles pass 2048 elements: at D = 768 the 16-bit backward
    # spills with 4; the backward, which also holds u's tile and the weight-gradient
    # accumulator, takes 16 from 4096 elements (at D = 768 and ROWS = 4 it spills with 8;
    # compile gate)
    tile = m_p * max(d_p, c_p)
    if backward and tile >= 4096:
        return 16
    return 8 if tile > 2048 else 4


def _launch_shape(R: int, M: int, D: int, C: int) -> tuple[int, int, int, int, int]:
    m_p = triton.next_power_of_2(M)
    d_p = triton.next_power_of_2(D)
    c_p = triton.next_power_of_2(C)
    # Enough rows per program to amortise the weight-gradient partial, few enough
    # that the grid still fills an H100 (132 SMs x several programs).
    rows = 1 if R <= 2048 else 4 if R <= 16384 else 16
    return rows, m_p, d_p, c_p, triton.cdiv(R, rows)


def _inv_log_c(C: int) -> float:
    return 1.0 / math.log(C) if C > 1 else 0.0


@on_tensor_device
def dual_gate_forward(h: torch.Tensor, u: torch.Tensor, w_z: torch.Tensor, b_z: torch.Tensor,
                      g_logits: torch.Tensor, tau: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward on ``h: (..., M, D)``, ``u: (..., M, C)``; returns
    ``(h_ent, h_imp_in, e, g, H)``."""
    *lead, M, D = h.shape
    C = u.shape[-1]
    h2 = h.reshape(-1, M, D).contiguous()
    R = h2.shape[0]
    u2 = u.reshape(R, M, C).contiguous()
    h_ent = h.new_empty((R, D))
    h_imp = h.new_empty((R, M * D))
    e = h.new_empty((R, M))
    g = h.new_empty((R, M))
    ent = h.new_empty((R, M))
    if R:
        rows, m_p, d_p, c_p, grid = _launch_shape(R, M, D, C)
        dual_gate_fwd_kernel[(grid,)](
            h2, u2, w_z.contiguous(), b_z.contiguous(), g_logits.reshape(R, M).contiguous(),
            h_ent, h_imp, e, g, ent, R, M, D, C, float(tau), _inv_log_c(C),
            ROWS=rows, M_P=m_p, D_P=d_p, C_P=c_p, num_warps=_num_warps(m_p, d_p, c_p))
    return (h_ent.view(*lead, D), h_imp.view(*lead, M * D), e.view(*lead, M), g.view(*lead, M),
            ent.view(*lead, M))


@on_tensor_device
def dual_gate_backward(h, u, w_z, b_z, g_logits, tau, d_hent, d_himp, d_e, d_g, d_ent):
    """Launch the fused backward; returns ``(dh, du, dw_z, db_z, dg_logits)``.

    Incoming gradients may be ``None`` (unused output) or arbitrarily strided.
    """
    *lead, M, D = h.shape
    C = u.shape[-1]
    h2 = h.reshape(-1, M, D).contiguous()
    R = h2.shape[0]
    u2 = u.reshape(R, M, C).contiguous()

    def grad2d(t, cols):
        if t is None:
            return torch.zeros((), dtype=h.dtype, device=h.device).expand(R, cols)
        return t.reshape(R, cols) if t.dim() != 2 else t

    dhent, dhimp, de, dg, dent = (grad2d(d_hent, D), grad2d(d_himp, M * D), grad2d(d_e, M), grad2d(d_g, M),
                                  grad2d(d_ent, M))
    dh = torch.empty_like(h2)
    du = torch.empty_like(u2)
    dgl = torch.empty((R, M), dtype=g_logits.dtype, device=h.device)
    rows, m_p, d_p, c_p, grid = _launch_shape(R, M, D, C)
    dw_part = torch.zeros((max(grid, 1), M, D), dtype=torch.float32, device=h.device)
    db_part = torch.zeros((max(grid, 1), M), dtype=torch.float32, device=h.device)
    if R:
        dual_gate_bwd_kernel[(grid,)](
            h2, u2, w_z.contiguous(), b_z.contiguous(), g_logits.reshape(R, M).contiguous(),
            dhent, dhent.stride(0), dhent.stride(1),
            dhimp, dhimp.stride(0), dhimp.stride(1),
            de, de.stride(0), de.stride(1),
            dg, dg.stride(0), dg.stride(1),
            dent, dent.stride(0), dent.stride(1),
            dh, du, dgl, dw_part, db_part, R, M, D, C, float(tau), _inv_log_c(C),
            ROWS=rows, M_P=m_p, D_P=d_p, C_P=c_p, num_warps=_num_warps(m_p, d_p, c_p, backward=True))
    return (dh.view(h.shape), du.view(u.shape), dw_part.sum(0).to(w_z.dtype), db_part.sum(0).to(b_z.dtype),
            dgl.view(g_logits.shape))
