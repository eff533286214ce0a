"""``add_layer_norm``: ``LayerNorm(x + residual)`` (the residual + LNorm of FD-CMDIE eq. 13-22).

Backends: ``eager`` (:func:`msa_fast.ops.reference.add_layer_norm`) and ``triton``
(``msa_fast/kernels/triton/layer_norm.py``), registered as
``torch.ops.msa_fast.add_layer_norm_triton`` with a fake kernel and autograd.
"""

from __future__ import annotations

import torch

from msa_fast import _backend
from msa_fast.ops import _validate as V
from msa_fast.ops import reference


@torch.library.custom_op("msa_fast::add_layer_norm_triton", mutates_args=())
def _add_layer_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from msa_fast.kernels.triton.layer_norm import add_layer_norm_forward

    return add_layer_norm_forward(x, residual, weight, bias, eps)


@_add_layer_norm_triton.register_fake
def _(x, residual, weight, bias, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats = x.new_empty((rows,), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("msa_fast::add_layer_norm_triton_backward", mutates_args=())
def _add_layer_norm_triton_backward(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                                    weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from msa_fast.kernels.triton.layer_norm import add_layer_norm_backward

    return add_layer_norm_backward(dy, x, residual, weight, mean, rstd)


@_add_layer_norm_triton_backward.register_fake
def _(dy, x, residual, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, residual, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _add_layer_norm_triton_backward(dy, x, residual, weight, mean, rstd)
    # d(x + residual) is the same for both summands
    return dx, dx, dw, db, None


_add_layer_norm_triton.register_autograd(_backward, setup_context=_setup_context)

__all__ = ["add_layer_norm"]


def _check(x, residual, weight, bias, eps) -> None:
    op = "add_layer_norm"
    V.tensor(op, "x", x, min_ndim=1, layout="(..., d)")
    V.min_size(op, "x", x, -1, "d", "(..., d)")  # a LayerNorm over no feature has no mean
    d = x.shape[-1]
    V.tensor(op, "residual", residual, shape=x.shape, like=x, layout="(..., d) like x")
    V.tensor(op, "weight", weight, shape=(d,), like=x, layout="(d,)")
    V.tensor(op, "bias", bias, shape=(d,), like=x, layout="(d,)")
    V.positive_float(op, "eps", eps)


# kernels/triton/layer_norm.py holds one row of d in registers (4 warps, next power of two):
# wider rows spill. Beyond it ``auto`` takes the next backend; tools/compile_gate.py
# compiles d = MAX_WIDTH (its "limit_*" shapes).
MAX_WIDTH = 2048


_SPEC = _backend.declare(_backend.OpSpec(
    "add_layer_norm", reference.add_layer_norm, _check, compile=True,
    fused=(_backend.Fused("triton", lambda x, residual, weight, bias, eps: _add_layer_norm_triton(
        x, residual, weight, bias, float(eps))[0], **_backend.width_limit(MAX_WIDTH, "d", "one row in registers")),),
))


add_layer_norm = _backend.public_op(_SPEC, __name__, """``LayerNorm(x + residual)`` over the last dim: ``x, residual: (..., d)``, ``weight, bias: (d,)``.

    ``d >= 1`` and ``eps`` a finite float > 0 (``ValueError`` otherwise); leading dims may be 0.
    """)
