"""Helpers shared by the ops, their references and the models (not oracles).

:mod:`msa_fast.ops.reference` holds the eager ground truth of every op; the few things
both it and the production code need -- the :class:`MinedPairs` result type, the
explicit queries of a mining call, the sentiment class schemes, the sinusoidal position
encoding, the loss reduction -- live here, so that production code never imports the
oracles for them. ``reference`` re-exports them under the same names.
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


def mining_queries(features, labels, queries=None, query_labels=None, query_index=None):
    """The explicit ``(queries, query_labels, query_index)`` of a ``mine_pairs`` call:
    no queries means every row of ``features`` (row i excludes itself); queries without
    an index exclude nothing (-1)."""
    if queries is None:
        queries, query_labels = features, labels
        if query_index is None:
            query_index = torch.arange(features.shape[0], device=features.device)
    elif query_index is None:
        query_index = torch.full((queries.shape[0],), -1, dtype=torch.long, device=features.device)
    return queries, query_labels, query_index


def sentiment_classes(y: torch.Tensor, scheme: str = "7") -> torch.Tensor:
    """Regression labels in [-3, 3] to int64 class ids (contract §3.4).

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


def sinusoidal_position_encoding(length: int, d: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The fixed sinusoidal PE of eq. 13-14 (Vaswani et al.): ``(length, d)``.

    ``PE[p, 2i] = sin(p / 10000^(2i/d))``, ``PE[p, 2i+1] = cos(p / 10000^(2i/d))``,
    positions counted from 0 (padding is at the end of a sequence, so real
    positions are 0..len-1); an odd ``d`` drops the last cosine column.
    """
    pos = torch.arange(length, device=device, dtype=dtype)
    two_i = torch.arange(0, d, 2, device=device, dtype=dtype)
    angles = pos[:, None] * torch.exp(two_i * (-9.210340371976184 / d))[None, :]  # ln(10000)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[:, :d]


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"`` / ``"sum"`` over rows, or the rows (``"none"``).

    The mean of zero rows is 0, not NaN (``0 / 0``): a batch without a single pair
    contributes nothing to the loss, and its backward gives zero (empty) gradients.
    """
    if reduction == "mean":
        # sum() of no rows is 0 and keeps the graph; the shape test is static under compile
        return loss.mean() if loss.numel() else loss.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


# --------------------------------------------------------------------------- #
# FD-CMDIE's intra-sample pair table (section 2.3.2, eq. 9-11, contract §3.4)
# --------------------------------------------------------------------------- #

# A sample's own six feature vectors, stacked in this order: the similarity features
# ``[T_s, A_s, V_s]`` then the dissimilarity features ``[T_d, A_d, V_d]`` (modality order
# t, a, v). ``pos_partner_feats[:, j]`` (2, 3, D) flattens to the same six rows.
T_S, A_S, V_S, T_D, A_D, V_D = range(6)
FD_CMDIE_FEATURES = ("T_s", "A_s", "V_s", "T_d", "A_d", "V_d")

# Positive_in: ``(T_s, V_s), (T_s, A_s)`` -- text-anchored, ``(A_s, V_s)`` is not a pair.
FD_CMDIE_INTRA_POSITIVES = ((T_S, V_S), (T_S, A_S))
# Negative_in: ``T_s`` against every dissimilarity feature.
FD_CMDIE_INTRA_NEGATIVES = ((T_S, T_D), (T_S, A_D), (T_S, V_D))
# Pair_Tri (eq. 10): ``(anchor, positive, negative)`` for every Positive_in x Negative_in
# pair with the same anchor -- the six hinge terms ``T_s x {V_s, A_s} x {T_d, A_d, V_d}``.
FD_CMDIE_TRIPLETS = tuple((a, p, n) for a, p in FD_CMDIE_INTRA_POSITIVES
                          for a_n, n in FD_CMDIE_INTRA_NEGATIVES if a_n == a)
# Positive_out / Negative_out: the sample's similarity features against its partners' same
# modality (``(X_s^i, X_s^j)``, ``(X_s^i, X_s^k)`` for X in t, a, v).
FD_CMDIE_INTER_MODALITIES = (T_S, A_S, V_S)


def fd_cmdie_table() -> tuple[list[int], list[int], list[tuple[int, int, int]], list[int]]:
    """The pair table above, read now and checked: ``(Positive_in rows, Negative_in rows,
    Pair_Tri (anchor, positive, negative), inter-sample rows)``.

    Both the reference and the Triton kernels read the table through this, so a table one
    of them could not compute is refused by both: FD-CMDIE's form -- every intra pair and
    triplet anchored at ``T_s``, positives among ``A_s, V_s``, negatives among ``T_d, A_d,
    V_d``, triplets over those, inter-sample rows among ``T_s, A_s, V_s`` -- and no row twice
    (a set of pairs; the kernels' bit masks cannot count a row twice)."""
    pos_rows, neg_rows = (A_S, V_S), (T_D, A_D, V_D)
    pos = [c for a, c in FD_CMDIE_INTRA_POSITIVES if a == T_S and c in pos_rows]
    neg = [c for a, c in FD_CMDIE_INTRA_NEGATIVES if a == T_S and c in neg_rows]
    tri = [(a, p, n) for a, p, n in FD_CMDIE_TRIPLETS if a == T_S and p in pos_rows and n in neg_rows]
    inter = [c for c in FD_CMDIE_INTER_MODALITIES if c in (T_S, A_S, V_S)]
    given = (FD_CMDIE_INTRA_POSITIVES, FD_CMDIE_INTRA_NEGATIVES, FD_CMDIE_TRIPLETS, FD_CMDIE_INTER_MODALITIES)
    kept = (pos, neg, tri, inter)
    if any(len(k) != len(g) or len(set(k)) != len(k) for k, g in zip(kept, given)):
        raise ValueError(
            "fd_cmdie_contrastive_loss: pair table: expected every intra pair and triplet anchored at T_s, "
            "positives among A_s/V_s, negatives among T_d/A_d/V_d, inter-sample rows among T_s/A_s/V_s, no "
            f"row twice; got positives {FD_CMDIE_INTRA_POSITIVES}, negatives {FD_CMDIE_INTRA_NEGATIVES}, "
            f"triplets {FD_CMDIE_TRIPLETS}, inter {FD_CMDIE_INTER_MODALITIES} (rows: {FD_CMDIE_FEATURES})")
    return pos, neg, tri, inter
