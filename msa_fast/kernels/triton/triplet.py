"""Triton kernels of ``triplet`` (eq. 10-11, contract §3.4), forward and fused backward.

``anchor, positive, negative (P, D)``; one program per block of ``BLOCK_R`` rows, with
``c`` the zero-safe cosine of ``_contrastive_common`` (its notation and numerics hold
here)::

    loss = max(0, (1 - c(a, p)) - (1 - c(a, n)) + margin)

with the hinge's gradient taken as ``h > 0`` (torch.relu's convention at 0).
Reference: :func:`msa_fast.ops.reference.triplet`.
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
    _num_warps,
    _store_rows,
    _unit_grad_tile,
    _unit_tile,
)


@triton.jit
def _triplet_rows(a_ptr, p_ptr, n_ptr, P, D, BLOCK_R: tl.constexpr, D_P: tl.constexpr):
    rows = pid64(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < P
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    off = rows * D
    ua, inva = _unit_tile(_load_rows(a_ptr, off, r_ok, offs_d, d_ok))
    up, invp = _unit_tile(_load_rows(p_ptr, off, r_ok, offs_d, d_ok))
    un, invn = _unit_tile(_load_rows(n_ptr, off, r_ok, offs_d, d_ok))
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
    _store_rows(da_ptr, off, r_ok, offs_d, d_ok, _unit_grad_tile(ua, inva, dcp * up + dcn * un))
    _store_rows(dp_ptr, off, r_ok, offs_d, d_ok, _unit_grad_tile(up, invp, dcp * ua))
    _store_rows(dn_ptr, off, r_ok, offs_d, d_ok, _unit_grad_tile(un, invn, dcn * ua))


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
