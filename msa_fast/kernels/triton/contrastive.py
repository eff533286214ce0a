"""Triton kernels of the FD-CMDIE contrastive losses (eq. 9-12, contract §3.4), forward and backward.

Three losses, each one forward kernel and one fused backward kernel, one program
per loss row (``nt_xent``: an anchor; ``fd_cmdie``: a sample) or per block of rows
(``triplet``). The kernels write *per-row* losses in fp32; the reduction
(``mean`` / ``sum`` / ``none``) and the cast to the input dtype happen in the op
(``msa_fast/ops/contrastive.py``), so its backward hands the kernels one upstream
gradient per row, read through its stride (``loss.mean().backward()`` gives a
stride-0 tensor).

Notation. ``u(x) = x * inv(x)``, ``inv(x) = 1/||x||`` or 0 for a zero vector (the
zero-safe unit vector of :func:`msa_fast.ops.reference.unit_vectors`), ``c(x, y) =
<u(x), u(y)>``. The gradient of ``f(u(x))`` is ``inv(x) (G - u <u, G>)`` with ``G =
df/du``: exactly 0 at a zero vector (no NaN, as the reference's double ``where``).

``nt_xent`` -- ``anchor (P, D)``, ``positive (P, D)``, ``negatives (P, K, D)``,
``mask (P, K)`` (uint8, 1 = valid)::

    z_p = c(a, p) / tau,  z_k = c(a, n_k) / tau
    lse = logsumexp([z_p, z_k for valid k]),  loss = lse - z_p

The forward streams the negatives in ``BLOCK_K`` tiles with an online
log-sum-exp (started at ``z_p``, so it is always finite) and saves ``lse (P,)``;
the backward is a single pass: ``w = exp(z - lse)``, ``dz_p = g (w_p - 1)``,
``dz_k = g w_k`` (0 for masked k), every ``dc = dz / tau``.

``triplet`` -- ``anchor, positive, negative (P, D)``::

    loss = max(0, (1 - c(a, p)) - (1 - c(a, n)) + margin)

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

Numerics: every vector is loaded once per pass in its storage dtype (fp32 / fp16
/ bf16), all math in fp32, gradients stored in the input dtype. A vector counts as
zero when its fp32 sum of squares is 0 (the reference's ``||x|| > tiny`` rule:
the two agree unless every squared entry underflows fp32, ``|x_i| < ~1e-19``).
``D`` is padded to a power of two ``D_P >= 16`` (masked lanes load 0 and add
nothing to a dot product or a norm); one row is held whole in registers, so the
partner block sizes shrink as ``D`` grows. fp64 is not handled here (the op falls
back to the eager reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_fast.kernels.triton._common import on_tensor_device, pid64

NEG_BIG = tl.constexpr(-1e30)  # finite "no candidate yet" max of an online log-sum-exp


# --------------------------------------------------------------------------- #
# shared helpers
# --------------------------------------------------------------------------- #


@triton.jit
def _load_vec(ptr, off, offs_d, d_ok):
    return tl.load(ptr + off + offs_d, mask=d_ok, other=0.0).to(tl.float32)


@triton.jit
def _load_rows(ptr, row_off, r_ok, offs_d, d_ok):
    """``(BLOCK, D_P)`` tile of rows starting at element offsets ``row_off``; zeros outside."""
    return tl.load(ptr + row_off[:, None] + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, row_off, r_ok, offs_d, d_ok, val):
    tl.store(ptr + row_off[:, None] + offs_d[None, :], val.to(ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _unit(x):
    """Zero-safe ``(x * inv, inv)`` of one vector ``(D_P,)``."""
    ss = tl.sum(x * x, axis=0)
    ok = ss > 0.0
    inv = tl.where(ok, 1.0 / tl.sqrt(tl.where(ok, ss, 1.0)), 0.0)
    return x * inv, inv


@triton.jit
def _unit_rows(x):
    """Zero-safe ``(x * inv, inv)`` of every row of a ``(BLOCK, D_P)`` tile."""
    ss = tl.sum(x * x, axis=1)
    ok = ss > 0.0
    inv = tl.where(ok, 1.0 / tl.sqrt(tl.where(ok, ss, 1.0)), 0.0)
    return x * inv[:, None], inv


@triton.jit
def _unit_grad(u, inv, G):
    """``d f / d x`` of ``f(u(x))`` from ``G = d f / d u`` for one vector."""
    return inv * (G - u * tl.sum(u * G, axis=0))


@triton.jit
def _unit_grad_rows(u, inv, G):
    return inv[:, None] * (G - u * tl.sum(u * G, axis=1)[:, None])


@triton.jit
def _valid(m_ptr, off, ok, HAS_MASK: tl.constexpr):
    """``ok`` and, with a mask, its uint8 entries at ``off`` (1 = valid)."""
    if HAS_MASK:
        ok = ok & (tl.load(m_ptr + off, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _lse_update(m, s, z, valid):
    """One block of an online log-sum-exp over the valid entries of ``z``.

    ``m`` stays finite (``NEG_BIG`` until a valid entry arrives) and ``m <= m_new``,
    so no ``exp`` overflows or sees ``-inf - -inf``; invalid lanes add exactly 0.
    """
    zm = tl.where(valid, z, NEG_BIG)
    m_new = tl.maximum(m, tl.max(zm, axis=0))
    s = s * tl.exp(m - m_new) + tl.sum(tl.where(valid, tl.exp(zm - m_new), 0.0), axis=0)
    return m_new, s


@triton.jit
def _rowdot(u, X):
    """``<u, X_r>`` for a vector ``u (D_P,)`` and every row of ``X (BLOCK, D_P)``."""
    return tl.sum(u[None, :] * X, axis=1)


def _d_pad(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _block(n: int, d_p: int, budget: int) -> int:
    """Rows per tile, a power of two >= 2: at most ``budget`` fp32 elements per
    ``(rows, D_P)`` tile, and no more rows than ``n`` needs."""
    cap = max(2, budget // d_p)
    cap = 1 << (cap.bit_length() - 1)  # round down to a power of two (tl.arange needs one)
    return max(2, min(triton.next_power_of_2(max(n, 1)), cap))


def _num_warps(d_p: int) -> int:
    return 4 if d_p <= 256 else 8


# --------------------------------------------------------------------------- #
# nt_xent
# --------------------------------------------------------------------------- #


@triton.jit
def nt_xent_fwd_kernel(a_ptr, p_ptr, n_ptr, m_ptr, loss_ptr, lse_ptr, K, D, tau,
                       HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr, D_P: tl.constexpr):
    """One anchor row: ``loss = logsumexp([z_p, valid z_k]) - z_p``; saves ``lse``."""
    r = pid64(0)
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    # no `_` before the loop: a name assigned before a loop and again inside it is
    # loop-carried, and its type (scalar here, a block there) must not change
    ua, _a_inv = _unit(_load_vec(a_ptr, r * D, offs_d, d_ok))
    up, _p_inv = _unit(_load_vec(p_ptr, r * D, offs_d, d_ok))
    zp = tl.sum(ua * up, axis=0) / tau
    m = zp
    s = tl.full((), 1.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        un, _ = _unit_rows(_load_rows(n_ptr, (r * K + offs_k) * D, k_ok, offs_d, d_ok))
        valid = _valid(m_ptr, r * K + offs_k, k_ok, HAS_MASK)
        m, s = _lse_update(m, s, _rowdot(ua, un) / tau, valid)
    lse = m + tl.log(s)
    tl.store(loss_ptr + r, lse - zp)
    tl.store(lse_ptr + r, lse)


@triton.jit
def nt_xent_bwd_kernel(g_ptr, g_stride, a_ptr, p_ptr, n_ptr, m_ptr, lse_ptr,
                       da_ptr, dp_ptr, dn_ptr, K, D, tau,
                       HAS_MASK: tl.constexpr, NEED_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, D_P: tl.constexpr):
    """One anchor row: gradients of anchor, positive and (``NEED_N``) negatives."""
    r = pid64(0)
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    gt = tl.load(g_ptr + r * g_stride).to(tl.float32) / tau
    lse = tl.load(lse_ptr + r)
    ua, inva = _unit(_load_vec(a_ptr, r * D, offs_d, d_ok))
    up, invp = _unit(_load_vec(p_ptr, r * D, offs_d, d_ok))
    cp = tl.sum(ua * up, axis=0)
    dcp = gt * (tl.exp(cp / tau - lse) - 1.0)
    Ga = dcp * up
    tl.store(dp_ptr + r * D + offs_d, _unit_grad(up, invp, dcp * ua).to(dp_ptr.dtype.element_ty), mask=d_ok)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        rows = (r * K + offs_k) * D
        un, invn = _unit_rows(_load_rows(n_ptr, rows, k_ok, offs_d, d_ok))
        valid = _valid(m_ptr, r * K + offs_k, k_ok, HAS_MASK)
        ck = _rowdot(ua, un)
        dck = tl.where(valid, gt * tl.exp(ck / tau - lse), 0.0)
        Ga += tl.sum(dck[:, None] * un, axis=0)
        if NEED_N:
            _store_rows(dn_ptr, rows, k_ok, offs_d, d_ok, _unit_grad_rows(un, invn, dck[:, None] * ua[None, :]))
    tl.store(da_ptr + r * D + offs_d, _unit_grad(ua, inva, Ga).to(da_ptr.dtype.element_ty), mask=d_ok)


def _mask_u8(mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if mask is None:
        return like, False  # never read (HAS_MASK=False): any valid pointer
    return mask.to(torch.uint8).contiguous(), True


def _nonempty(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # A zero-size tensor may have a null data pointer; its loops never run anyway.
    return t if t.numel() else like


@on_tensor_device
def nt_xent_forward(anchor, positive, negatives, negatives_mask, tau):
    """Returns ``(loss (P,), lse (P,))`` in fp32."""
    P, D = anchor.shape
    K = negatives.shape[1]
    a, p = anchor.contiguous(), positive.contiguous()
    n = _nonempty(negatives.contiguous(), a)
    m, has_mask = _mask_u8(negatives_mask, a)
    m = _nonempty(m, a)
    loss = torch.empty(P, dtype=torch.float32, device=anchor.device)
    lse = torch.empty(P, dtype=torch.float32, device=anchor.device)
    if P:
        d_p = _d_pad(D)
        nt_xent_fwd_kernel[(P,)](a, p, n, m, loss, lse, K, D, float(tau), HAS_MASK=has_mask,
                                 BLOCK_K=_block(K, d_p, 4096), D_P=d_p, num_warps=_num_warps(d_p))
    return loss, lse


@on_tensor_device
def nt_xent_backward(grad, anchor, positive, negatives, negatives_mask, lse, tau, need_negatives):
    """Returns ``(d_anchor, d_positive, d_negatives)`` in the input dtype (``d_negatives``
    is empty when ``need_negatives`` is False)."""
    P, D = anchor.shape
    K = negatives.shape[1]
    a, p = anchor.contiguous(), positive.contiguous()
    n = _nonempty(negatives.contiguous(), a)
    m, has_mask = _mask_u8(negatives_mask, a)
    m = _nonempty(m, a)
    da, dp = anchor.new_empty((P, D)), positive.new_empty((P, D))
    dn = negatives.new_empty(negatives.shape) if need_negatives else negatives.new_empty(0)
    if grad is None:
        grad = torch.zeros((), dtype=torch.float32, device=anchor.device).expand(P)
    if P:
        d_p = _d_pad(D)
        nt_xent_bwd_kernel[(P,)](grad, grad.stride(0), a, p, n, m, lse.contiguous(), da, dp,
                                 _nonempty(dn, a), K, D, float(tau), HAS_MASK=has_mask,
                                 NEED_N=bool(need_negatives and K), BLOCK_K=_block(K, d_p, 2048),
                                 D_P=d_p, num_warps=_num_warps(d_p))
    return da, dp, dn


# --------------------------------------------------------------------------- #
# triplet
# --------------------------------------------------------------------------- #


@triton.jit
def _triplet_rows(a_ptr, p_ptr, n_ptr, P, D, BLOCK_R: tl.constexpr, D_P: tl.constexpr):
    rows = pid64(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < P
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    off = rows * D
    ua, inva = _unit_rows(_load_rows(a_ptr, off, r_ok, offs_d, d_ok))
    up, invp = _unit_rows(_load_rows(p_ptr, off, r_ok, offs_d, d_ok))
    un, invn = _unit_rows(_load_rows(n_ptr, off, r_ok, offs_d, d_ok))
    cp = tl.sum(ua * up, axis=1)
    cn = tl.sum(ua * un, axis=1)
    return rows, r_ok, offs_d, d_ok, off, ua, inva, up, invp, un, invn, cp, cn


@triton.jit
def triplet_fwd_kernel(a_ptr, p_ptr, n_ptr, loss_ptr, P, D, margin,
                       BLOCK_R: tl.constexpr, D_P: tl.constexpr):
    """``BLOCK_R`` rows: ``max(0, (1 - c(a, p)) - (1 - c(a, n)) + margin)``."""
    rows, r_ok, _, _, _, _, _, _, _, _, _, cp, cn = _triplet_rows(a_ptr, p_ptr, n_ptr, P, D, BLOCK_R, D_P)
    h = (1.0 - cp) - (1.0 - cn) + margin
    tl.store(loss_ptr + rows, tl.maximum(h, 0.0), mask=r_ok)


@triton.jit
def triplet_bwd_kernel(g_ptr, g_stride, a_ptr, p_ptr, n_ptr, da_ptr, dp_ptr, dn_ptr, P, D, margin,
                       BLOCK_R: tl.constexpr, D_P: tl.constexpr):
    """``BLOCK_R`` rows: active hinge -> ``dc_p = -g``, ``dc_n = g``; else 0."""
    rows, r_ok, offs_d, d_ok, off, ua, inva, up, invp, un, invn, cp, cn = _triplet_rows(
        a_ptr, p_ptr, n_ptr, P, D, BLOCK_R, D_P)
    g = tl.load(g_ptr + rows * g_stride, mask=r_ok, other=0.0).to(tl.float32)
    h = (1.0 - cp) - (1.0 - cn) + margin
    dcn = tl.where(h > 0.0, g, 0.0)[:, None]
    dcp = -dcn
    _store_rows(da_ptr, off, r_ok, offs_d, d_ok, _unit_grad_rows(ua, inva, dcp * up + dcn * un))
    _store_rows(dp_ptr, off, r_ok, offs_d, d_ok, _unit_grad_rows(up, invp, dcp * ua))
    _store_rows(dn_ptr, off, r_ok, offs_d, d_ok, _unit_grad_rows(un, invn, dcn * ua))


def _triplet_launch(P: int, D: int):
    d_p = _d_pad(D)
    block_r = _block(P, d_p, 2048)
    return d_p, block_r, (triton.cdiv(P, block_r),)


@on_tensor_device
def triplet_forward(anchor, positive, negative, margin):
    """Returns ``loss (P,)`` in fp32."""
    P, D = anchor.shape
    loss = torch.empty(P, dtype=torch.float32, device=anchor.device)
    if P:
        d_p, block_r, grid = _triplet_launch(P, D)
        triplet_fwd_kernel[grid](anchor.contiguous(), positive.contiguous(), negative.contiguous(), loss,
                                 P, D, float(margin), BLOCK_R=block_r, D_P=d_p, num_warps=_num_warps(d_p))
    return loss


@on_tensor_device
def triplet_backward(grad, anchor, positive, negative, margin):
    """Returns ``(d_anchor, d_positive, d_negative)`` in the input dtype."""
    P, D = anchor.shape
    da, dp, dn = (x.new_empty((P, D)) for x in (anchor, positive, negative))
    if grad is None:
        grad = torch.zeros((), dtype=torch.float32, device=anchor.device).expand(P)
    if P:
        d_p, block_r, grid = _triplet_launch(P, D)
        triplet_bwd_kernel[grid](grad, grad.stride(0), anchor.contiguous(), positive.contiguous(),
                                 negative.contiguous(), da, dp, dn, P, D, float(margin),
                                 BLOCK_R=block_r, D_P=d_p, num_warps=_num_warps(d_p))
    return da, dp, dn


# --------------------------------------------------------------------------- #
# fd_cmdie_contrastive_loss
# --------------------------------------------------------------------------- #


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
