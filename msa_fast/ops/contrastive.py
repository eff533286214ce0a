"""Contrastive losses of FD-CMDIE (eq. 9-12, SPEC 3.4), validated and dispatched.

``nt_xent`` (eq. 9), ``triplet`` (eq. 10-11) and ``fd_cmdie_contrastive_loss``
(the pair sets P^i, N^i of section 2.3.2 and eq. 12). The math, shapes and numeric
choices are documented on the functions of :mod:`msa_fast.ops.reference`.

Backends: only ``eager`` exists so far (the reference, autograd by PyTorch, any
device, traceable by ``torch.compile``). No fused kernel is registered, so an
explicit ``"triton"`` / ``"cuda"`` / ``"cpp"`` raises ``RuntimeError`` and
``"auto"`` falls back to eager.
"""

from __future__ import annotations

import math

import torch

from msa_fast import _backend
from msa_fast.ops import _validate as V
from msa_fast.ops import reference

__all__ = ["fd_cmdie_contrastive_loss", "nt_xent", "triplet"]

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
    ``negatives_mask (P, K)`` bool (True = valid), ``tau > 0``, ``reduction`` in
    ``"mean" | "sum" | "none"``. See :func:`msa_fast.ops.reference.nt_xent`.
    """
    op = "nt_xent"
    V.tensor(op, "anchor", anchor, ndim=2, layout="(P, D)")
    p, d = anchor.shape
    V.tensor(op, "positive", positive, shape=(p, d), like=anchor, layout="(P, D)")
    V.tensor(op, "negatives", negatives, ndim=3, layout="(P, K, D)")
    V.tensor(op, "negatives", negatives, shape=(p, None, d), like=anchor, layout="(P, K, D)")
    _bool_mask(op, "negatives_mask", negatives_mask, (p, negatives.shape[1]), anchor,
               "(P, K) bool, True = valid")
    tau = V.positive_float(op, "tau", tau)
    V.choice(op, "reduction", reduction, _REDUCTIONS)
    _backend.resolve(op, backend, anchor.device)  # only eager exists: resolves or raises
    return reference.nt_xent(anchor, positive, negatives, negatives_mask, tau, reduction)


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
    in ``"mean" | "sum" | "none"``. See :func:`msa_fast.ops.reference.triplet`.
    """
    op = "triplet"
    V.tensor(op, "anchor", anchor, ndim=2, layout="(P, D)")
    p, d = anchor.shape
    V.tensor(op, "positive", positive, shape=(p, d), like=anchor, layout="(P, D)")
    V.tensor(op, "negative", negative, shape=(p, d), like=anchor, layout="(P, D)")
    margin = _finite_float(op, "margin", margin)
    V.choice(op, "reduction", reduction, _REDUCTIONS)
    _backend.resolve(op, backend, anchor.device)
    return reference.triplet(anchor, positive, negative, margin, reduction)


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
    ``neg_partner_mask (B, Kn)``, True = partner exists. ``tau > 0``, ``margin``
    finite, ``lambda_tri >= 0``. The pair sets, the reading of eq. 9 and of the
    triplets are documented on :func:`msa_fast.ops.reference.fd_cmdie_contrastive_loss`.
    """
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
    tau = V.positive_float(op, "tau", tau)
    margin = _finite_float(op, "margin", margin)
    lambda_tri = _finite_float(op, "lambda_tri", lambda_tri, min_value=0.0)
    V.choice(op, "reduction", reduction, _REDUCTIONS)
    _backend.resolve(op, backend, sim_feats.device)
    return reference.fd_cmdie_contrastive_loss(
        sim_feats, diff_feats, pos_partner_feats, neg_partner_feats, tau, margin, lambda_tri,
        pos_partner_mask, neg_partner_mask, reduction)
