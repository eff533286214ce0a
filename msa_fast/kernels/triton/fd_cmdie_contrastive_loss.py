"""Triton kernels of the FD-CMDIE contrastive losses (eq. 9-12, contract §3.4), forward and backward.
with the hinge's gradient taken as ``h > 0`` (torch.relu's convention at 0).

``fd_cmdie`` -- ``s, d (B, 3, D)``, ``ps (B, Kp, 2, 3, D)``, ``ns (B, Kn, 3, D)``,
``pm (B, Kp)``, ``nm (B, Kn)``; per sample i, the anchor groups of
:func:`msa_fast.ops.reference.fd_cmdie_contrastive_loss`::

    G1  T_s^i  -> {V_s^i, A_s^i, T_s^j (pos) ; T_d^i, A_d^i, V_d^i, T_s^k (neg)}
    G2  A_s^i  -> {A_s^j (pos) ; A_s^k (neg)}
    G3  V_s^i  -> {V_s^j (pos) ; V_s^k (neg)}
    G4j T_s^j  -> {V_s^j, A_s^j (pos) ; T_d^j, A_d^j, V_d^j (neg)}     (valid j)
    l_g = n_pos * lse_g - sum_{pos} z          (= sum_pos (lse_g - z_pos))
    tri = sum_{p in V_s, A_s} sum_{n in T_d, A_d, V_d} max(0, (1-c(T_s,p)) - (1-c(T_s,n)) + margin)
    loss_i = l_G1 + l_G2 + l_G3 + sum_j l_G4j + lambda_tri * tri

G1-G3 span the partner loops, so their log-sum-exps are online (running max and
sum; a group with no valid candidate so far keeps the finite sentinel
``-1e30`` as its max, so ``exp(-inf - -inf)`` never appears, and its final
``lse`` is written as 0 -- it has no positive either, so it adds 0 and gets 0
gradient). G4j is complete inside one partner block. The forward saves
``aux (B, 4) = [lse_G1, lse_G2, lse_G3, #valid positive partners]``; the backward
is one pass over the partner blocks with ``dz_c = g (n_pos w_c - [c positive])``,
``w_c = exp(z_c - lse)``: the gradients of the partner features are complete
inside their block (each sample owns its partner copies) and are stored there;
those of the sample's own six vectors are accumulated in registers and stored at
the end. No atomics, deterministic.

"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_fast.kernels.triton._common import on_tensor_device, pid64
from msa_fast.kernels.triton._contrastive_common import (
    NEG_BIG,
    _block,
    _d_pad,
    _load_rows,
    _load_vec,
    _lse_update,
    _mask_u8,
    _nonempty,
    _num_warps,
    _rowdot,
    _store_rows,
    _unit,
    _unit_grad,
    _unit_grad_rows,
    _unit_rows,
    _valid,
)


@triton.jit
def _own_features(s_ptr, d_ptr, i, D, offs_d, d_ok):
    """Unit vectors and inverse norms of sample i's ``[T_s, A_s, V_s]`` and ``[T_d, A_d, V_d]``."""
    base = i * 3 * D
    uT, iT = _unit(_load_vec(s_ptr, base, offs_d, d_ok))
    uA, iA = _unit(_load_vec(s_ptr, base + D, offs_d, d_ok))
    uV, iV = _unit(_load_vec(s_ptr, base + 2 * D, offs_d, d_ok))
    eT, jT = _unit(_load_vec(d_ptr, base, offs_d, d_ok))
    eA, jA = _unit(_load_vec(d_ptr, base + D, offs_d, d_ok))
    eV, jV = _unit(_load_vec(d_ptr, base + 2 * D, offs_d, d_ok))
    return uT, iT, uA, iA, uV, iV, eT, jT, eA, jA, eV, jV


@triton.jit
def _own_cosines(uT, uA, uV, eT, eA, eV):
    """Sample i's fixed cosines: ``cos(T_s, V_s)``, ``cos(T_s, A_s)`` (intra positives) and
    ``cos(T_s, T_d / A_d / V_d)`` (intra negatives)."""
    return (tl.sum(uT * uV, axis=0), tl.sum(uT * uA, axis=0), tl.sum(uT * eT, axis=0),
            tl.sum(uT * eA, axis=0), tl.sum(uT * eV, axis=0))


