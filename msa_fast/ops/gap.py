"""``gated_attention_pool``: GAP, FD-CMDIE eq. 25-29 (SPEC 3.2), validated and dispatched.

Backends: ``eager`` (:func:`msa_fast.ops.reference.gated_attention_pool`). Fused
implementations register themselves when they land; until then an explicit
``triton`` / ``cpp`` / ``cuda`` request raises ``RuntimeError`` and ``auto`` runs eager.
"""

from __future__ import annotations

import torch

from msa_fast import _backend
from msa_fast.ops import _validate as V
from msa_fast.ops import reference

__all__ = ["gated_attention_pool"]


def _check(x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a, mask, eps) -> None:
    op = "gated_attention_pool"
    V.tensor(op, "x", x, ndim=4, layout="(M, B, L, d)")
    m, b, seq, d = x.shape
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


def gated_attention_pool(
    x: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    W1g: torch.Tensor,
    b1g: torch.Tensor,
    w2g: torch.Tensor,
    b2g: torch.Tensor,
    W1a: torch.Tensor,
    b1a: torch.Tensor,
    w2a: torch.Tensor,
    b2a: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool M sequences ``x: (M, B, L, d)`` into one ``(B, L, d)`` by gate and attention.

    Returns ``(out (B, L, d), alpha (M, B, L), g (M, B, L))``; padded positions
    (``mask: (B, L)`` True) are 0 in all three. Parameter shapes and formulas: see
    :func:`msa_fast.ops.reference.gated_attention_pool`.
    """
    _check(x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a, mask, eps)
    name = _backend.resolve("gated_attention_pool", backend, x.device)
    if name == "eager":
        return reference.gated_attention_pool(x, ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a, mask, eps)
    raise RuntimeError(f"gated_attention_pool: backend {name!r} has no implementation wired in")
