"""Flash attention in Triton (contract §3.3): online softmax forward, recomputing backward.

``q: (B, H, Lq, Dh)``, ``k, v: (B, H, Lk, Dh)``, optional ``key_padding_mask: (B, Lk)``
(True = ignore), ``out = softmax(q k^T * scale + mask) v``. ``Lq != Lk`` and any
length (masked loads, no multiple-of-block rule); ``Dh`` up to 128 (padded to a
power of two >= 16 for ``tl.dot``).

Numerics:
- Scores are kept in base 2 (``qk * scale * log2(e)`` and ``exp2``), the running max
  and sum in fp32; the forward saves ``lse2 = m + log2(l)`` per query row ``(B, H, Lq)``.
- A query row whose keys are all masked has ``l = 0``: its output is written as 0 and
  its ``lse2`` as ``+inf``, so the backward's ``p = exp2(s - lse2)`` is exactly 0 and
  the row's gradients vanish (never NaN). The running max is replaced by 0 while it
  is ``-inf`` so that ``exp2(-inf - -inf)`` never appears.
- fp32 inputs use IEEE fp32 ``tl.dot`` (no TF32) to meet the 1e-4 tolerance of the
  reference; fp16 / bf16 use tensor cores with fp32 accumulation.
- Backward (FlashAttention-2 style, no atomics): ``delta = rowsum(dO * O)``; one kernel
  per key block accumulates ``dK, dV`` over query blocks, another per query block
  accumulates ``dQ`` over key blocks.
Every tensor, the incoming gradient included, is addressed through its strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_fast.kernels.triton._common import on_tensor_device, pid64

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128  # one (block, Dh) tile per operand; msa_fast/ops/attention.py declares it


@triton.jit
def _load_tile(ptr, b, h, s_b, s_h, s_l, s_d, offs_l, L, offs_d, Dh):
    """A ``(rows, DP)`` tile of one head of a ``(B, H, L, Dh)`` tensor; zeros outside ``L x Dh``."""
    mask = (offs_l < L)[:, None] & (offs_d < Dh)[None, :]
    return tl.load(ptr + b * s_b + h * s_h + offs_l[:, None] * s_l + offs_d[None, :] * s_d, mask=mask, other=0.0)


@triton.jit
def _scores(q, k, kpm_ptr, s_kpm_b, b, offs_n, Lk, qk_scale,
            HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """``q k^T * qk_scale`` (base 2) with out-of-range and padded keys at ``-inf``."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    ok = offs_n < Lk
    if HAS_MASK:
        pad = tl.load(kpm_ptr + b * s_kpm_b + offs_n, mask=ok, other=1)
        ok = ok & (pad == 0)
    return tl.where(ok[None, :], s, float("-inf"))


