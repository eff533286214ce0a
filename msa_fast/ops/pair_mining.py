"""``mine_pairs``: label-aware cosine top-k mining (SPEC 3.4), validated and dispatched.

Backends: ``eager`` (:func:`msa_fast.ops.reference.mine_pairs`, materialises Q x N),
``cpp`` (``csrc/cpu/pair_mining.cpp``: blocked similarity + running top-k, OpenMP),
``cuda`` (``csrc/cuda/pair_mining.cu``). The C++ op is ``torch.ops.msa_fast.mine_pairs``;
its fake kernel below makes it traceable by ``torch.compile``. Mining is not
differentiable: it selects pairs, the contrastive loss recomputes the cosines.
"""

from __future__ import annotations

import torch

from msa_fast import _backend, _ext
from msa_fast.ops import _validate as V
from msa_fast.ops import reference
from msa_fast.ops.reference import MinedPairs, sentiment_classes

__all__ = ["MinedPairs", "mine_pairs", "sentiment_classes"]

_backend.register("mine_pairs", "cpp", "cuda")
CUDA_MAX_K = 64  # csrc/cuda/pair_mining.cu: kMaxK

if _ext.load()[0] is not None:
    @torch.library.register_fake("msa_fast::mine_pairs")
    def _mine_pairs_fake(features, labels, queries, query_labels, query_index, k):
        q = queries.shape[0]
        sim_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        idx = features.new_empty((q, k), dtype=torch.long)
        sim = features.new_empty((q, k), dtype=sim_dtype)
        return idx, sim, torch.empty_like(idx), torch.empty_like(sim)


@torch.compiler.assume_constant_result
def _resolve(backend: str | None, device: torch.device) -> str:
    # Backend resolution asks the dispatcher which kernels exist, which Dynamo
    # cannot trace; its answer is fixed for a process, so fold it into the graph.
    return _backend.resolve("mine_pairs", backend, device)


def _check(features, labels, k, queries, query_labels, query_index):
    op = "mine_pairs"
    V.tensor(op, "features", features, ndim=2, layout="(N, D)")
    n, d = features.shape
    V.tensor(op, "labels", labels, shape=(n,), dtypes=(torch.int64,), like=features, layout="(N,) int64")
    V.positive_int(op, "k", k)
    if queries is None:
        if query_labels is not None:
            V.fail(op, "query_labels", "None when queries is None", "a tensor")
        if query_index is not None:
            V.tensor(op, "query_index", query_index, shape=(n,), dtypes=(torch.int64,), like=features)
        return
    V.tensor(op, "queries", queries, ndim=2, shape=(None, d), like=features, layout="(Q, D)")
    q = queries.shape[0]
    if query_labels is None:
        V.fail(op, "query_labels", f"an int64 tensor of shape ({q},) with queries", "None")
    V.tensor(op, "query_labels", query_labels, shape=(q,), dtypes=(torch.int64,), like=features, layout="(Q,) int64")
    if query_index is not None:
        V.tensor(op, "query_index", query_index, shape=(q,), dtypes=(torch.int64,), like=features, layout="(Q,) int64")
        if q and (int(query_index.min()) < -1 or int(query_index.max()) >= n):
            V.fail(op, "query_index", f"values in [-1, {n - 1}] (-1: not a row of features)",
                   f"range [{int(query_index.min())}, {int(query_index.max())}]")


def mine_pairs(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    queries: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> MinedPairs:
    """Mine the ``k`` most similar same-label and ``k`` least similar other-label rows.

    See :func:`msa_fast.ops.reference.mine_pairs` for the exact contract. Passing a
    block of ``queries`` (with ``query_labels`` and ``query_index``) returns exactly
    those rows of the full result, so mining shards across processes.
    """
    _check(features, labels, k, queries, query_labels, query_index)
    name = _resolve(backend, features.device)
    if name == "cuda" and k > CUDA_MAX_K:
        # The CUDA kernel keeps two list slots per lane of a warp.
        if (backend if backend is not None else _backend.get_backend()) == "cuda":
            raise RuntimeError(f"mine_pairs: backend 'cuda' supports k <= {CUDA_MAX_K}, got k={k}")
        name = "eager"  # auto never fails
    if name == "eager":
        return reference.mine_pairs(features, labels, k, queries, query_labels, query_index)
    n = features.shape[0]
    if queries is None:
        queries, query_labels = features, labels
        if query_index is None:
            query_index = torch.arange(n, device=features.device)
    elif query_index is None:
        query_index = torch.full((queries.shape[0],), -1, dtype=torch.long, device=features.device)
    out = torch.ops.msa_fast.mine_pairs(
        features.detach(), labels, queries.detach(), query_labels, query_index, k)
    return MinedPairs(*out)
