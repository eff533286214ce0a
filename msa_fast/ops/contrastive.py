"""Contrastive losses of FD-CMDIE (eq. 9-12, contract §3.4), validated and dispatched.

``nt_xent`` (eq. 9), ``triplet`` (eq. 10-11) and ``fd_cmdie_contrastive_loss``
(the pair sets P^i, N^i of section 2.3.2 and eq. 12). The math, shapes and numeric
choices are documented on the functions of :mod:`msa_fast.ops.reference`.

Backends:

* ``eager`` -- the reference, autograd by PyTorch, any device and dtype, traceable
  by ``torch.compile``. The CPU always uses it under ``auto``: no ``cpp`` kernel
  exists (the reference is a handful of batched einsums / log-sum-exps; a fused
  CPU kernel was neither written nor measured, so none is registered).
* ``triton`` -- ``msa_fast/kernels/triton/{nt_xent,triplet,fd_cmdie_contrastive_loss}.py``
  (one file per loss, helpers in ``_contrastive_common.py``): one forward kernel and
  one fused backward kernel per loss (fp32 math, fp16 / bf16 / fp32 inputs),
  registered as ``torch.ops.msa_fast.{nt_xent,triplet,fd_cmdie_contrastive_loss}_triton``
  (+ ``_backward``) with fake kernels and autograd, so they trace under
  ``torch.compile(fullgraph=True)``. The kernels return per-row fp32 losses; the
  ``reduction`` and the cast to the input dtype are done here, as in the
  reference. Partner / negative gradients are skipped when those inputs do not
  require grad (the memory-bank setting). fp64 inputs are not handled by the
  kernels: ``auto`` uses the eager reference for them, an explicit ``"triton"``
  raises ``RuntimeError``.

Zero rows: every ``reduction="mean"`` of zero rows (``P = 0`` / ``B = 0``: a batch
without pairs) is 0, not the NaN of ``0 / 0``, and its backward gives zero gradients
(contract §10; ``_common.reduce_loss``), on every backend.

``auto`` on CUDA tensors: triton, else eager; on the CPU: eager (Triton runs there
only interpreted, with ``TRITON_INTERPRET=1``, for the tests).
"""

from __future__ import annotations

import math

import torch

from msa_fast import _backend
from msa_fast.ops import _common as pairs
from msa_fast.ops import _validate as V
from msa_fast.ops import reference
from msa_fast.ops._common import reduce_loss

__all__ = ["fd_cmdie_contrastive_loss", "nt_xent", "triplet"]

_T = torch.Tensor


def _grad_like(needed: bool, g: _T | None) -> _T | None:
    return g if needed else None


# --------------------------------------------------------------------------- #
# Registered Triton ops (per-row fp32 losses; the reduction is done by the caller)
# --------------------------------------------------------------------------- #


@torch.library.custom_op("msa_fast::nt_xent_triton", mutates_args=())
def _nt_xent_triton(anchor: _T, positive: _T, negatives: _T, negatives_mask: _T | None,
                    tau: float) -> tuple[_T, _T]:
    from msa_fast.kernels.triton.nt_xent import nt_xent_forward

    return nt_xent_forward(anchor, positive, negatives, negatives_mask, tau)


@_nt_xent_triton.register_fake
def _(anchor, positive, negatives, negatives_mask, tau):
    p = anchor.shape[0]
    return anchor.new_empty((p,), dtype=torch.float32), anchor.new_empty((p,), dtype=torch.float32)


@torch.library.custom_op("msa_fast::nt_xent_triton_backward", mutates_args=())
def _nt_xent_triton_backward(grad: _T | None, anchor: _T, positive: _T, negatives: _T, negatives_mask: _T | None,
                             lse: _T, tau: float, need_negatives: bool) -> tuple[_T, _T, _T]:
    from msa_fast.kernels.triton.nt_xent import nt_xent_backward

    return nt_xent_backward(grad, anchor, positive, negatives, negatives_mask, lse, tau, need_negatives)


