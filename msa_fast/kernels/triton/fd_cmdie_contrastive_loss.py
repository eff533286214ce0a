"""Triton kernels of the FD-CMDIE contrastive loss (eq. 9-12, contract §3.4), forward and backward.

``fd_cmdie`` -- ``s, d (B, 3, D)``, ``ps (B, Kp, 2, 3, D)``, ``ns (B, Kn, 3, D)``,
``pm (B, Kp)``, ``nm (B, Kn)``. Per sample i the anchor groups of
:func:`msa_fast.ops.reference.fd_cmdie_contrastive_loss`, with Positive_in ``P``,
Negative_in ``N``, the triplets and the inter-sample modalities ``M`` read from the pair
table in :mod:`msa_fast.ops._common` (the same objects the reference indexes)::

    G1   T_s^i  -> {P^i, T_s^j (pos, T in M) ; N^i, T_s^k (neg, T in M)}
    Gm   m_s^i  -> {m_s^j (pos) ; m_s^k (neg)}                  (m in M, m != T)
    G4j  T_s^j  -> {P^j (pos) ; N^j (neg)}                       (valid j)
    l_g = n_pos * lse_g - sum_{pos} z          (= sum_pos (lse_g - z_pos))
    tri = sum_{(T_s, p, n) in Pair_Tri} max(0, (1 - c(T_s, p)) - (1 - c(T_s, n)) + margin)
    loss_i = l_G1 + sum_m l_Gm + sum_j l_G4j + lambda_tri * tri

Layout. A sample's three modalities are one ``(4, D_P)`` tile (rows t, a, v and a zero
pad row: ``tl.arange`` needs a power of two), its similarity and dissimilarity features
one tile each; a block of partners is a ``(BLOCK, 4, D_P)`` tile per feature kind. The
table enters as constexpr bit masks over those rows (``pair_masks``, built from the table by
:func:`msa_fast.ops.contrastive.fd_cmdie_pair_masks`), so every
group is one masked reduction over the rows: G1 and the Gm share one vector of online
log-sum-exp states, one lane per modality (the lane of a modality outside ``M`` gets no
candidate and adds 0). The kernel takes the tables FD-CMDIE defines -- anchors ``T_s``,
Positive_in among the other similarity features, Negative_in among the dissimilarity
features, each row once -- and ``msa_fast.ops._common.fd_cmdie_table`` refuses any other
(for the reference too).

Numerics. A group's running max starts at the finite sentinel ``-1e30``, so
``exp(-inf - -inf)`` never appears; a group with no candidate keeps ``s = 0`` and its
``lse`` is written as 0 (it has no positive either: it adds 0 and gets 0 gradient). The
hinge's gradient is taken as ``h > 0`` (torch.relu's convention at 0). The forward saves
``aux (B, 4) = [lse_G1, lse_Ga, lse_Gv, #valid positive partners]`` (one store of the
lse lane vector with the count in its pad lane); the backward is one pass over the
partner blocks with ``dz_c = g (n_pos w_c - [c positive])``, ``w_c = exp(z_c - lse)``:
the gradients of the partner features are complete inside their block (each sample owns
its partner copies) and are stored there; those of the sample's own tiles are
accumulated in registers and stored at the end. No atomics, deterministic.
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
    _mask_u8,
    _nonempty,
    _num_warps,
    _unit_grad_tile,
    _unit_tile,
    _valid,
)

M_P = tl.constexpr(4)  # the modality rows t, a, v padded to a power of two


@triton.jit
def _bits(mask: tl.constexpr, idx):
    """``bit idx of mask`` as booleans, for an int32 index tensor ``idx``."""
    return ((tl.full(idx.shape, mask, tl.int32) >> idx) & 1) != 0


@triton.jit
def _own_offsets(i, D, offs_m, offs_d):
    """Element offsets and mask of sample i's ``(M_P, D_P)`` modality tile in ``s`` or ``d``."""
    off = i * 3 * D + offs_m[:, None] * D + offs_d[None, :]
    return off, (offs_m[:, None] < 3) & (offs_d[None, :] < D)


@triton.jit
def _partner_offsets(first, r_ok, offs_m, D, offs_d):
    """Offsets and mask of a ``(BLOCK, M_P, D_P)`` tile of three rows starting at ``first``."""
    off = first[:, None, None] + offs_m[None, :, None] * D + offs_d[None, None, :]
    ok = r_ok[:, None, None] & (offs_m[None, :, None] < 3) & (offs_d[None, None, :] < D)
    return off, ok


