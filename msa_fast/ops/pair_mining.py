"""``mine_pairs``: label-aware cosine top-k mining (contract §3.4), validated and dispatched.

Backends: ``eager`` (:func:`msa_fast.ops.reference.mine_pairs`, materialises Q x N),
``cpp`` (``csrc/cpu/pair_mining.cpp``: blocked similarity + running top-k, OpenMP),
``cuda`` (``csrc/cuda/pair_mining.cu``) and ``triton``
(``msa_fast/kernels/triton/pair_mining.py``: per block of queries, a loop over key
tiles with ``tl.dot`` and a running top-k of packed (similarity, index) keys). The
C++ op is ``torch.ops.msa_fast.mine_pairs``, the Triton one
``torch.ops.msa_fast.mine_pairs_triton``; their fake kernels make both traceable by
``torch.compile``. Mining is not differentiable: it selects pairs, the contrastive
loss recomputes the cosines -- so neither op registers an autograd formula (the
wrapper detaches the features).

Limits of the fused kernels: ``cuda`` and ``triton`` keep the running lists in
registers, ``k <= 64``; ``triton`` takes fp32 / fp16 / bf16 (its keys hold fp32
bits), not fp64. Beyond a limit ``auto`` falls back to ``eager`` and an explicitly
requested backend raises ``RuntimeError``.

:func:`mine_pairs_chunked` mines a whole data set in blocks of queries (the
``queries`` / ``query_labels`` / ``query_index`` sharding) with a progress bar.
"""

from __future__ import annotations

import sys

import torch

from msa_fast import _backend, _ext
from msa_fast.ops import _common, reference
from msa_fast.ops import _validate as V
from msa_fast.ops._common import MinedPairs

__all__ = ["MinedPairs", "mine_pairs", "mine_pairs_chunked", "sentiment_classes"]

if _ext.load()[0] is not None:
    @torch.library.register_fake("msa_fast::mine_pairs")
    def _mine_pairs_fake(features, labels, queries, query_labels, query_index, k):
        q = queries.shape[0]
        sim_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        idx = features.new_empty((q, k), dtype=torch.long)
        sim = features.new_empty((q, k), dtype=sim_dtype)
        return idx, sim, torch.empty_like(idx), torch.empty_like(sim)