@_nt_xent_triton_backward.register_fake
def _(grad, anchor, positive, negatives, negatives_mask, lse, tau, need_negatives):
    dn = negatives.new_empty(negatives.shape) if need_negatives else negatives.new_empty(0)
    return anchor.new_empty(anchor.shape), positive.new_empty(positive.shape), dn


def _nt_xent_setup(ctx, inputs, output):
    anchor, positive, negatives, negatives_mask, tau = inputs
    ctx.save_for_backward(anchor, positive, negatives, negatives_mask, output[1])
    ctx.tau = tau
    ctx.mark_non_differentiable(output[1])


def _nt_xent_backward(ctx, d_loss, _d_lse):
    anchor, positive, negatives, negatives_mask, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    da, dp, dn = _nt_xent_triton_backward(d_loss, anchor, positive, negatives, negatives_mask, lse, ctx.tau,
                                          bool(need[2]))
    return da, dp, _grad_like(need[2], dn), None, None


_nt_xent_triton.register_autograd(_nt_xent_backward, setup_context=_nt_xent_setup)


@torch.library.custom_op("msa_fast::triplet_triton", mutates_args=())
def _triplet_triton(anchor: _T, positive: _T, negative: _T, margin: float) -> _T:
    from msa_fast.kernels.triton.triplet import triplet_forward

    return triplet_forward(anchor, positive, negative, margin)


@_triplet_triton.register_fake
def _(anchor, positive, negative, margin):
    return anchor.new_empty((anchor.shape[0],), dtype=torch.float32)


@torch.library.custom_op("msa_fast::triplet_triton_backward", mutates_args=())
def _triplet_triton_backward(grad: _T | None, anchor: _T, positive: _T, negative: _T,
                             margin: float) -> tuple[_T, _T, _T]:
    from msa_fast.kernels.triton.triplet import triplet_backward

    return triplet_backward(grad, anchor, positive, negative, margin)


@_triplet_triton_backward.register_fake
def _(grad, anchor, positive, negative, margin):
    return tuple(x.new_empty(x.shape) for x in (anchor, positive, negative))


def _triplet_setup(ctx, inputs, output):
    anchor, positive, negative, margin = inputs
    ctx.save_for_backward(anchor, positive, negative)
    ctx.margin = margin


def _triplet_backward(ctx, d_loss):
    return (*_triplet_triton_backward(d_loss, *ctx.saved_tensors, ctx.margin), None)


_triplet_triton.register_autograd(_triplet_backward, setup_context=_triplet_setup)


def fd_cmdie_pair_masks() -> dict:
    """The pair table of :mod:`msa_fast.ops._common` (read now, through
    :func:`~msa_fast.ops._common.fd_cmdie_table`, as the reference reads it) as the Triton
    kernels' constexprs: bit masks over the modality rows t, a, v -- ``POS_IN`` (Positive_in
    among the similarity rows), ``NEG_IN`` (Negative_in among the dissimilarity rows),
    ``INTER`` (the inter-sample rows), ``TRI`` over ``positive * 4 + negative`` (4 = the
    kernels' padded modality rows) -- and ``N_POS_IN``, the number of Positive_in pairs."""
    pos, neg, tri, inter = pairs.fd_cmdie_table()
    sim, diff = (pairs.T_S, pairs.A_S, pairs.V_S), (pairs.T_D, pairs.A_D, pairs.V_D)
    bits = lambda idx: sum(1 << k for k in idx)  # noqa: E731
    return dict(POS_IN=bits(sim.index(c) for c in pos), NEG_IN=bits(diff.index(c) for c in neg),
                TRI=bits(sim.index(p) * 4 + diff.index(n) for _, p, n in tri),
                INTER=bits(sim.index(c) for c in inter), N_POS_IN=len(pos))


@torch.library.custom_op("msa_fast::fd_cmdie_contrastive_loss_triton", mutates_args=())
def _fd_cmdie_triton(sim_feats: _T, diff_feats: _T, pos_partner_feats: _T, neg_partner_feats: _T,
                     pos_partner_mask: _T | None, neg_partner_mask: _T | None, tau: float, margin: float,
                     lambda_tri: float) -> tuple[_T, _T]:
    from msa_fast.kernels.triton.fd_cmdie_contrastive_loss import fd_cmdie_forward

    return fd_cmdie_forward(sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask,
                            neg_partner_mask, tau, margin, lambda_tri, fd_cmdie_pair_masks())