@triton.jit
def _partner_block(ps_ptr, pm_ptr, i, j0, Kp, D, offs_d, d_ok,
                   BLOCK_J: tl.constexpr, HAS_PM: tl.constexpr):
    """A block of sample i's positive partners: bounds, validity, row offsets, and the unit
    rows with inverse norms of their ``[T_s, A_s, V_s]`` (P*) and ``[T_d, A_d, V_d]`` (Q*)."""
    offs_j = j0 + tl.arange(0, BLOCK_J)
    j_ok = offs_j < Kp
    valid = _valid(pm_ptr, i * Kp + offs_j, j_ok, HAS_PM)
    row = (i * Kp + offs_j) * 6 * D
    PT, iPT = _unit_rows(_load_rows(ps_ptr, row, j_ok, offs_d, d_ok))
    PA, iPA = _unit_rows(_load_rows(ps_ptr, row + D, j_ok, offs_d, d_ok))
    PV, iPV = _unit_rows(_load_rows(ps_ptr, row + 2 * D, j_ok, offs_d, d_ok))
    QT, iQT = _unit_rows(_load_rows(ps_ptr, row + 3 * D, j_ok, offs_d, d_ok))
    QA, iQA = _unit_rows(_load_rows(ps_ptr, row + 4 * D, j_ok, offs_d, d_ok))
    QV, iQV = _unit_rows(_load_rows(ps_ptr, row + 5 * D, j_ok, offs_d, d_ok))
    return j_ok, valid, row, PT, iPT, PA, iPA, PV, iPV, QT, iQT, QA, iQA, QV, iQV


@triton.jit
def _negative_block(ns_ptr, nm_ptr, i, k0, Kn, D, offs_d, d_ok,
                    BLOCK_K: tl.constexpr, HAS_NM: tl.constexpr):
    """A block of sample i's negative partners: bounds, validity, row offsets, and the unit
    rows with inverse norms of their ``[T_s, A_s, V_s]``."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < Kn
    valid = _valid(nm_ptr, i * Kn + offs_k, k_ok, HAS_NM)
    row = (i * Kn + offs_k) * 3 * D
    NT, iNT = _unit_rows(_load_rows(ns_ptr, row, k_ok, offs_d, d_ok))
    NA, iNA = _unit_rows(_load_rows(ns_ptr, row + D, k_ok, offs_d, d_ok))
    NV, iNV = _unit_rows(_load_rows(ns_ptr, row + 2 * D, k_ok, offs_d, d_ok))
    return k_ok, valid, row, NT, iNT, NA, iNA, NV, iNV


@triton.jit
def _partner_group(PT, PA, PV, QT, QA, QV, tau):
    """G4j: logits of each partner's ``T_s^j`` against its five candidates and their lse."""
    zV = tl.sum(PT * PV, axis=1) / tau
    zA = tl.sum(PT * PA, axis=1) / tau
    zT_ = tl.sum(PT * QT, axis=1) / tau
    zA_ = tl.sum(PT * QA, axis=1) / tau
    zV_ = tl.sum(PT * QV, axis=1) / tau
    m = tl.maximum(tl.maximum(tl.maximum(zV, zA), tl.maximum(zT_, zA_)), zV_)
    s = tl.exp(zV - m) + tl.exp(zA - m) + tl.exp(zT_ - m) + tl.exp(zA_ - m) + tl.exp(zV_ - m)
    return zV, zA, zT_, zA_, zV_, m + tl.log(s)


