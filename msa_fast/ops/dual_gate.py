"""``dual_gate``: AGFN entropy gate + importance gate (SPEC 3.1), validated and dispatched.

Backends: ``eager`` (:func:`msa_fast.ops.reference.dual_gate`). Fused Triton / C++
implementations register themselves with :func:`msa_fast._backend.register` when
they land; until then an explicit ``triton`` / ``cpp`` / ``cuda`` request raises
``RuntimeError`` and ``auto`` runs eager.
"""

from __future__ import annotations

import torch

from msa_fast import _backend
from msa_fast.ops import _validate as V
from msa_fast.ops import reference

__all__ = ["dual_gate"]


def _check(h, w_z, b_z, g_logits, tau) -> None:
    op = "dual_gate"
    V.tensor(op, "h", h, min_ndim=2, layout="(..., M, D)")
    m, d = h.shape[-2:]
    V.tensor(op, "w_z", w_z, shape=(m, d), like=h, layout="(M, D)")
    V.tensor(op, "b_z", b_z, shape=(m,), like=h, layout="(M,)")
    V.tensor(op, "g_logits", g_logits, shape=(*h.shape[:-2], m), like=h, layout="(..., M)")
    V.positive_float(op, "tau", tau)


def dual_gate(
    h: torch.Tensor,
    w_z: torch.Tensor,
    b_z: torch.Tensor,
    g_logits: torch.Tensor,
    tau: float = 1.0,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy-gated sum and importance-gated concatenation of M modality vectors.

    ``h: (..., M, D)``, ``w_z: (M, D)``, ``b_z: (M,)``, ``g_logits: (..., M)``, ``tau > 0``.
    Returns ``(h_ent (..., D), h_imp_in (..., M*D), e (..., M), g (..., M))``; see
    :func:`msa_fast.ops.reference.dual_gate` for the exact formulas.
    """
    _check(h, w_z, b_z, g_logits, tau)
    name = _backend.resolve("dual_gate", backend, h.device)
    if name == "eager":
        return reference.dual_gate(h, w_z, b_z, g_logits, tau)
    raise RuntimeError(f"dual_gate: backend {name!r} has no implementation wired in")
