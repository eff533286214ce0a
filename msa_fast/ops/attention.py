"""``attention``: scaled dot-product attention with a key padding mask (SPEC 3.3).

Backends: ``eager`` (:func:`msa_fast.ops.reference.attention`). Fused
implementations register themselves when they land; until then an explicit
``triton`` / ``cpp`` / ``cuda`` request raises ``RuntimeError`` and ``auto`` runs eager.
"""

from __future__ import annotations

import torch

from msa_fast import _backend
from msa_fast.ops import _validate as V
from msa_fast.ops import reference

__all__ = ["attention"]


def _check(q, k, v, key_padding_mask, scale) -> None:
    op = "attention"
    V.tensor(op, "q", q, ndim=4, layout="(B, H, Lq, Dh)")
    b, h, _, dh = q.shape
    V.tensor(op, "k", k, shape=(b, h, None, dh), like=q, layout="(B, H, Lk, Dh)")
    V.tensor(op, "v", v, shape=k.shape, like=q, layout="(B, H, Lk, Dh) like k")
    V.mask(op, "key_padding_mask", key_padding_mask, (b, k.shape[2]), q.device)
    if scale is not None:
        V.positive_float(op, "scale", scale)


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
    (True = ignore), ``scale`` defaults to ``Dh ** -0.5``. A query with every key
    masked outputs zeros (zero gradient, never NaN); elsewhere equal to
    ``torch.nn.functional.scaled_dot_product_attention``.
    """
    _check(q, k, v, key_padding_mask, scale)
    name = _backend.resolve("attention", backend, q.device)
    if name == "eager":
        return reference.attention(q, k, v, key_padding_mask, scale)
    raise RuntimeError(f"attention: backend {name!r} has no implementation wired in")
