"""Eager PyTorch reference of every msa_fast op: the executable specification.

One vectorised function per op of SPEC section 3, on any device, in fp64 / fp32 /
bf16 (half-precision inputs are computed in fp32 where a reduction needs it and
returned in the input dtype). Every fast path (Triton, C++, CUDA) is tested
against these functions, forward and backward. No input validation here: the
public wrappers in ``msa_fast/ops/<op>.py`` validate, then dispatch.

Equation numbers refer to the FD-CMDIE paper (``shared/papers/001_...``); the AGFN
dual gate follows SPEC 3.1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MinedPairs(NamedTuple):
    """Result of :func:`mine_pairs`: four ``(Q, k)`` tensors.

    ``pos_idx`` / ``neg_idx`` are int64 row indices into ``features`` (``-1`` where
    fewer than ``k`` candidates exist); ``pos_sim`` / ``neg_sim`` the cosine
    similarities (``nan`` in the missing slots).
    """

    pos_idx: torch.Tensor
    pos_sim: torch.Tensor
    neg_idx: torch.Tensor
    neg_sim: torch.Tensor


# --------------------------------------------------------------------------- #
# Pair mining (FD-CMDIE eq. 7-8, SPEC 3.4)
# --------------------------------------------------------------------------- #


def _mining_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` per row in the mining dtype; a zero row stays zero (similarity 0)."""
    x = x.to(_mining_dtype(x.dtype))
    norm = x.norm(dim=-1, keepdim=True)
    return x * torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))


def _topk_ties_low(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries per row, sorted descending, ties to the lower column.

    ``torch.topk`` breaks ties arbitrarily, so it only finds the k-th value; the
    selection is then rebuilt exactly: every entry above it, plus the
    lowest-indexed entries equal to it.
    """
    q, n = scores.shape
    kk = min(k, n)
    kth = scores.topk(kk, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    room = kk - above.sum(dim=1, keepdim=True, dtype=torch.int32)
    chosen = above | (tied & (tied.to(torch.int32).cumsum(dim=1, dtype=torch.int32) <= room))
    idx = chosen.nonzero()[:, 1].view(q, kk)  # ascending column order per row
    val = scores.gather(1, idx)
    order = val.sort(dim=1, descending=True, stable=True).indices  # stable: lower index first
    return idx.gather(1, order), val.gather(1, order)


def _pad_k(idx: torch.Tensor, val: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    missing = k - idx.shape[1]
    if missing > 0:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], missing), -1)], dim=1)
        val = torch.cat([val, val.new_full((val.shape[0], missing), float("nan"))], dim=1)
    return idx, val


def mine_pairs(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    queries: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
) -> MinedPairs:
    """Label-aware nearest / farthest neighbours by cosine similarity (eq. 7-8).

    ``features: (N, D)``, ``labels: (N,)`` int64 class ids. Queries default to the
    rows of ``features`` (``query_index[i] = i``); ``query_index[i] = -1`` marks a
    query that is not a row of ``features`` (nothing excluded).
    ``sim(q, f) = <q, f> / (|q| |f|)``, 0 when either vector is zero (eq. 7).
    For each query, ``pos`` = the ``k`` most similar rows with the same label,
    excluding the query's own row, sorted descending; ``neg`` = the ``k`` least
    similar rows with a different label, sorted ascending; ties go to the lower
    row index; missing slots are ``-1`` / ``nan``. Similarities are computed in
    fp32 (fp64 for fp64 inputs) and are not differentiable (mining selects pairs;
    the loss recomputes the cosines it trains on).

    This reference materialises the ``Q x N`` similarity matrix; the ``cpp``,
    ``cuda`` and ``triton`` kernels never do.
    """
    n = features.shape[0]
    if queries is None:
        queries, query_labels = features, labels
        if query_index is None:
            query_index = torch.arange(n, device=features.device)
    elif query_index is None:
        query_index = torch.full((queries.shape[0],), -1, dtype=torch.long, device=features.device)
    with torch.no_grad():
        sim = normalize_rows(queries) @ normalize_rows(features).T  # (Q, N)
        same = query_labels[:, None] == labels[None, :]
        is_self = query_index[:, None] == torch.arange(n, device=features.device)[None, :]
        pos_ok = same & ~is_self
        pos_idx, pos_sim = _topk_ties_low(sim.masked_fill(~pos_ok, float("-inf")), k)
        # Least similar = largest of -sim; negating keeps "ties to the lower index".
        neg_idx, neg_sim = _topk_ties_low((-sim).masked_fill(same, float("-inf")), k)
        neg_sim = -neg_sim
        pos_bad = pos_ok.gather(1, pos_idx).logical_not_()
        neg_bad = same.gather(1, neg_idx)
        pos_idx, pos_sim = pos_idx.masked_fill(pos_bad, -1), pos_sim.masked_fill(pos_bad, float("nan"))
        neg_idx, neg_sim = neg_idx.masked_fill(neg_bad, -1), neg_sim.masked_fill(neg_bad, float("nan"))
        pos_idx, pos_sim = _pad_k(pos_idx, pos_sim, k)
        neg_idx, neg_sim = _pad_k(neg_idx, neg_sim, k)
    return MinedPairs(pos_idx, pos_sim, neg_idx, neg_sim)


def sentiment_classes(y: torch.Tensor, scheme: str = "7") -> torch.Tensor:
    """Regression labels in [-3, 3] to int64 class ids (SPEC 3.4).

    ``"7"``: ``round(clip(y, -3, 3)) + 3`` in 0..6 (round half to even, as numpy
    and MMSA); ``"3"``: ``sign(y) + 1`` in 0..2 (negative, neutral, positive);
    ``"2"``: ``y >= 0`` in 0..1 (MMSA's Has0 split).
    """
    if scheme == "7":
        return torch.round(y.clamp(-3.0, 3.0)).long() + 3
    if scheme == "3":
        return torch.sign(y).long() + 1
    if scheme == "2":
        return (y >= 0).long()
    raise ValueError(f"sentiment_classes: scheme: expected one of ('7', '3', '2'), got {scheme!r}")


# --------------------------------------------------------------------------- #
# Dual-gate fusion (AGFN, SPEC 3.1)            -- section owned by the nn-ops work
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# Gated attention pooling, GAP (eq. 25-29, SPEC 3.2)
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# Attention, add + LayerNorm, DIPU (eq. 13-24, SPEC 3.3)
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# Contrastive losses (eq. 9-12, SPEC 3.4)       -- section owned by the loss work
# --------------------------------------------------------------------------- #