@triton.jit
def _load(ptr, off, ok):
    return tl.load(ptr + off, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, off, ok, val):
    tl.store(ptr + off, val.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _row(x, offs_m, r: tl.constexpr):
    """Modality row ``r`` ``(D_P,)`` of a ``(M_P, D_P)`` tile."""
    return tl.sum(tl.where(offs_m[:, None] == r, x, 0.0), axis=0)


@triton.jit
def _block_row(x, offs_m, r: tl.constexpr):
    """Modality row ``r`` ``(BLOCK, D_P)`` of every partner of a ``(BLOCK, M_P, D_P)`` tile."""
    return tl.sum(tl.where(offs_m[None, :, None] == r, x, 0.0), axis=1)


@triton.jit
def _lse_lanes(m, s, z, valid):
    """One block of online log-sum-exps, one per lane: ``z, valid (BLOCK, M_P)``, ``m, s (M_P,)``."""
    zm = tl.where(valid, z, NEG_BIG)
    m_new = tl.maximum(m, tl.max(zm, axis=0))
    s = s * tl.exp(m - m_new) + tl.sum(tl.where(valid, tl.exp(zm - m_new[None, :]), 0.0), axis=0)
    return m_new, s


@triton.jit
def _safe_lse(m, s):
    return tl.where(s > 0.0, m + tl.log(tl.where(s > 0.0, s, 1.0)), 0.0)


@triton.jit
def _partner_group(PS, PD, pos_m, neg_m, tau, offs_m):
    """G4j for a block of partners: the logits of each ``T_s^j`` against its own
    similarity and dissimilarity rows ``(BLOCK, M_P)`` each, and their lse ``(BLOCK,)``."""
    PT = _block_row(PS, offs_m, 0)
    zs = tl.sum(PS * PT[:, None, :], axis=2) / tau
    zd = tl.sum(PD * PT[:, None, :], axis=2) / tau
    m = tl.maximum(tl.max(tl.where(pos_m[None, :], zs, NEG_BIG), axis=1),
                   tl.max(tl.where(neg_m[None, :], zd, NEG_BIG), axis=1))
    # exp of (z - m) only where a lane is a candidate: m = NEG_BIG (no candidate) cannot overflow
    s = (tl.sum(tl.where(pos_m[None, :], tl.exp(tl.where(pos_m[None, :], zs, m[:, None]) - m[:, None]), 0.0), axis=1)
         + tl.sum(tl.where(neg_m[None, :], tl.exp(tl.where(neg_m[None, :], zd, m[:, None]) - m[:, None]), 0.0),
                  axis=1))
    return PT, zs, zd, _safe_lse(m, s)


@triton.jit
def _own_state(s_ptr, d_ptr, i, D, tau, offs_m, offs_d, pos_m, neg_m):
    """Sample i's unit tiles ``S, Dd (M_P, D_P)`` with inverse norms, the text anchor
    ``uT``, its logits against its own rows ``zs, zd (M_P,)``, and G1's log-sum-exp state
    over the intra-sample candidates."""
    off, ok = _own_offsets(i, D, offs_m, offs_d)
    S, iS = _unit_tile(_load(s_ptr, off, ok))
    Dd, iD = _unit_tile(_load(d_ptr, off, ok))
    uT = _row(S, offs_m, 0)
    zs = tl.sum(S * uT[None, :], axis=1) / tau
    zd = tl.sum(Dd * uT[None, :], axis=1) / tau
    m1 = tl.maximum(tl.max(tl.where(pos_m, zs, NEG_BIG), axis=0), tl.max(tl.where(neg_m, zd, NEG_BIG), axis=0))
    s1 = (tl.sum(tl.where(pos_m, tl.exp(tl.where(pos_m, zs, m1) - m1), 0.0), axis=0)
          + tl.sum(tl.where(neg_m, tl.exp(tl.where(neg_m, zd, m1) - m1), 0.0), axis=0))
    return off, ok, S, iS, Dd, iD, uT, zs, zd, m1, s1


@triton.jit
def _partner_rows(ptr, m_ptr, i, r0, K, D, offs_m, offs_d, STRIDE: tl.constexpr, BLOCK: tl.constexpr,
                  HAS_MASK: tl.constexpr):
    """Partners ``r0 .. r0 + BLOCK`` of sample i (``STRIDE * D`` elements each: 6 rows for
    a similar partner, 3 for a dissimilar one): validity, the offsets and mask of a
    ``(BLOCK, M_P, D_P)`` tile, and the unit tile of their similarity rows with inverse norms."""
    offs = r0 + tl.arange(0, BLOCK)
    r_ok = offs < K
    valid = _valid(m_ptr, i * K + offs, r_ok, HAS_MASK)
    off, ok = _partner_offsets((i * K + offs) * STRIDE * D, r_ok, offs_m, D, offs_d)
    X, inv = _unit_tile(_load(ptr, off, ok))
    return valid, off, ok, X, inv


@triton.jit
def _hinges(zs, zd, tau, margin, offs_m, TRI: tl.constexpr):
    """The Pair_Tri hinge arguments ``(M_P, M_P)`` (positive row x negative column) and
    which of them are triplets of the table."""
    cs, cd = zs * tau, zd * tau
    h = (1.0 - cs)[:, None] - (1.0 - cd)[None, :] + margin
    return h, _bits(TRI, offs_m[:, None] * M_P + offs_m[None, :])


@triton.jit
def fd_cmdie_fwd_kernel(s_ptr, d_ptr, ps_ptr, ns_ptr, pm_ptr, nm_ptr, loss_ptr, aux_ptr,
                        Kp, Kn, D, tau, margin, lam,
                        POS_IN: tl.constexpr, NEG_IN: tl.constexpr, TRI: tl.constexpr, INTER: tl.constexpr,
                        N_POS_IN: tl.constexpr, HAS_PM: tl.constexpr, HAS_NM: tl.constexpr,
                        BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, D_P: tl.constexpr):
    """One sample: ``loss_i = l_G1 + sum_m l_Gm + sum_j l_G4j + lam * tri``; saves ``aux``."""
    i = pid64(0)
    offs_m = tl.arange(0, M_P)
    offs_d = tl.arange(0, D_P)
    pos_m, neg_m, inter_m = _bits(POS_IN, offs_m), _bits(NEG_IN, offs_m), _bits(INTER, offs_m)
    _o, _k, S, _is, Dd, _id, uT, zs, zd, m1, s1 = _own_state(s_ptr, d_ptr, i, D, tau, offs_m, offs_d, pos_m, neg_m)
    # one online log-sum-exp lane per modality group; lane 0 (G1) starts with the intra candidates
    lane0 = offs_m == 0
    m = tl.where(lane0, m1, NEG_BIG)
    s = tl.where(lane0, s1, 0.0)
    pos = tl.where(lane0, tl.sum(tl.where(pos_m, zs, 0.0), axis=0), 0.0)
    npp = tl.zeros((), tl.float32)
    l4 = tl.zeros((), tl.float32)
    for j0 in range(0, Kp, BLOCK_J):
        valid, off, ok, PS, _ips = _partner_rows(ps_ptr, pm_ptr, i, j0, Kp, D, offs_m, offs_d, 6, BLOCK_J, HAS_PM)
        PD, _ipd = _unit_tile(_load(ps_ptr, off + 3 * D, ok))
        z = tl.sum(PS * S[None, :, :], axis=2) / tau
        v2 = valid[:, None] & inter_m[None, :]
        m, s = _lse_lanes(m, s, z, v2)
        pos += tl.sum(tl.where(v2, z, 0.0), axis=0)
        npp += tl.sum(valid.to(tl.float32), axis=0)
        _pt, z4s, _z4d, lse4 = _partner_group(PS, PD, pos_m, neg_m, tau, offs_m)
        l4 += tl.sum(tl.where(valid, N_POS_IN * lse4 - tl.sum(tl.where(pos_m[None, :], z4s, 0.0), axis=1), 0.0),
                     axis=0)
    for k0 in range(0, Kn, BLOCK_K):
        valid, _off, _ok, NS, _ins = _partner_rows(ns_ptr, nm_ptr, i, k0, Kn, D, offs_m, offs_d, 3, BLOCK_K, HAS_NM)
        m, s = _lse_lanes(m, s, tl.sum(NS * S[None, :, :], axis=2) / tau, valid[:, None] & inter_m[None, :])
    lse = _safe_lse(m, s)
    n_pos = tl.where(inter_m, npp, 0.0) + tl.where(lane0, N_POS_IN, 0.0)
    h, tri_m = _hinges(zs, zd, tau, margin, offs_m, TRI)
    tri = tl.sum(tl.sum(tl.where(tri_m, tl.maximum(h, 0.0), 0.0), axis=1), axis=0)
    tl.store(loss_ptr + i, tl.sum(n_pos * lse - pos, axis=0) + l4 + lam * tri)
    tl.store(aux_ptr + i * M_P + offs_m, tl.where(offs_m == M_P - 1, npp, lse))


@triton.jit
def fd_cmdie_bwd_kernel(g_ptr, g_stride, s_ptr, d_ptr, ps_ptr, ns_ptr, pm_ptr, nm_ptr, aux_ptr,
                        ds_ptr, dd_ptr, dps_ptr, dns_ptr, Kp, Kn, D, tau, margin, lam,
                        POS_IN: tl.constexpr, NEG_IN: tl.constexpr, TRI: tl.constexpr, INTER: tl.constexpr,
                        N_POS_IN: tl.constexpr, HAS_PM: tl.constexpr, HAS_NM: tl.constexpr,
                        NEED_PS: tl.constexpr, NEED_NS: tl.constexpr,
                        BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, D_P: tl.constexpr):
    """One sample: every gradient, ``dz_c = g (n_pos w_c - [c positive])`` per group."""
    i = pid64(0)
    offs_m = tl.arange(0, M_P)
    offs_d = tl.arange(0, D_P)
    pos_m, neg_m, inter_m = _bits(POS_IN, offs_m), _bits(NEG_IN, offs_m), _bits(INTER, offs_m)
    lane0 = offs_m == 0
    g = tl.load(g_ptr + i * g_stride).to(tl.float32)
    gt = g / tau
    lg = lam * g
    aux = tl.load(aux_ptr + i * M_P + offs_m)
    npp = tl.sum(tl.where(offs_m == M_P - 1, aux, 0.0), axis=0)
    lse = tl.where(offs_m == M_P - 1, 0.0, aux)
    lse1 = tl.sum(tl.where(lane0, lse, 0.0), axis=0)
    n_pos = tl.where(inter_m, npp, 0.0) + tl.where(lane0, N_POS_IN, 0.0)
    n1 = tl.sum(tl.where(lane0, n_pos, 0.0), axis=0)
    own_off, own_ok, S, iS, Dd, iD, uT, zs, zd, _m1, _s1 = _own_state(
        s_ptr, d_ptr, i, D, tau, offs_m, offs_d, pos_m, neg_m)
    # G1's intra candidates (NT-Xent), then the Pair_Tri hinges: d loss / d cos per row.
    dcs = tl.where(pos_m, gt * (n1 * tl.exp(zs - lse1) - 1.0), 0.0)
    dcd = tl.where(neg_m, gt * n1 * tl.exp(zd - lse1), 0.0)
    h, tri_m = _hinges(zs, zd, tau, margin, offs_m, TRI)
    on = tl.where(tri_m & (h > 0.0), lg, 0.0)
    dcs -= tl.sum(on, axis=1)
    dcd += tl.sum(on, axis=0)
    GuT = tl.sum(dcs[:, None] * S, axis=0) + tl.sum(dcd[:, None] * Dd, axis=0)
    GS = dcs[:, None] * uT[None, :] + tl.where(lane0[:, None], GuT[None, :], 0.0)
    GD = dcd[:, None] * uT[None, :]
    for j0 in range(0, Kp, BLOCK_J):
        valid, off, ok, PS, iPS = _partner_rows(ps_ptr, pm_ptr, i, j0, Kp, D, offs_m, offs_d, 6, BLOCK_J, HAS_PM)
        PD, iPD = _unit_tile(_load(ps_ptr, off + 3 * D, ok))
        # G1 and the Gm: each own row against the partner's same row (a positive).
        z = tl.sum(PS * S[None, :, :], axis=2) / tau
        dc = tl.where(valid[:, None] & inter_m[None, :], gt * (n_pos[None, :] * tl.exp(z - lse[None, :]) - 1.0), 0.0)
        GS += tl.sum(dc[:, :, None] * PS, axis=0)
        if NEED_PS:
            # G4j: the partner's own T_s^j anchor.
            PT, z4s, z4d, lse4 = _partner_group(PS, PD, pos_m, neg_m, tau, offs_m)
            d4s = tl.where(valid[:, None] & pos_m[None, :], gt * (N_POS_IN * tl.exp(z4s - lse4[:, None]) - 1.0), 0.0)
            d4d = tl.where(valid[:, None] & neg_m[None, :], gt * N_POS_IN * tl.exp(z4d - lse4[:, None]), 0.0)
            GPT = tl.sum(d4s[:, :, None] * PS, axis=1) + tl.sum(d4d[:, :, None] * PD, axis=1)
            GPS = (dc[:, :, None] * S[None, :, :] + d4s[:, :, None] * PT[:, None, :]
                   + tl.where(lane0[None, :, None], GPT[:, None, :], 0.0))
            _store(dps_ptr, off, ok, _unit_grad_tile(PS, iPS, GPS))
            _store(dps_ptr, off + 3 * D, ok, _unit_grad_tile(PD, iPD, d4d[:, :, None] * PT[:, None, :]))
    for k0 in range(0, Kn, BLOCK_K):
        valid, off, ok, NS, iNS = _partner_rows(ns_ptr, nm_ptr, i, k0, Kn, D, offs_m, offs_d, 3, BLOCK_K, HAS_NM)
        z = tl.sum(NS * S[None, :, :], axis=2) / tau
        dc = tl.where(valid[:, None] & inter_m[None, :], gt * n_pos[None, :] * tl.exp(z - lse[None, :]), 0.0)
        GS += tl.sum(dc[:, :, None] * NS, axis=0)
        if NEED_NS:
            _store(dns_ptr, off, ok, _unit_grad_tile(NS, iNS, dc[:, :, None] * S[None, :, :]))
    _store(ds_ptr, own_off, own_ok, _unit_grad_tile(S, iS, GS))
    _store(dd_ptr, own_off, own_ok, _unit_grad_tile(Dd, iD, GD))


def _fd_prepare(sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask,
                neg_partner_mask):
    s, d = sim_feats.contiguous(), diff_feats.contiguous()
    ps = _nonempty(pos_partner_feats.contiguous(), s)
    ns = _nonempty(neg_partner_feats.contiguous(), s)
    pm, has_pm = _mask_u8(pos_partner_mask, s)
    nm, has_nm = _mask_u8(neg_partner_mask, s)
    return s, d, ps, ns, pm, nm, has_pm, has_nm


def _fd_launch(Kp: int, Kn: int, D: int, budget: int, pair_masks: dict, partner_grads: bool = False) -> dict:
    d_p = _d_pad(D)
    # ``budget`` fp32 elements per partner block: a positive block holds two (BLOCK_J, M_P,
    # D_P) tiles (budget // 8 rows of D_P), a negative block one (budget // 4). ``_block``
    # keeps at least 2 rows, so from D_P = 512 a block holds more than the budget; that is
    # what the compile gate checks (0 spills, Triton 3.6 and 3.8), except that at D_P = 1024
    # two positive partners per block spill in the 16-bit backward (Triton 3.8): one, then.
    # A backward that forms the partners' gradient tiles runs 8 warps (4 spill 8 B at D = 256
    # in 16-bit on sm_80, Triton 3.6; without those tiles 8 warps spill 4 B on Triton 3.8).
    block_j = 1 if d_p * 8 > budget else _block(Kp, d_p, budget // 8)
    return dict(BLOCK_J=block_j, BLOCK_K=_block(Kn, d_p, budget // 4), D_P=d_p,
                num_warps=8 if partner_grads else _num_warps(d_p), **pair_masks)


@on_tensor_device
def fd_cmdie_forward(sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask,
                     neg_partner_mask, tau, margin, lambda_tri, pair_masks):
    """Returns ``(loss (B,), aux (B, 4))`` in fp32. ``pair_masks``: the pair table as the
    kernels' constexpr masks ``POS_IN, NEG_IN, TRI, INTER, N_POS_IN``."""
    B, _, D = sim_feats.shape
    Kp, Kn = pos_partner_feats.shape[1], neg_partner_feats.shape[1]
    s, d, ps, ns, pm, nm, has_pm, has_nm = _fd_prepare(
        sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask, neg_partner_mask)
    loss = torch.empty(B, dtype=torch.float32, device=s.device)
    aux = torch.empty((B, 4), dtype=torch.float32, device=s.device)
    if B:
        fd_cmdie_fwd_kernel[(B,)](s, d, ps, ns, pm, nm, loss, aux, Kp, Kn, D, float(tau), float(margin),
                                  float(lambda_tri), HAS_PM=has_pm, HAS_NM=has_nm,
                                  **_fd_launch(Kp, Kn, D, 4096, pair_masks))
    return loss, aux


@on_tensor_device
def fd_cmdie_backward(grad, sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask,
                      neg_partner_mask, aux, tau, margin, lambda_tri, need_pos_partners, need_neg_partners,
                      pair_masks):
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
                                  **_fd_launch(Kp, Kn, D, 4096, pair_masks, partner_grads=bool(need_pos_partners and Kp)))
    return dsim, ddiff, dps, dns