@triton.jit
def fd_cmdie_fwd_kernel(s_ptr, d_ptr, ps_ptr, ns_ptr, pm_ptr, nm_ptr, loss_ptr, aux_ptr,
                        Kp, Kn, D, tau, margin, lam,
                        HAS_PM: tl.constexpr, HAS_NM: tl.constexpr,
                        BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, D_P: tl.constexpr):
    """One sample: ``loss_i = l_G1 + l_G2 + l_G3 + sum_j l_G4j + lam * tri``; saves ``aux``."""
    i = pid64(0)
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    # distinct names, not `_`: the loop below reassigns `_` to blocks (loop-carried type)
    uT, _i0, uA, _i1, uV, _i2, eT, _i3, eA, _i4, eV, _i5 = _own_features(s_ptr, d_ptr, i, D, offs_d, d_ok)
    cV, cA, cdT, cdA, cdV = _own_cosines(uT, uA, uV, eT, eA, eV)
    # G1 starts with its five always-present candidates.
    m1 = tl.maximum(tl.maximum(tl.maximum(cV, cA), tl.maximum(cdT, cdA)), cdV) / tau
    s1 = (tl.exp(cV / tau - m1) + tl.exp(cA / tau - m1) + tl.exp(cdT / tau - m1) + tl.exp(cdA / tau - m1)
          + tl.exp(cdV / tau - m1))
    pos1 = (cV + cA) / tau
    m2 = tl.full((), NEG_BIG, tl.float32)
    m3 = tl.full((), NEG_BIG, tl.float32)
    s2 = tl.zeros((), tl.float32)
    s3 = tl.zeros((), tl.float32)
    pos2 = tl.zeros((), tl.float32)
    pos3 = tl.zeros((), tl.float32)
    npp = tl.zeros((), tl.float32)
    l4 = tl.zeros((), tl.float32)
    for j0 in range(0, Kp, BLOCK_J):
        _, valid, _, PT, _, PA, _, PV, _, QT, _, QA, _, QV, _ = _partner_block(
            ps_ptr, pm_ptr, i, j0, Kp, D, offs_d, d_ok, BLOCK_J, HAS_PM)
        z = _rowdot(uT, PT) / tau
        m1, s1 = _lse_update(m1, s1, z, valid)
        pos1 += tl.sum(tl.where(valid, z, 0.0), axis=0)
        z = _rowdot(uA, PA) / tau
        m2, s2 = _lse_update(m2, s2, z, valid)
        pos2 += tl.sum(tl.where(valid, z, 0.0), axis=0)
        z = _rowdot(uV, PV) / tau
        m3, s3 = _lse_update(m3, s3, z, valid)
        pos3 += tl.sum(tl.where(valid, z, 0.0), axis=0)
        npp += tl.sum(valid.to(tl.float32), axis=0)
        zV, zA, _, _, _, lse4 = _partner_group(PT, PA, PV, QT, QA, QV, tau)
        l4 += tl.sum(tl.where(valid, 2.0 * lse4 - zV - zA, 0.0), axis=0)
    for k0 in range(0, Kn, BLOCK_K):
        _, valid, _, NT, _, NA, _, NV, _ = _negative_block(
            ns_ptr, nm_ptr, i, k0, Kn, D, offs_d, d_ok, BLOCK_K, HAS_NM)
        m1, s1 = _lse_update(m1, s1, _rowdot(uT, NT) / tau, valid)
        m2, s2 = _lse_update(m2, s2, _rowdot(uA, NA) / tau, valid)
        m3, s3 = _lse_update(m3, s3, _rowdot(uV, NV) / tau, valid)
    lse1 = m1 + tl.log(s1)
    lse2 = tl.where(s2 > 0.0, m2 + tl.log(tl.where(s2 > 0.0, s2, 1.0)), 0.0)
    lse3 = tl.where(s3 > 0.0, m3 + tl.log(tl.where(s3 > 0.0, s3, 1.0)), 0.0)
    l_nt = (2.0 + npp) * lse1 - pos1 + npp * lse2 - pos2 + npp * lse3 - pos3 + l4
    tri = (tl.maximum((1.0 - cV) - (1.0 - cdT) + margin, 0.0) + tl.maximum((1.0 - cV) - (1.0 - cdA) + margin, 0.0)
           + tl.maximum((1.0 - cV) - (1.0 - cdV) + margin, 0.0) + tl.maximum((1.0 - cA) - (1.0 - cdT) + margin, 0.0)
           + tl.maximum((1.0 - cA) - (1.0 - cdA) + margin, 0.0) + tl.maximum((1.0 - cA) - (1.0 - cdV) + margin, 0.0))
    tl.store(loss_ptr + i, l_nt + lam * tri)
    tl.store(aux_ptr + i * 4, lse1)
    tl.store(aux_ptr + i * 4 + 1, lse2)
    tl.store(aux_ptr + i * 4 + 2, lse3)
    tl.store(aux_ptr + i * 4 + 3, npp)


