"""Triton kernels of ``nt_xent`` (eq. 9, contract §3.4), forward and fused backward.

``anchor (P, D)``, ``positive (P, D)``, ``negatives (P, K, D)``, ``mask (P, K)``
(uint8, 1 = valid); one program per anchor row, with ``c`` the zero-safe cosine of
``_contrastive_common`` (its notation and numerics hold here)::

    z_p = c(a, p) / tau,  z_k = c(a, n_k) / tau
    lse = logsumexp([z_p, z_k for valid k]),  loss = lse - z_p

The forward streams the negatives in ``BLOCK_K`` tiles with an online
log-sum-exp (started at ``z_p``, so it is always finite) and saves ``lse (P,)``;
the backward is a single pass: ``w = exp(z - lse)``, ``dz_p = g (w_p - 1)``,
``dz_k = g w_k`` (0 for masked k), every ``dc = dz / tau``. Reference:
:func:`msa_fast.ops.reference.nt_xent`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_fast.kernels.triton._common import on_tensor_device, pid64
from msa_fast.kernels.triton._contrastive_common import (
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
    _unit_grad_tile,
    _unit_tile,
    _valid,
)


@triton.jit
def nt_xent_fwd_kernel(a_ptr, p_ptr, n_ptr, m_ptr, loss_ptr, lse_ptr, K, D, tau,
                       HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr, D_P: tl.constexpr):
    """One anchor row: ``loss = logsumexp([z_p, valid z_k]) - z_p``; saves ``lse``."""
    r = pid64(0)
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    # no `_` before the loop: a name assigned before a loop and again inside it is
    # loop-carried, and its type (scalar here, a block there) must not change
    ua, _a_inv = _unit_tile(_load_vec(a_ptr, r * D, offs_d, d_ok))
    up, _p_inv = _unit_tile(_load_vec(p_ptr, r * D, offs_d, d_ok))
    zp = tl.sum(ua * up, axis=0) / tau
    m = zp
    s = tl.full((), 1.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        un, _ = _unit_tile(_load_rows(n_ptr, (r * K + offs_k) * D, k_ok, offs_d, d_ok))
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
    ua, inva = _unit_tile(_load_vec(a_ptr, r * D, offs_d, d_ok))
    up, invp = _unit_tile(_load_vec(p_ptr, r * D, offs_d, d_ok))
    cp = tl.sum(ua * up, axis=0)
    dcp = gt * (tl.exp(cp / tau - lse) - 1.0)
    Ga = dcp * up
    tl.store(dp_ptr + r * D + offs_d, _unit_grad_tile(up, invp, dcp * ua).to(dp_ptr.dtype.element_ty), mask=d_ok)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        rows = (r * K + offs_k) * D
        un, invn = _unit_tile(_load_rows(n_ptr, rows, k_ok, offs_d, d_ok))
        valid = _valid(m_ptr, r * K + offs_k, k_ok, HAS_MASK)
        ck = _rowdot(ua, un)
        dck = tl.where(valid, gt * tl.exp(ck / tau - lse), 0.0)
        Ga += tl.sum(dck[:, None] * un, axis=0)
        if NEED_N:
            _store_rows(dn_ptr, rows, k_ok, offs_d, d_ok, _unit_grad_tile(un, invn, dck[:, None] * ua[None, :]))
    tl.store(da_ptr + r * D + offs_d, _unit_grad_tile(ua, inva, Ga).to(da_ptr.dtype.element_ty), mask=d_ok)


def _nt_prepare(anchor, positive, negatives, negatives_mask):
    a = anchor.contiguous()
    m, has_mask = _mask_u8(negatives_mask, a)
    return a, positive.contiguous(), _nonempty(negatives.contiguous(), a), m, has_mask


@on_tensor_device
def nt_xent_forward(anchor, positive, negatives, negatives_mask, tau):
    """Returns ``(loss (P,), lse (P,))`` in fp32."""
    P, D = anchor.shape
    K = negatives.shape[1]
    a, p, n, m, has_mask = _nt_prepare(anchor, positive, negatives, negatives_mask)
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
    a, p, n, m, has_mask = _nt_prepare(anchor, positive, negatives, negatives_mask)
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