@triton.jit
def attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, kpm_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sob, soh, som, sod, s_kpm_b,
    H, Lq, Lk, Dh, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(1)  # int32: a block within one (b, h) slice (its offsets stay int32 tiles)
    bh = pid64(0)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < Dh
    m_ok = offs_m < Lq
    q = _load_tile(q_ptr, b, h, sqb, sqh, sqm, sqd, offs_m, Lq, offs_d, Dh)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, DP), dtype=tl.float32)
    for start_n in range(0, Lk, BN):
        offs_n = start_n + tl.arange(0, BN)
        k = _load_tile(k_ptr, b, h, skb, skh, skn, skd, offs_n, Lk, offs_d, Dh)
        v = _load_tile(v_ptr, b, h, svb, svh, svn, svd, offs_n, Lk, offs_d, Dh)
        s = _scores(q, k, kpm_ptr, s_kpm_b, b, offs_n, Lk, qk_scale, HAS_MASK, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out = tl.where(empty[:, None], 0.0, out)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, bh,
                 sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, offs_m, Lq, offs_d, Dh):
    """Q and dO tiles of a query block with their saved LSE (base 2) and delta = rowsum(dO * O).
    Rows past ``Lq`` get LSE = +inf, so their probabilities are exactly 0."""
    m_ok = offs_m < Lq
    q = _load_tile(q_ptr, b, h, sqb, sqh, sqm, sqd, offs_m, Lq, offs_d, Dh)
    do = _load_tile(do_ptr, b, h, sdob, sdoh, sdom, sdod, offs_m, Lq, offs_d, Dh)
    lse = tl.load(lse_ptr + bh * Lq + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh * Lq + offs_m, mask=m_ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, kpm_ptr, s_kpm_b, b, offs_n, Lk,
                       qk_scale, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputed probabilities ``P = exp2(S - lse)`` of one (BM, BN) tile and the score
    gradient ``dS = P * (dO V^T - delta)`` (without the softmax scale)."""
    s = _scores(q, k, kpm_ptr, s_kpm_b, b, offs_n, Lk, qk_scale, HAS_MASK, PRECISION)
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, kpm_ptr, dk_ptr, dv_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod, s_kpm_b,
    H, Lq, Lk, Dh, qk_scale, scale,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(1)  # int32: a block within one (b, h) slice (its offsets stay int32 tiles)
    bh = pid64(0)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < Dh
    n_ok = offs_n < Lk
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = _load_tile(k_ptr, b, h, skb, skh, skn, skd, offs_n, Lk, offs_d, Dh)
    v = _load_tile(v_ptr, b, h, svb, svh, svn, svd, offs_n, Lk, offs_d, Dh)
    dk = tl.zeros((BN, DP), dtype=tl.float32)
    dv = tl.zeros((BN, DP), dtype=tl.float32)
    for start_m in range(0, Lq, BM):
        offs_m = start_m + tl.arange(0, BM)
        q, do, lse, delta = _query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, bh,
                                         sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod,
                                         offs_m, Lq, offs_d, Dh)
        p, ds = _probs_and_dscores(q, k, v, do, lse, delta, kpm_ptr, s_kpm_b, b, offs_n, Lk,
                                   qk_scale, HAS_MASK, PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    # the slice's int64 start on the pointer, the int32 tile of offsets within it
    head = bh * Lk * Dh
    tile = offs_n[:, None] * Dh + offs_d[None, :]
    tl.store(dk_ptr + head + tile, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + head + tile, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, kpm_ptr, dq_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod, s_kpm_b,
    H, Lq, Lk, Dh, qk_scale, scale,
    BM: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(1)  # int32: a block within one (b, h) slice (its offsets stay int32 tiles)
    bh = pid64(0)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < Dh
    m_ok = offs_m < Lq
    q_mask = m_ok[:, None] & d_ok[None, :]
    q, do, lse, delta = _query_block(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, bh,
                                     sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod,
                                     offs_m, Lq, offs_d, Dh)
    dq = tl.zeros((BM, DP), dtype=tl.float32)
    for start_n in range(0, Lk, BN):
        offs_n = start_n + tl.arange(0, BN)
        k = _load_tile(k_ptr, b, h, skb, skh, skn, skd, offs_n, Lk, offs_d, Dh)
        v = _load_tile(v_ptr, b, h, svb, svh, svn, svd, offs_n, Lk, offs_d, Dh)
        _, ds = _probs_and_dscores(q, k, v, do, lse, delta, kpm_ptr, s_kpm_b, b, offs_n, Lk,
                                   qk_scale, HAS_MASK, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + bh * Lq * Dh + (offs_m[:, None] * Dh + offs_d[None, :]),
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


def _config(Dh: int, dtype: torch.dtype) -> tuple[int, int, int, str]:
    """``(BM, BN, DP, precision)``. fp16 / bf16 take tensor-core tiles. fp32 is IEEE
    (FMA, no TF32): each thread then holds whole rows of both ``tl.dot`` operands, so
    its tiles shrink with the head dim until ptxas spills nothing (compile gate)."""
    dp = max(16, triton.next_power_of_2(Dh))
    if dtype == torch.float32:
        return (32, 32, dp, "ieee") if dp <= 32 else (16, 32, dp, "ieee") if dp <= 64 else (16, 16, dp, "ieee")
    if dp <= 64:
        return 64, 64, dp, "tf32"
    return 64, 32, dp, "tf32"


def _mask_arg(q: torch.Tensor, key_padding_mask: torch.Tensor | None):
    if key_padding_mask is None:
        return q, 0, False  # any pointer: never read when HAS_MASK is False
    kpm = key_padding_mask.to(torch.uint8).contiguous()
    return kpm, kpm.stride(0), True


@on_tensor_device
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: torch.Tensor | None, scale: float):
    """Returns ``(out, lse2)``: ``out`` like ``q`` (contiguous), ``lse2: (B, H, Lq)`` fp32."""
    B, H, Lq, Dh = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, Dh), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    bm, bn, dp, precision = _config(Dh, q.dtype)
    kpm, s_kpm, has_mask = _mask_arg(q, key_padding_mask)
    grid = (B * H, triton.cdiv(Lq, bm))  # B*H on x: y and z stop at 65,535
    attention_fwd_kernel[grid](
        q, k, v, out, lse, kpm, *q.stride(), *k.stride(), *v.stride(), *out.stride(), s_kpm,
        H, Lq, Lk, Dh, float(scale) * LOG2E,
        BM=bm, BN=bn, DP=dp, HAS_MASK=has_mask, PRECISION=precision)
    return out, lse


@on_tensor_device
def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor,
                       key_padding_mask: torch.Tensor | None, scale: float):
    """Returns ``(dq, dk, dv)`` (contiguous, dtypes of the inputs)."""
    B, H, Lq, Dh = q.shape
    Lk = k.shape[2]
    dq = torch.empty((B, H, Lq, Dh), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Lk, Dh), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, Lk, Dh), dtype=v.dtype, device=q.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # delta_i = <dO_i, O_i>: the softmax-Jacobian term shared by every key of row i.
    delta = (do.float() * out.float()).sum(-1).contiguous()
    bm, bn, dp, precision = _config(Dh, q.dtype)
    kpm, s_kpm, has_mask = _mask_arg(q, key_padding_mask)
    args = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), s_kpm, H, Lq, Lk, Dh,
            float(scale) * LOG2E, float(scale))
    # dK, dV accumulators and the K, V tiles of 64 keys x 64 dims spill on sm_80 in
    # 16-bit (Triton 3.6): 32 keys per program there
    bn_kv = 32 if q.dtype != torch.float32 and dp >= 64 else bn
    attention_bwd_dkdv_kernel[(B * H, triton.cdiv(Lk, bn_kv))](
        q, k, v, do, lse, delta, kpm, dk, dv, *args,
        BM=bm, BN=bn_kv, DP=dp, HAS_MASK=has_mask, PRECISION=precision)
    attention_bwd_dq_kernel[(B * H, triton.cdiv(Lq, bm))](
        q, k, v, do, lse, delta, kpm, dq, *args,
        BM=bm, BN=bn, DP=dp, HAS_MASK=has_mask, PRECISION=precision)
    return dq, dk, dv