@triton.jit
def _hinge_on(cp, cn, margin):
    return ((1.0 - cp) - (1.0 - cn) + margin > 0.0).to(tl.float32)


@triton.jit
def fd_cmdie_bwd_kernel(g_ptr, g_stride, s_ptr, d_ptr, ps_ptr, ns_ptr, pm_ptr, nm_ptr, aux_ptr,
                        ds_ptr, dd_ptr, dps_ptr, dns_ptr, Kp, Kn, D, tau, margin, lam,
                        HAS_PM: tl.constexpr, HAS_NM: tl.constexpr, NEED_PS: tl.constexpr, NEED_NS: tl.constexpr,
                        BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, D_P: tl.constexpr):
    """One sample: every gradient, ``dz_c = g (n_pos w_c - [c positive])`` per group."""
    i = pid64(0)
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    g = tl.load(g_ptr + i * g_stride).to(tl.float32)
    gt = g / tau
    lg = lam * g
    lse1 = tl.load(aux_ptr + i * 4)
    lse2 = tl.load(aux_ptr + i * 4 + 1)
    lse3 = tl.load(aux_ptr + i * 4 + 2)
    npp = tl.load(aux_ptr + i * 4 + 3)
    n1 = 2.0 + npp
    uT, iT, uA, iA, uV, iV, eT, jT, eA, jA, eV, jV = _own_features(s_ptr, d_ptr, i, D, offs_d, d_ok)
    cV, cA, cdT, cdA, cdV = _own_cosines(uT, uA, uV, eT, eA, eV)
    # G1's fixed candidates (NT-Xent), then the six triplets.
    dV = gt * (n1 * tl.exp(cV / tau - lse1) - 1.0)
    dA = gt * (n1 * tl.exp(cA / tau - lse1) - 1.0)
    ddT = gt * n1 * tl.exp(cdT / tau - lse1)
    ddA = gt * n1 * tl.exp(cdA / tau - lse1)
    ddV = gt * n1 * tl.exp(cdV / tau - lse1)
    hVT = _hinge_on(cV, cdT, margin)
    hVA = _hinge_on(cV, cdA, margin)
    hVV = _hinge_on(cV, cdV, margin)
    hAT = _hinge_on(cA, cdT, margin)
    hAA = _hinge_on(cA, cdA, margin)
    hAV = _hinge_on(cA, cdV, margin)
    dV -= lg * (hVT + hVA + hVV)
    dA -= lg * (hAT + hAA + hAV)
    ddT += lg * (hVT + hAT)
    ddA += lg * (hVA + hAA)
    ddV += lg * (hVV + hAV)
    GT = dV * uV + dA * uA + ddT * eT + ddA * eA + ddV * eV
    GA = dA * uT
    GV = dV * uT
    for j0 in range(0, Kp, BLOCK_J):
        j_ok, valid, row, PT, iPT, PA, iPA, PV, iPV, QT, iQT, QA, iQA, QV, iQV = _partner_block(
            ps_ptr, pm_ptr, i, j0, Kp, D, offs_d, d_ok, BLOCK_J, HAS_PM)
        # G1, G2, G3: the sample's anchors against the partner's same-modality features.
        dc1 = tl.where(valid, gt * (n1 * tl.exp(_rowdot(uT, PT) / tau - lse1) - 1.0), 0.0)[:, None]
        dc2 = tl.where(valid, gt * (npp * tl.exp(_rowdot(uA, PA) / tau - lse2) - 1.0), 0.0)[:, None]
        dc3 = tl.where(valid, gt * (npp * tl.exp(_rowdot(uV, PV) / tau - lse3) - 1.0), 0.0)[:, None]
        GT += tl.sum(dc1 * PT, axis=0)
        GA += tl.sum(dc2 * PA, axis=0)
        GV += tl.sum(dc3 * PV, axis=0)
        if NEED_PS:
            # G4j: the partner's own T_s^j anchor.
            zV, zA, zT_, zA_, zV_, lse4 = _partner_group(PT, PA, PV, QT, QA, QV, tau)
            d4V = tl.where(valid, gt * (2.0 * tl.exp(zV - lse4) - 1.0), 0.0)[:, None]
            d4A = tl.where(valid, gt * (2.0 * tl.exp(zA - lse4) - 1.0), 0.0)[:, None]
            d4T_ = tl.where(valid, gt * 2.0 * tl.exp(zT_ - lse4), 0.0)[:, None]
            d4A_ = tl.where(valid, gt * 2.0 * tl.exp(zA_ - lse4), 0.0)[:, None]
            d4V_ = tl.where(valid, gt * 2.0 * tl.exp(zV_ - lse4), 0.0)[:, None]
            GPT = dc1 * uT[None, :] + d4V * PV + d4A * PA + d4T_ * QT + d4A_ * QA + d4V_ * QV
            GPA = dc2 * uA[None, :] + d4A * PT
            GPV = dc3 * uV[None, :] + d4V * PT
            _store_rows(dps_ptr, row, j_ok, offs_d, d_ok, _unit_grad_rows(PT, iPT, GPT))
            _store_rows(dps_ptr, row + D, j_ok, offs_d, d_ok, _unit_grad_rows(PA, iPA, GPA))
            _store_rows(dps_ptr, row + 2 * D, j_ok, offs_d, d_ok, _unit_grad_rows(PV, iPV, GPV))
            _store_rows(dps_ptr, row + 3 * D, j_ok, offs_d, d_ok, _unit_grad_rows(QT, iQT, d4T_ * PT))
            _store_rows(dps_ptr, row + 4 * D, j_ok, offs_d, d_ok, _unit_grad_rows(QA, iQA, d4A_ * PT))
            _store_rows(dps_ptr, row + 5 * D, j_ok, offs_d, d_ok, _unit_grad_rows(QV, iQV, d4V_ * PT))
    for k0 in range(0, Kn, BLOCK_K):
        k_ok, valid, row, NT, iNT, NA, iNA, NV, iNV = _negative_block(
            ns_ptr, nm_ptr, i, k0, Kn, D, offs_d, d_ok, BLOCK_K, HAS_NM)
        dc1 = tl.where(valid, gt * n1 * tl.exp(_rowdot(uT, NT) / tau - lse1), 0.0)[:, None]
        dc2 = tl.where(valid, gt * npp * tl.exp(_rowdot(uA, NA) / tau - lse2), 0.0)[:, None]
        dc3 = tl.where(valid, gt * npp * tl.exp(_rowdot(uV, NV) / tau - lse3), 0.0)[:, None]
        GT += tl.sum(dc1 * NT, axis=0)
        GA += tl.sum(dc2 * NA, axis=0)
        GV += tl.sum(dc3 * NV, axis=0)
        if NEED_NS:
            _store_rows(dns_ptr, row, k_ok, offs_d, d_ok, _unit_grad_rows(NT, iNT, dc1 * uT[None, :]))
            _store_rows(dns_ptr, row + D, k_ok, offs_d, d_ok, _unit_grad_rows(NA, iNA, dc2 * uA[None, :]))
            _store_rows(dns_ptr, row + 2 * D, k_ok, offs_d, d_ok, _unit_grad_rows(NV, iNV, dc3 * uV[None, :]))
    base = i * 3 * D
    ty = ds_ptr.dtype.element_ty
    tl.store(ds_ptr + base + offs_d, _unit_grad(uT, iT, GT).to(ty), mask=d_ok)
    tl.store(ds_ptr + base + D + offs_d, _unit_grad(uA, iA, GA).to(ty), mask=d_ok)
    tl.store(ds_ptr + base + 2 * D + offs_d, _unit_grad(uV, iV, GV).to(ty), mask=d_ok)
    tl.store(dd_ptr + base + offs_d, _unit_grad(eT, jT, ddT * uT).to(ty), mask=d_ok)
    tl.store(dd_ptr + base + D + offs_d, _unit_grad(eA, jA, ddA * uT).to(ty), mask=d_ok)
    tl.store(dd_ptr + base + 2 * D + offs_d, _unit_grad(eV, jV, ddV * uT).to(ty), mask=d_ok)


