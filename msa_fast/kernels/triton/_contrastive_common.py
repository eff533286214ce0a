"""Helpers shared by the contrastive-loss kernels (contract §3.4): ``nt_xent.py``,
``triplet.py`` and ``fd_cmdie_contrastive_loss.py`` in this folder.

Notation. ``u(x) = x * inv(x)``, ``inv(x) = 1/||x||`` or 0 for a zero vector (the
zero-safe unit vector of :func:`msa_fast.ops.reference.unit_vectors`), ``c(x, y) =
<u(x), u(y)>``. The gradient of ``f(u(x))`` is ``inv(x) (G - u <u, G>)`` with ``G =
df/du``: exactly 0 at a zero vector (no NaN, as the reference's double ``where``).

Numerics shared by the three losses: every vector is loaded once per pass in its
storage dtype (fp32 / fp16 / bf16), all math in fp32, gradients stored in the input
dtype. A vector counts as zero when its fp32 sum of squares is 0 (the reference's
``||x|| > tiny`` rule: the two agree unless every squared entry underflows fp32,
``|x_i| < ~1e-19``). ``D`` is padded to a power of two ``D_P >= 16`` (masked lanes load
0 and add nothing to a dot product or a norm); one row is held whole in registers, so
the row-block sizes (:func:`_block`) shrink as ``D`` grows. The kernels write *per-row*
fp32 losses; the reduction (``mean`` / ``sum`` / ``none``) and the cast to the input
dtype happen in the op (``msa_fast/ops/contrastive.py``), so its backward hands the
kernels one upstream gradient per row, read through its stride (``loss.mean().backward()``
gives a stride-0 tensor). fp64 is not handled here (the op falls back to the eager
reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG_BIG = tl.constexpr(-1e30)  # finite "no candidate yet" max of an online log-sum-exp



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
def _unit_tile(x):
    """Zero-safe unit vectors and inverse norms along the last axis of a 2-D or 3-D tile."""
    ss = tl.sum(x * x, axis=len(x.shape) - 1)
    ok = ss > 0.0
    inv = tl.where(ok, 1.0 / tl.sqrt(tl.where(ok, ss, 1.0)), 0.0)
    return x * tl.expand_dims(inv, len(x.shape) - 1), inv


@triton.jit
def _unit_grad_tile(u, inv, G):
    """``d f / d x`` of ``f(u(x))`` from ``G = d f / d u``, along the last axis."""
    last: tl.constexpr = len(u.shape) - 1
    return tl.expand_dims(inv, last) * (G - u * tl.expand_dims(tl.sum(u * G, axis=last), last))


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


def _nonempty(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # A zero-size tensor may have a null data pointer; its loops never run anyway.
    return t if t.numel() else like


def _mask_u8(mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(uint8 mask or a stand-in, HAS_MASK)``: a valid, non-empty pointer either way."""
    if mask is None:
        return like, False  # never read (HAS_MASK=False): any valid pointer
    return _nonempty(mask.to(torch.uint8).contiguous(), like), True

