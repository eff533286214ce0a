"""``gated_attention_pool``: GAP, FD-CMDIE eq. 25-29 (contract §3.2), validated and dispatched.

Backends: ``eager`` (:func:`msa_fast.ops.reference.gated_attention_pool`) and
``triton`` (``msa_fast/kernels/triton/gap.py``: row-local Triton kernels around
the hidden-layer GEMMs, forward and a recomputing backward), registered as
``torch.ops.msa_fast.gated_attention_pool_triton`` with a fake kernel and autograd.
The Triton path takes ``d, h, ha <= 2048``.
"""

from __future__ import annotations

import torch

from msa_fast import _backend
from msa_fast.ops import _validate as V
from msa_fast.ops import reference

_W = torch.Tensor


@torch.library.custom_op("msa_fast::gated_attention_pool_triton", mutates_args=())
def _gap_triton(x: _W, ln_w: _W, ln_b: _W, W1g: _W, b1g: _W, w2g: _W, b2g: _W, W1a: _W, b1a: _W,
                w2a: _W, b2a: _W, mask: _W | None, eps: float) -> tuple[_W, _W, _W]:
    from msa_fast.kernels.triton.gap import gap_forward

    return gap_forward(x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a, mask, eps)


@_gap_triton.register_fake
def _(x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a, mask, eps):
    m, b, length, d = x.shape
    return x.new_empty((b, length, d)), x.new_empty((m, b, length)), x.new_empty((m, b, length))


@torch.library.custom_op("msa_fast::gated_attention_pool_triton_backward", mutates_args=())
def _gap_triton_backward(dout: _W | None, dalpha: _W | None, dg: _W | None, x: _W, ln_w: _W, ln_b: _W,
                         W1g: _W, b1g: _W, w2g: _W, b2g: _W, W1a: _W, b1a: _W, w2a: _W, b2a: _W,
                         mask: _W | None, eps: float) -> tuple[_W, _W, _W, _W, _W, _W, _W, _W, _W, _W, _W]:
    from msa_fast.kernels.triton.gap import gap_backward

    return gap_backward(dout, dalpha, dg, x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a, mask, eps)


@_gap_triton_backward.register_fake
def _(dout, dalpha, dg, *inputs_mask_eps):
    return tuple(torch.empty_like(t) for t in inputs_mask_eps[:11])


def _setup_context(ctx, inputs, output):
    *tensors, mask, eps = inputs
    ctx.save_for_backward(*tensors, mask)
    ctx.eps = eps


def _backward(ctx, dout, dalpha, dg):
    *tensors, mask = ctx.saved_tensors
    return (*_gap_triton_backward(dout, dalpha, dg, *tensors, mask, ctx.eps), None, None)


_gap_triton.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["gated_attention_pool"]


def _check(x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a, mask, eps) -> None:
    op = "gated_attention_pool"
    V.tensor(op, "x", x, ndim=4, layout="(M, B, L, d)")
    m, b, seq, d = x.shape
    V.min_size(op, "x", x, 0, "M", "(M, B, L, d)")  # no sequence to pool
    V.min_size(op, "x", x, 3, "d", "(M, B, L, d)")  # a LayerNorm over no feature has no mean
    V.tensor(op, "ln_w", ln_w, shape=(m, d), like=x, layout="(M, d)")
    V.tensor(op, "ln_b", ln_b, shape=(m, d), like=x, layout="(M, d)")
    V.tensor(op, "W1g", W1g, shape=(m, None, d), like=x, layout="(M, h, d)")
    h = W1g.shape[1]
    V.tensor(op, "b1g", b1g, shape=(m, h), like=x, layout="(M, h)")
    V.tensor(op, "w2g", w2g, shape=(m, h), like=x, layout="(M, h)")
    V.tensor(op, "b2g", b2g, shape=(m,), like=x, layout="(M,)")
    V.tensor(op, "W1a", W1a, shape=(None, d), like=x, layout="(ha, d)")
    ha = W1a.shape[0]
    V.tensor(op, "b1a", b1a, shape=(ha,), like=x, layout="(ha,)")
    V.tensor(op, "w2a", w2a, shape=(ha,), like=x, layout="(ha,)")
    V.tensor(op, "b2a", b2a, shape=(), like=x, layout="() scalar")
    V.mask(op, "mask", mask, (b, seq), x.device)
    V.positive_float(op, "eps", eps)


def _width_limit(x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, *_rest) -> str | None:
    d, h, ha = x.shape[-1], W1g.shape[1], W1a.shape[0]
    if max(d, h, ha) > 2048:  # kernels/triton/gap.py: MAX_WIDTH (a tile of one row)
        return f"takes d, h, ha <= 2048, got d={d}, h={h}, ha={ha}"
    return None


_SPEC = _backend.declare(_backend.OpSpec(
    "gated_attention_pool", reference.gated_attention_pool, _check, compile=True,
    fused=(_backend.Fused("triton", lambda *a: _gap_triton(*a[:-1], float(a[-1])), limit=_width_limit,
                          limit_doc="d, h, ha <= 2048"),),
))


gated_attention_pool = _backend.public_op(_SPEC, __name__, """Pool M sequences ``x: (M, B, L, d)`` into one ``(B, L, d)`` by gate and attention.

    ``M, d >= 1`` (``B``, ``L`` and the hidden widths may be 0). Returns
    ``(out (B, L, d), alpha (M, B, L), g (M, B, L))``; padded positions
    (``mask: (B, L)`` True) are 0 in all three. Parameter shapes and formulas: see
    :func:`msa_fast.ops.reference.gated_attention_pool`.
    """)