@_fd_cmdie_triton.register_fake
def _(sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask, neg_partner_mask, tau,
      margin, lambda_tri):
    b = sim_feats.shape[0]
    return sim_feats.new_empty((b,), dtype=torch.float32), sim_feats.new_empty((b, 4), dtype=torch.float32)


@torch.library.custom_op("msa_fast::fd_cmdie_contrastive_loss_triton_backward", mutates_args=())
def _fd_cmdie_triton_backward(grad: _T | None, sim_feats: _T, diff_feats: _T, pos_partner_feats: _T,
                              neg_partner_feats: _T, pos_partner_mask: _T | None, neg_partner_mask: _T | None,
                              aux: _T, tau: float, margin: float, lambda_tri: float, need_pos_partners: bool,
                              need_neg_partners: bool) -> tuple[_T, _T, _T, _T]:
    from msa_fast.kernels.triton.fd_cmdie_contrastive_loss import fd_cmdie_backward

    return fd_cmdie_backward(grad, sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask,
                             neg_partner_mask, aux, tau, margin, lambda_tri, need_pos_partners, need_neg_partners,
                             fd_cmdie_pair_masks())


@_fd_cmdie_triton_backward.register_fake
def _(grad, sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask, neg_partner_mask, aux,
      tau, margin, lambda_tri, need_pos_partners, need_neg_partners):
    ps, ns = pos_partner_feats, neg_partner_feats
    return (sim_feats.new_empty(sim_feats.shape), diff_feats.new_empty(diff_feats.shape),
            ps.new_empty(ps.shape) if need_pos_partners else ps.new_empty(0),
            ns.new_empty(ns.shape) if need_neg_partners else ns.new_empty(0))


def _fd_cmdie_setup(ctx, inputs, output):
    *feats_masks, tau, margin, lambda_tri = inputs
    ctx.save_for_backward(*feats_masks, output[1])
    ctx.hyper = (tau, margin, lambda_tri)
    ctx.mark_non_differentiable(output[1])


def _fd_cmdie_backward(ctx, d_loss, _d_aux):
    s, d, ps, ns, pm, nm, aux = ctx.saved_tensors
    need = ctx.needs_input_grad
    ds, dd, dps, dns = _fd_cmdie_triton_backward(d_loss, s, d, ps, ns, pm, nm, aux, *ctx.hyper, bool(need[2]),
                                                 bool(need[3]))
    return ds, dd, _grad_like(need[2], dps), _grad_like(need[3], dns), None, None, None, None, None


_fd_cmdie_triton.register_autograd(_fd_cmdie_backward, setup_context=_fd_cmdie_setup)


_REDUCTIONS = ("mean", "sum", "none")


