"""``dual_gate``: AGFN entropy gate + importance gate (contract §3.1), validated and dispatched.

Backends: ``eager`` (:func:`msa_fast.ops.reference.dual_gate`) and ``triton``
(``msa_fast/kernels/triton/dual_gate.py``: one-pass forward, one-pass fused
backward into ``h, u, w_z, b_z, g_logits``), registered as
``torch.ops.msa_fast.dual_gate_triton`` with a fake kernel and autograd so that it
traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from msa_fast import _backend
from msa_fast.ops import _validate as V
from msa_fast.ops import reference

__all__ = ["dual_gate"]

_Out = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("msa_fast::dual_gate_triton", mutates_args=())
def _dual_gate_triton(h: torch.Tensor, u: torch.Tensor, w_z: torch.Tensor, b_z: torch.Tensor,
                      g_logits: torch.Tensor, tau: float) -> _Out:
    from msa_fast.kernels.triton.dual_gate import dual_gate_forward

    return dual_gate_forward(h, u, w_z, b_z, g_logits, tau)


@_dual_gate_triton.register_fake
def _(h, u, w_z, b_z, g_logits, tau):
    *lead, m, d = h.shape
    return (h.new_empty((*lead, d)), h.new_empty((*lead, m * d)), h.new_empty((*lead, m)),
            h.new_empty((*lead, m)), h.new_empty((*lead, m)))


@torch.library.custom_op("msa_fast::dual_gate_triton_backward", mutates_args=())
def _dual_gate_triton_backward(
    h: torch.Tensor, u: torch.Tensor, w_z: torch.Tensor, b_z: torch.Tensor, g_logits: torch.Tensor, tau: float,
    d_hent: torch.Tensor | None, d_himp: torch.Tensor | None, d_e: torch.Tensor | None,
    d_g: torch.Tensor | None, d_ent: torch.Tensor | None,
) -> _Out:
    from msa_fast.kernels.triton.dual_gate import dual_gate_backward

    return dual_gate_backward(h, u, w_z, b_z, g_logits, tau, d_hent, d_himp, d_e, d_g, d_ent)


@_dual_gate_triton_backward.register_fake
def _(h, u, w_z, b_z, g_logits, tau, d_hent, d_himp, d_e, d_g, d_ent):
    return (torch.empty_like(h), torch.empty_like(u), torch.empty_like(w_z), torch.empty_like(b_z),
            torch.empty_like(g_logits))


def _setup_context(ctx, inputs, output):
    h, u, w_z, b_z, g_logits, tau = inputs
    ctx.save_for_backward(h, u, w_z, b_z, g_logits)
    ctx.tau = tau


def _backward(ctx, d_hent, d_himp, d_e, d_g, d_ent):
    h, u, w_z, b_z, g_logits = ctx.saved_tensors
    grads = _dual_gate_triton_backward(h, u, w_z, b_z, g_logits, ctx.tau, d_hent, d_himp, d_e, d_g, d_ent)
    return (*grads, None)


_dual_gate_triton.register_autograd(_backward, setup_context=_setup_context)


def _check(h, u, w_z, b_z, g_logits, tau) -> None:
    op = "dual_gate"
    V.tensor(op, "h", h, min_ndim=2, layout="(..., M, D)")
    m, d = h.shape[-2:]
    V.min_size(op, "h", h, -2, "M", "(..., M, D)")  # no modality: nothing to fuse
    V.min_size(op, "h", h, -1, "D", "(..., M, D)")  # no feature: nothing to fuse
    # u's leading dims and M are h's; C is free (C = 1: H = 0, see the reference)
    V.tensor(op, "u", u, shape=(*h.shape[:-1], None), like=h, layout="(..., M, C) with h's (..., M)")
    V.min_size(op, "u", u, -1, "C", "(..., M, C)")  # no class: no distribution
    V.tensor(op, "w_z", w_z, shape=(m, d), like=h, layout="(M, D)")
    V.tensor(op, "b_z", b_z, shape=(m,), like=h, layout="(M,)")
    V.tensor(op, "g_logits", g_logits, shape=(*h.shape[:-2], m), like=h, layout="(..., M)")
    V.positive_float(op, "tau", tau)


# kernels/triton/dual_gate.py holds a row's (M, D) and (M, C) tiles, padded to powers of two,
# in registers (16 warps from 4096 elements in the backward): larger tiles spill. Beyond it
# ``auto`` takes the next backend; tools/compile_gate.py compiles the limit's shapes.
MAX_TILE = 4096


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _tile_limit(h, u, *_rest) -> str | None:
    m, d = h.shape[-2:]
    c = u.shape[-1]
    if _pow2(m) * max(_pow2(d), _pow2(c)) > MAX_TILE:
        return (f"takes pow2(M) * max(pow2(D), pow2(C)) <= {MAX_TILE} (a row's tiles in registers), "
                f"got M={m}, D={d}, C={c}")
    return None


_SPEC = _backend.declare(_backend.OpSpec(
    "dual_gate", reference.dual_gate, _check, compile=True,
    fused=(_backend.Fused("triton", lambda h, u, w_z, b_z, g_logits, tau: _dual_gate_triton(
        h, u, w_z, b_z, g_logits, float(tau)), limit=_tile_limit,
        limit_doc=f"pow2(M) * max(pow2(D), pow2(C)) <= {MAX_TILE}"),),
))


dual_gate = _backend.public_op(_SPEC, __name__, """Entropy-gated sum and importance-gated concatenation of M modality vectors.

    ``h: (..., M, D)`` (``M, D >= 1``), ``u: (..., M, C)`` the entropy logits (same
    leading dims and M as ``h``, ``C >= 1``; ``C = 1`` gives ``H = 0``), ``w_z: (M, D)``,
    ``b_z: (M,)``, ``g_logits: (..., M)``, ``tau`` a finite float > 0.
    Returns ``(h_ent (..., D), h_imp_in (..., M*D), e (..., M), g (..., M), H (..., M))``
    with ``H`` the normalised entropy of ``softmax(u)`` in [0, 1] and
    ``e = softmax_m(z - H / tau)``; see :func:`msa_fast.ops.reference.dual_gate` for
    the exact formulas. Differentiable in ``h, u, w_z, b_z, g_logits``.
    """)
