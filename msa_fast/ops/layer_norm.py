"""``add_layer_norm``: ``LayerNorm(x + residual)`` (the residual + LNorm of FD-CMDIE eq. 13-22).

Backends: ``eager`` (:func:`msa_fast.ops.reference.add_layer_norm`). Fused
implementations register themselves when they land; until then an explicit
``triton`` / ``cpp`` / ``cuda`` request raises ``RuntimeError`` and ``auto`` runs eager.
"""

from __future__ import annotations

import torch

from msa_fast import _backend
from msa_fast.ops import _validate as V
from msa_fast.ops import reference

__all__ = ["add_layer_norm"]


def _check(x, residual, weight, bias, eps) -> None:
    op = "add_layer_norm"
    V.tensor(op, "x", x, min_ndim=1, layout="(..., d)")
    d = x.shape[-1]
    V.tensor(op, "residual", residual, shape=x.shape, like=x, layout="(..., d) like x")
    V.tensor(op, "weight", weight, shape=(d,), like=x, layout="(d,)")
    V.tensor(op, "bias", bias, shape=(d,), like=x, layout="(d,)")
    V.positive_float(op, "eps", eps)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``LayerNorm(x + residual)`` over the last dim: ``x, residual: (..., d)``, ``weight, bias: (d,)``."""
    _check(x, residual, weight, bias, eps)
    name = _backend.resolve("add_layer_norm", backend, x.device)
    if name == "eager":
        return reference.add_layer_norm(x, residual, weight, bias, eps)
    raise RuntimeError(f"add_layer_norm: backend {name!r} has no implementation wired in")