def _fd_prepare(sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask,
                neg_partner_mask):
    s, d = sim_feats.contiguous(), diff_feats.contiguous()
    ps = _nonempty(pos_partner_feats.contiguous(), s)
    ns = _nonempty(neg_partner_feats.contiguous(), s)
    pm, has_pm = _mask_u8(pos_partner_mask, s)
    nm, has_nm = _mask_u8(neg_partner_mask, s)
    return s, d, ps, ns, _nonempty(pm, s), _nonempty(nm, s), has_pm, has_nm


def _fd_launch(Kp: int, Kn: int, D: int, budget: int) -> dict:
    d_p = _d_pad(D)
    # A positive block holds six (BLOCK_J, D_P) tiles, a negative block three.
    return dict(BLOCK_J=_block(Kp, d_p, budget // 6), BLOCK_K=_block(Kn, d_p, budget // 3), D_P=d_p,
                num_warps=_num_warps(d_p))


@on_tensor_device
def fd_cmdie_forward(sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask,
                     neg_partner_mask, tau, margin, lambda_tri):
    """Returns ``(loss (B,), aux (B, 4))`` in fp32."""
    B, _, D = sim_feats.shape
    Kp, Kn = pos_partner_feats.shape[1], neg_partner_feats.shape[1]
    s, d, ps, ns, pm, nm, has_pm, has_nm = _fd_prepare(
        sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask, neg_partner_mask)
    loss = torch.empty(B, dtype=torch.float32, device=s.device)
    aux = torch.empty((B, 4), dtype=torch.float32, device=s.device)
    if B:
        fd_cmdie_fwd_kernel[(B,)](s, d, ps, ns, pm, nm, loss, aux, Kp, Kn, D, float(tau), float(margin),
                                  float(lambda_tri), HAS_PM=has_pm, HAS_NM=has_nm,
                                  **_fd_launch(Kp, Kn, D, 4096))  # 8192 spills in 16-bit (Triton 3.6)
    return loss, aux


@on_tensor_device
def fd_cmdie_backward(grad, sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask,
                      neg_partner_mask, aux, tau, margin, lambda_tri, need_pos_partners, need_neg_partners):
    """Returns the gradients of the four feature tensors in their dtypes; a partner
    gradient that is not needed comes back empty (and its stores are skipped)."""
    B, _, D = sim_feats.shape
    Kp, Kn = pos_partner_feats.shape[1], neg_partner_feats.shape[1]
    s, d, ps, ns, pm, nm, has_pm, has_nm = _fd_prepare(
        sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask, neg_partner_mask)
    dsim, ddiff = sim_feats.new_empty(sim_feats.shape), diff_feats.new_empty(diff_feats.shape)
    dps = (pos_partner_feats.new_empty(pos_partner_feats.shape) if need_pos_partners
           else pos_partner_feats.new_empty(0))
    dns = (neg_partner_feats.new_empty(neg_partner_feats.shape) if need_neg_partners
           else neg_partner_feats.new_empty(0))
    if grad is None:
        grad = torch.zeros((), dtype=torch.float32, device=s.device).expand(B)
    if B:
        fd_cmdie_bwd_kernel[(B,)](grad, grad.stride(0), s, d, ps, ns, pm, nm, aux.contiguous(), dsim, ddiff,
                                  _nonempty(dps, s), _nonempty(dns, s), Kp, Kn, D, float(tau), float(margin),
                                  float(lambda_tri), HAS_PM=has_pm, HAS_NM=has_nm,
                                  NEED_PS=bool(need_pos_partners and Kp), NEED_NS=bool(need_neg_partners and Kn),
                                  **_fd_launch(Kp, Kn, D, 4096))
    return dsim, ddiff, dps, dns