@torch.library.custom_op("msa_fast::mine_pairs_triton", mutates_args=())
def _mine_pairs_triton(features: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor,
                       query_labels: torch.Tensor, query_index: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from msa_fast.kernels.triton.pair_mining import mine_pairs_forward

    return mine_pairs_forward(features, labels, queries, query_labels, query_index, k)


@_mine_pairs_triton.register_fake
def _(features, labels, queries, query_labels, query_index, k):
    idx = features.new_empty((queries.shape[0], k), dtype=torch.long)
    sim = features.new_empty((queries.shape[0], k), dtype=torch.float32)
    return idx, sim, torch.empty_like(idx), torch.empty_like(sim)


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
            V.tensor(op, "query_index", query_index, shape=(n,), dtypes=(torch.int64,), like=features,
                     layout="(N,) int64")
            _check_query_index(query_index, n)
        return
    V.tensor(op, "queries", queries, ndim=2, shape=(None, d), like=features, layout="(Q, D)")
    q = queries.shape[0]
    if query_labels is None:
        V.fail(op, "query_labels", f"an int64 tensor of shape ({q},) with queries", "None")
    V.tensor(op, "query_labels", query_labels, shape=(q,), dtypes=(torch.int64,), like=features, layout="(Q,) int64")
    if query_index is not None:
        V.tensor(op, "query_index", query_index, shape=(q,), dtypes=(torch.int64,), like=features, layout="(Q,) int64")
        _check_query_index(query_index, n)


def _check_query_index(query_index: torch.Tensor, n: int) -> None:
    """Values in ``[-1, n)`` (one host sync on a GPU), with or without ``queries``."""
    if query_index.numel():
        lo, hi = (int(v) for v in torch.aminmax(query_index))
        if lo < -1 or hi >= n:
            V.fail("mine_pairs", "query_index", f"values in [-1, {n - 1}] (-1: not a row of features)",
                   f"range [{lo}, {hi}]")


def sentiment_classes(y, scheme: str = "7") -> torch.Tensor:
    """Regression labels to int64 class ids (contract §3.4): see
    :func:`msa_fast.ops._common.sentiment_classes` for the schemes.

    ``y``: a tensor, a numpy array, a Python list or a number (converted with
    ``torch.as_tensor``; integer and bool labels are read as floats). NaN labels
    have no class: ``ValueError`` naming ``y``; +-inf clip to the end classes.
    """
    op = "sentiment_classes"
    V.choice(op, "scheme", scheme, ("7", "3", "2"))
    if not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as exc:
            V.fail(op, "y", "a tensor, numpy array or list of real numbers", f"{type(y).__name__} ({exc})")
    if y.is_complex():
        V.fail(op, "y", "real-valued labels", y)
    if not y.is_floating_point():
        y = y.to(torch.float64)
    if bool(torch.isnan(y).any()):
        V.fail(op, "y", "labels without NaN (a NaN label has no class)",
               f"{int(torch.isnan(y).sum())} NaN of {y.numel()} in shape {tuple(y.shape)}")
    return _common.sentiment_classes(y, scheme)


def _k_limit(features, labels, k, *_queries) -> str | None:
    # the running lists live in registers: csrc/cuda/pair_mining.cu kMaxK (two slots per
    # lane of a warp), kernels/triton/pair_mining.py MAX_K
    return f"supports k <= 64, got k={k}" if k > 64 else None


def _fused_runner(op_of_backend):
    def run(features, labels, k, queries, query_labels, query_index):
        queries, query_labels, query_index = _common.mining_queries(features, labels, queries, query_labels,
                                                                    query_index)
        out = op_of_backend()(features.detach(), labels, queries.detach(), query_labels, query_index, k)
        return MinedPairs(*out)

    return run


_SPEC = _backend.declare(_backend.OpSpec(
    "mine_pairs", reference.mine_pairs, _check, autocast=None,
    fused=(
        _backend.Fused("cpp", _fused_runner(lambda: torch.ops.msa_fast.mine_pairs),
                       dtypes=(*_backend.FP_16_32, torch.float64), auto=("cpu",)),
        _backend.Fused("cuda", _fused_runner(lambda: torch.ops.msa_fast.mine_pairs),
                       dtypes=(*_backend.FP_16_32, torch.float64), limit=_k_limit, limit_doc="k <= 64",
                       rank=0),
        _backend.Fused("triton", _fused_runner(lambda: _mine_pairs_triton), limit=_k_limit,
                       limit_doc="k <= 64", rank=1),
    ),
))


mine_pairs = _backend.public_op(_SPEC, __name__, """Mine the ``k`` most similar same-label and ``k`` least similar other-label rows.

    See :func:`msa_fast.ops.reference.mine_pairs` for the exact contract. Non-finite
    rows (contract §10), on every backend: a row of ``features`` or ``queries`` with a NaN
    or +-inf entry has no valid similarity -- it is never mined for any query, and as
    a query it mines nothing (all ``-1`` / ``nan``); no error is raised (checking would
    cost a host sync and a graph break). ``query_index`` values outside ``[-1, N)``
    are a ``ValueError`` on every backend, with or without ``queries``. Passing a
    block of ``queries`` (with ``query_labels`` and ``query_index``) returns exactly
    those rows of the full result, so mining shards across processes.
    """)


def _progress_bar(total: int, show: bool):
    """A tqdm bar on stderr, or ``None`` (not shown, or tqdm not installed)."""
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: mining runs the same without a bar
        return None
    return tqdm(total=total, desc="mine_pairs", unit="query", file=sys.stderr)


def mine_pairs_chunked(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    chunk_size: int = 4096,
    *,
    backend: str | None = None,
    progress: bool | None = None,
) -> MinedPairs:
    """:func:`mine_pairs` of every row of ``features``, ``chunk_size`` queries at a time.

    Each block of rows ``a:b`` is mined as ``mine_pairs(features, labels, k,
    features[a:b], labels[a:b], arange(a, b))`` -- the sharding rule of contract
    §3.4, so every row's result is the one of the full call: the same candidates,
    order and tie rule. With ``triton`` it is bit-identical (one program per
    block of queries: a row's arithmetic does not depend on its block); with
    ``eager`` / ``cpp`` a BLAS may round a similarity of a short block (or of
    ``cpp``'s symmetric half-GEMM in the one call) differently in the last bit,
    which can only swap two picks whose similarities are that close. Use it to
    bound the memory of the ``eager`` backend (``chunk_size x N`` similarities
    instead of ``N x N``) and to see progress on large data sets. ``progress``: ``None`` shows a tqdm bar on stderr
    only when stderr is a terminal, ``True`` / ``False`` force it (no bar when
    tqdm is not installed). Returns ``(N, k)`` tensors like :func:`mine_pairs`.
    """
    _check(features, labels, k, None, None, None)
    V.positive_int("mine_pairs_chunked", "chunk_size", chunk_size)
    n = features.shape[0]
    if n <= chunk_size:
        return mine_pairs(features, labels, k, backend=backend)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = _progress_bar(n, show)
    out = None
    try:
        for a in range(0, n, chunk_size):
            b = min(a + chunk_size, n)
            rows = torch.arange(a, b, device=features.device)
            part = mine_pairs(features, labels, k, features[a:b], labels[a:b], rows, backend=backend)
            if out is None:  # dtypes are the backend's: allocate after the first block
                out = [t.new_empty((n, k)) for t in part]
            for dst, src in zip(out, part):
                dst[a:b] = src
            if bar is not None:
                bar.update(b - a)
    finally:
        if bar is not None:
            bar.close()
    return MinedPairs(*out)
