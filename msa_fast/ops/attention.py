"""``attention``: scaled dot-product attention with a key padding mask (SPEC 3.3).

Backends: ``eager`` (:func:`msa_fast.ops.reference.attention`) and ``triton``
(``msa_fast/kernels/triton/attention.py``: flash attention, online softmax, LSE saved,
recomputing backward), registered as ``torch.ops.msa_fast.attention_triton`` with a
fake kernel and autograd.
"""

from __future__ import annotations

import torch

from msa_fast import _backend
from msa_fast.ops import _validate as V
from msa_fast.ops import reference


@torch.library.custom_op("msa_fast::attention_triton", mutates_args=())
def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from msa_fast.kernels.triton.attention import attention_forward

    return attention_forward(q, k, v, key_padding_mask, scale)


@_attention_triton.register_fake
def _(q, k, v, key_padding_mask, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("msa_fast::attention_triton_backward", mutates_args=())
def _attention_triton_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, key_padding_mask: torch.Tensor | None,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from msa_fast.kernels.triton.attention import attention_backward

    return attention_backward(do, q, k, v, out, lse, key_padding_mask, scale)


@_attention_triton_backward.register_fake
def _(do, q, k, v, out, lse, key_padding_mask, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _attention_triton_backward(dout, q, k, v, out, lse, key_padding_mask, ctx.scale)
    return dq, dk, dv, None, None


_attention_triton.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["attention"]


def _check(q, k, v, key_padding_mask, scale) -> None:
    op = "attention"
    V.tensor(op, "q", q, ndim=4, layout="(B, H, Lq, Dh)")
    b, h, _, dh = q.shape
    V.tensor(op, "k", k, shape=(b, h, None, dh), like=q, layout="(B, H, Lk, Dh)")
    V.tensor(op, "v", v, shape=k.shape, like=q, layout="(B, H, Lk, Dh) like k")
    V.mask(op, "key_padding_mask", key_padding_mask, (b, k.shape[2]), q.device)
    # No key at all (Lk = 0) has no softmax, and Dh = 0 no default scale Dh ** -0.5: both
    # are errors, not an all-masked row (which has keys, all ignored, and outputs 0).
    V.min_size(op, "k", k, 2, "Lk", "(B, H, Lk, Dh)")
    V.min_size(op, "q", q, 3, "Dh", "(B, H, Lq, Dh)")
    if scale is not None:
        V.positive_float(op, "scale", scale)


def _head_limit(q, *_args) -> str | None:
    if q.shape[-1] > 128:  # one (block, Dh) tile per operand
        return f"supports head dims up to 128, got Dh={q.shape[-1]}"
    return None


def _run_triton(q, k, v, key_padding_mask, scale):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention_triton(q, k, v, key_padding_mask, scale)[0]


_SPEC = _backend.declare(_backend.OpSpec(
    "attention", reference.attention, _check,
    fused=(_backend.Fused("triton", _run_triton, limit=_head_limit, limit_doc="Dh <= 128"),),
))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over unmasked keys -> ``(B, H, Lq, Dh)``.

    ``q: (B, H, Lq, Dh)``, ``k, v: (B, H, Lk, Dh)``, ``key_padding_mask: (B, Lk)`` bool
    (True = ignore), ``scale`` (a finite float > 0) defaults to ``Dh ** -0.5``;
    ``Lk >= 1`` and ``Dh >= 1`` (``ValueError`` otherwise; ``B``, ``H``, ``Lq`` may be 0). A query with every key
    masked outputs zeros (zero gradient, never NaN); elsewhere equal to
    ``torch.nn.functional.scaled_dot_product_attention``.
    """
    return _backend.dispatch(_SPEC, (q, k, v, key_padding_mask, scale), backend)