def _finite_float(op: str, name: str, v: object, *, min_value: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        V.fail(op, name, "a finite float", repr(v))
    if min_value is not None and v < min_value:
        V.fail(op, name, f"a float >= {min_value}", repr(v))
    return float(v)


def _bool_mask(op: str, name: str, m: object, shape: tuple[int, ...], like: torch.Tensor, layout: str):
    if m is not None:
        V.tensor(op, name, m, shape=shape, dtypes=(torch.bool,), like=like, layout=layout)


def _check_nt_xent(anchor, positive, negatives, negatives_mask, tau, reduction) -> None:
    op = "nt_xent"
    V.tensor(op, "anchor", anchor, ndim=2, layout="(P, D)")
    p, d = anchor.shape
    V.tensor(op, "positive", positive, shape=(p, d), like=anchor, layout="(P, D)")
    V.tensor(op, "negatives", negatives, ndim=3, layout="(P, K, D)")
    V.tensor(op, "negatives", negatives, shape=(p, None, d), like=anchor, layout="(P, K, D)")
    _bool_mask(op, "negatives_mask", negatives_mask, (p, negatives.shape[1]), anchor,
               "(P, K) bool, True = valid")
    V.positive_float(op, "tau", tau)
    V.choice(op, "reduction", reduction, _REDUCTIONS)


# kernels/triton/{nt_xent,triplet,fd_cmdie_contrastive_loss}.py keep feature vectors and
# (rows >= 2, D) tiles of width D (padded to a power of two) in registers: wider features spill. Beyond it ``auto``
# takes the next backend; tools/compile_gate.py compiles D = MAX_WIDTH.
MAX_WIDTH = 1024


def _width_limit(x, *_rest) -> str | None:
    d = x.shape[-1]
    if d > MAX_WIDTH:
        return f"takes D <= {MAX_WIDTH} (feature vectors in registers), got D={d}"
    return None


_LIMIT = dict(limit=_width_limit, limit_doc=f"D <= {MAX_WIDTH}")


def _nt_xent_run(anchor, positive, negatives, negatives_mask, tau, reduction):
    rows = _nt_xent_triton(anchor, positive, negatives, negatives_mask, float(tau))[0]
    return reduce_loss(rows, reduction).to(anchor.dtype)


# The kernels compute in fp32 from fp32 / fp16 / bf16 inputs; fp64 stays on the reference.
_NT_XENT = _backend.declare(_backend.OpSpec(
    "nt_xent", reference.nt_xent, _check_nt_xent, autocast=torch.float32, compile=True,
    fused=(_backend.Fused("triton", _nt_xent_run, **_LIMIT),)))


def _check_triplet(anchor, positive, negative, margin, reduction) -> None:
    op = "triplet"
    V.tensor(op, "anchor", anchor, ndim=2, layout="(P, D)")
    p, d = anchor.shape
    V.tensor(op, "positive", positive, shape=(p, d), like=anchor, layout="(P, D)")
    V.tensor(op, "negative", negative, shape=(p, d), like=anchor, layout="(P, D)")
    _finite_float(op, "margin", margin)
    V.choice(op, "reduction", reduction, _REDUCTIONS)


def _triplet_run(anchor, positive, negative, margin, reduction):
    return reduce_loss(_triplet_triton(anchor, positive, negative, float(margin)), reduction).to(anchor.dtype)


_TRIPLET = _backend.declare(_backend.OpSpec(
    "triplet", reference.triplet, _check_triplet, autocast=torch.float32, compile=True,
    fused=(_backend.Fused("triton", _triplet_run, **_LIMIT),)))


def _check_fd_cmdie(sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, tau, margin, lambda_tri,
                    pos_partner_mask, neg_partner_mask, reduction) -> None:
    op = "fd_cmdie_contrastive_loss"
    V.tensor(op, "sim_feats", sim_feats, ndim=3, layout="(B, 3, D)")
    V.tensor(op, "sim_feats", sim_feats, shape=(None, 3, None), layout="(B, 3, D) [T_s, A_s, V_s]")
    b, _, d = sim_feats.shape
    V.tensor(op, "diff_feats", diff_feats, shape=(b, 3, d), like=sim_feats, layout="(B, 3, D) [T_d, A_d, V_d]")
    V.tensor(op, "pos_partner_feats", pos_partner_feats, ndim=5, layout="(B, Kp, 2, 3, D)")
    V.tensor(op, "pos_partner_feats", pos_partner_feats, shape=(b, None, 2, 3, d), like=sim_feats,
             layout="(B, Kp, 2, 3, D)")
    V.tensor(op, "neg_partner_feats", neg_partner_feats, ndim=4, layout="(B, Kn, 3, D)")
    V.tensor(op, "neg_partner_feats", neg_partner_feats, shape=(b, None, 3, d), like=sim_feats,
             layout="(B, Kn, 3, D)")
    _bool_mask(op, "pos_partner_mask", pos_partner_mask, (b, pos_partner_feats.shape[1]), sim_feats,
               "(B, Kp) bool, True = partner exists")
    _bool_mask(op, "neg_partner_mask", neg_partner_mask, (b, neg_partner_feats.shape[1]), sim_feats,
               "(B, Kn) bool, True = partner exists")
    V.positive_float(op, "tau", tau)
    _finite_float(op, "margin", margin)
    _finite_float(op, "lambda_tri", lambda_tri, min_value=0.0)
    V.choice(op, "reduction", reduction, _REDUCTIONS)


def _fd_cmdie_run(sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, tau, margin, lambda_tri,
                  pos_partner_mask, neg_partner_mask, reduction):
    rows = _fd_cmdie_triton(sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, pos_partner_mask,
                            neg_partner_mask, float(tau), float(margin), float(lambda_tri))[0]
    return reduce_loss(rows, reduction).to(sim_feats.dtype)


_FD_CMDIE = _backend.declare(_backend.OpSpec(
    "fd_cmdie_contrastive_loss", reference.fd_cmdie_contrastive_loss, _check_fd_cmdie, autocast=torch.float32, compile=True,
    fused=(_backend.Fused("triton", _fd_cmdie_run, **_LIMIT),)))


def nt_xent(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    negatives_mask: torch.Tensor | None = None,
    tau: float = 0.5,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """NT-Xent with explicit negatives (eq. 9): ``logsumexp([c_p, c_k]/tau) - c_p/tau``.

    ``anchor (P, D)``, ``positive (P, D)``, ``negatives (P, K, D)``,
    ``negatives_mask (P, K)`` bool (True = valid), ``tau`` a finite float > 0, ``reduction``
    in ``"mean" | "sum" | "none"``; the mean of ``P = 0`` rows is 0 (not NaN) and its
    gradients are zero. See :func:`msa_fast.ops.reference.nt_xent`.
    """
    return _backend.dispatch(_NT_XENT, (anchor, positive, negatives, negatives_mask, tau, reduction), backend)


def triplet(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 0.5,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Cosine triplet loss (eq. 10-11): ``max(0, d(a, p) - d(a, n) + margin)``, ``d = 1 - cos``.

    ``anchor, positive, negative (P, D)``; ``margin`` a finite float; ``reduction``
    in ``"mean" | "sum" | "none"`` (the mean of ``P = 0`` rows is 0, not NaN). See
    :func:`msa_fast.ops.reference.triplet`.
    """
    return _backend.dispatch(_TRIPLET, (anchor, positive, negative, margin, reduction), backend)


def fd_cmdie_contrastive_loss(
    sim_feats: torch.Tensor,
    diff_feats: torch.Tensor,
    pos_partner_feats: torch.Tensor,
    neg_partner_feats: torch.Tensor,
    tau: float = 0.5,
    margin: float = 0.5,
    lambda_tri: float = 0.1,
    pos_partner_mask: torch.Tensor | None = None,
    neg_partner_mask: torch.Tensor | None = None,
    reduction: str = "mean",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """FD-CMDIE contrastive loss ``L_cl`` (section 2.3.2, eq. 9-12).

    ``sim_feats (B, 3, D)`` = ``[T_s, A_s, V_s]``; ``diff_feats (B, 3, D)`` =
    ``[T_d, A_d, V_d]``; ``pos_partner_feats (B, Kp, 2, 3, D)`` (partners from
    ``similar^i``: ``[:, :, 0]`` similarity, ``[:, :, 1]`` dissimilarity features);
    ``neg_partner_feats (B, Kn, 3, D)`` (similarity features of partners from
    ``different^i``); optional bool masks ``pos_partner_mask (B, Kp)`` /
    ``neg_partner_mask (B, Kn)``, True = partner exists. ``tau`` a finite float > 0,
    ``margin`` finite, ``lambda_tri >= 0`` finite. The mean over ``B = 0`` samples is 0
    (not NaN), with zero gradients. The pair sets, the reading of eq. 9 and of the
    triplets are documented on :func:`msa_fast.ops.reference.fd_cmdie_contrastive_loss`.
    """
    return _backend.dispatch(_FD_CMDIE, (sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, tau, margin,
                                         lambda_tri, pos_partner_mask, neg_partner_mask, reduction), backend)
