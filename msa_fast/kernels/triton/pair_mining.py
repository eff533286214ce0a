"""Triton kernel of ``mine_pairs`` (contract §3.4, FD-CMDIE eq. 7-8): cosine top-k, never Q x N.

Shapes: ``features: (N, D)``, ``labels: (N,)`` int64, ``queries: (Q, D)``,
``query_labels: (Q,)`` int64, ``query_index: (Q,)`` int64 in ``[-1, N)``. Outputs
``(Q, k)``: ``pos_idx`` / ``neg_idx`` int64, ``pos_sim`` / ``neg_sim`` fp32::

    sim(i, j) = <q_i, f_j> * inv|q_i| * inv|f_j|      (inv|x| = 0 for a zero row)
    pos_i = the k rows j, labels[j] == query_labels[i], j != query_index[i], of
            largest sim, descending;
    neg_i = the k rows j, labels[j] != query_labels[i], of smallest sim, ascending;
    ties to the lower j; fewer than k candidates: -1 / NaN; a query or feature row
    with a NaN / inf entry has NaN similarities, which never rank (no candidate).

Algorithm: one program per ``BLOCK_Q`` queries streams the feature rows in
``BLOCK_N`` tiles; each ``(BLOCK_Q, BLOCK_N)`` similarity tile lives in registers
only and is merged into two per-query running lists of ``K_P = next_pow2(k)``
keys, so memory is O((Q + N) D + Q k) -- the inputs, one fp32 inverse norm per
row and the outputs.

Numerics. The dot product runs on the *raw* rows with fp32 accumulation
(``tl.dot``; fp32 inputs with ``input_precision="ieee"``, i.e. no TF32; fp16 /
bf16 products are exact in fp32) and is then scaled by the two fp32 inverse
norms, computed by the launcher as the reference does (``x.float().norm()``,
0 for a zero row). Against the reference, which multiplies pre-normalised fp32
rows, this differs by a few ulps (|diff| < 1e-6 for unit cosines), and it keeps
exact ties exact: duplicated (or power-of-two-scaled) rows give bit-identical
similarities. Rows whose raw squared norm overflows fp32 (|x| ~ 1e19) are out
of scope. fp64 is not supported (the keys below hold fp32 bits).

Exact tie rule through packed keys. Each candidate becomes one int64 key
``(order-preserving int32 image of its fp32 similarity) << 32 | (2^32 - 1 - j)``:
int64 order is similarity order first and, among equal similarities, the lower
row first -- the contract's tie rule (§3.4) -- so plain integer max / min on keys select
the exact list, and every key is unique. Negatives use the bitwise complement
of the similarity image (order reversing, ties stay ties). ``-0.0`` is
canonicalised to ``+0.0`` first: equal similarities, different bit images.
Non-candidates (other label / own row / padding) get ``INT64_MIN``, below every
real key; the lists start as the distinct placeholders ``INT64_MIN + slot``;
both decode to ``-1`` / NaN. The similarity written is decoded back from the
key, so it is exactly the value that was ranked.

Merging a tile (selection, not a sorting network): each list is an unsorted
set with its minimum cached; a row needs at most ``min(#keys of the tile above
its minimum, K_P)`` steps, each replacing its minimum by its largest remaining
candidate when larger. The tile runs the block's maximum of that count -- zero
for nearly every tile once the lists are warm -- so the steady state costs
two reductions per tile and list. The lists are sorted once at the end by
``k`` max-extractions. (``tl.topk`` / ``tl.sort`` bitonic merges were tried:
exact too, but every tile paid for them, and under ``TRITON_INTERPRET`` they
were ~10x slower.)

Limits: ``k <= MAX_K`` (64): the lists are registers -- two ``(BLOCK_Q, K_P)``
int64 tensors per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_fast.kernels.triton._common import on_tensor_device

MAX_K = 64


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min2(a, b):
    return tl.minimum(a, b)


@triton.jit
def _add2(a, b):
    return a + b


# Reductions go through tl.reduce with triton.language's own combine functions
# where they exist: tl.max / tl.min / tl.sum are @jit wrappers whose every call
# costs milliseconds under TRITON_INTERPRET, while tl.reduce with these combine
# functions maps straight to numpy there (and compiles to the same code on a GPU).
# A Triton without them gets the equivalent local combine functions.
_MAX = getattr(tl.standard, "_elementwise_max", _max2)
_MIN = getattr(tl.standard, "_elementwise_min", _min2)
_SUM = getattr(tl.standard, "_sum_combine", _add2)


@triton.jit
def mine_pairs_kernel(
    q_ptr, qinv_ptr, qlab_ptr, qidx_ptr,
    f_ptr, finv_ptr, lab_ptr,
    pos_idx_ptr, pos_sim_ptr, neg_idx_ptr, neg_sim_ptr,
    Q, N, D, k,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_P: tl.constexpr,
    IEEE: tl.constexpr,
):
    # Everything is inlined in one body: under TRITON_INTERPRET every call of a
    # nested @jit function (tl.sort included) costs milliseconds, so the merge is
    # written with the fewest reductions per tile.
    NONE: tl.constexpr = -9223372036854775808  # INT64_MIN, below every real key
    pid = tl.program_id(0)
    rows = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < Q
    rows64 = rows.to(tl.int64)
    qinv = tl.load(qinv_ptr + rows64, mask=row_ok, other=0.0)
    qlab = tl.load(qlab_ptr + rows64, mask=row_ok, other=0)
    qidx = tl.load(qidx_ptr + rows64, mask=row_ok, other=-1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, K_P)
    # Running lists: unsorted sets of the K_P largest keys so far, started with
    # *distinct* placeholders NONE + slot, so that "the slot holding the minimum"
    # is the one slot equal to it.
    pos = tl.zeros((BLOCK_Q, K_P), dtype=tl.int64) + (NONE + offs_k.to(tl.int64))[None, :]
    neg = pos
    pos_min = tl.reduce(pos, 1, _MIN)
    neg_min = pos_min
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < N
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            qt = tl.load(q_ptr + rows64[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            ft = tl.load(f_ptr + cols64[:, None] * D + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(qt, tl.trans(ft), acc, input_precision="ieee")
            else:
                acc = tl.dot(qt, tl.trans(ft), acc)
        finv = tl.load(finv_ptr + cols64, mask=col_ok, other=0.0)
        lab = tl.load(lab_ptr + cols64, mask=col_ok, other=0)
        sim = acc * qinv[:, None] * finv[None, :]
        sim = tl.where(sim == 0.0, 0.0, sim)  # -0.0 == +0.0 must tie: one bit image
        bits = sim.to(tl.int32, bitcast=True)
        hi = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # order-preserving int32 image
        low = (4294967295 - cols64)[None, :]  # inverted index: the lower row ranks first
        same = qlab[:, None] == lab[None, :]
        # NaN: a non-finite query or feature row (its inverse norm is NaN): no candidate
        sim_ok = (sim == sim) & col_ok[None, :]
        pos_ok = same & sim_ok & (cols64[None, :] != qidx[:, None])
        neg_ok = (qlab[:, None] != lab[None, :]) & sim_ok
        cand = tl.where(pos_ok, (hi.to(tl.int64) << 32) | low, NONE)
        # Selection merge. A row needs at most min(#cand > its minimum, K_P)
        # steps, each moving its largest remaining candidate over its smallest
        # kept key when larger; a row with nothing left is unchanged by a step.
        # Most tiles need 0 steps once the lists are warm.
        hit = cand > pos_min[:, None]
        steps = tl.reduce(tl.minimum(tl.reduce(hit.to(tl.int32), 1, _SUM), K_P), 0, _MAX)
        for _ in range(steps):
            top = tl.reduce(cand, 1, _MAX)
            take = (pos == pos_min[:, None]) & (top > pos_min)[:, None]
            pos = tl.where(take, top[:, None], pos)
            cand = tl.where(cand == top[:, None], NONE, cand)
            pos_min = tl.reduce(pos, 1, _MIN)
        cand = tl.where(neg_ok, ((hi ^ -1).to(tl.int64) << 32) | low, NONE)
        hit = cand > neg_min[:, None]
        steps = tl.reduce(tl.minimum(tl.reduce(hit.to(tl.int32), 1, _SUM), K_P), 0, _MAX)
        for _ in range(steps):
            top = tl.reduce(cand, 1, _MAX)
            take = (neg == neg_min[:, None]) & (top > neg_min)[:, None]
            neg = tl.where(take, top[:, None], neg)
            cand = tl.where(cand == top[:, None], NONE, cand)
            neg_min = tl.reduce(neg, 1, _MIN)
    # Output: k selection steps per list, largest key first; keys are unique, so
    # this is the exact contract order (§3.4). Placeholders (< NONE + K_P) decode to -1 / NaN.
    out = rows64 * k
    for t in range(k):
        top = tl.reduce(pos, 1, _MAX)
        pos = tl.where(pos == top[:, None], NONE, pos)
        none = top < NONE + K_P
        hi = (top >> 32).to(tl.int32)
        s = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        tl.store(pos_idx_ptr + out + t, tl.where(none, -1, 4294967295 - (top & 4294967295)), mask=row_ok)
        tl.store(pos_sim_ptr + out + t, tl.where(none, float("nan"), s), mask=row_ok)
        top = tl.reduce(neg, 1, _MAX)
        neg = tl.where(neg == top[:, None], NONE, neg)
        none = top < NONE + K_P
        hi = (top >> 32).to(tl.int32) ^ -1
        s = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        tl.store(neg_idx_ptr + out + t, tl.where(none, -1, 4294967295 - (top & 4294967295)), mask=row_ok)
        tl.store(neg_sim_ptr + out + t, tl.where(none, float("nan"), s), mask=row_ok)


def _inv_norm(x: torch.Tensor) -> torch.Tensor:
    """The reference's normalize_rows, as one fp32 factor per row.

    Copies of one row must get bit-equal factors (contract §3.4 ranks exact ties by index),
    but a vectorised reduction's order depends on where a row starts in memory: with
    ``D = 877`` consecutive rows start at different alignments and their norms differ
    in the last bit (seen on the CPU; the same holds on a GPU). Padding each row with
    zeros to a multiple of 64 bytes gives every row the same alignment, so the same
    arithmetic; the zeros do not change the sum.
    """
    xf = x.float()
    pad = -xf.shape[-1] % 16
    norm = (torch.nn.functional.pad(xf, (0, pad)) if pad else xf).norm(dim=-1)
    inv = torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))
    # A row with a NaN / inf entry gets a NaN factor, so each of its similarities is NaN,
    # which the kernel never ranks (contract §3.4: such a row is neither mined nor mining).
    return torch.where(torch.isfinite(xf).all(dim=-1), inv, torch.full_like(inv, float("nan"))).contiguous()


def launch_shape(k: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """``(BLOCK_Q, BLOCK_N, BLOCK_D, K_P, num_warps)`` for ``k`` and the input dtype.

    ``BLOCK_N >= K_P`` so that a tile's top-``K_P`` is a proper sub-selection. A
    taller query block (more reuse of each feature tile) only for fp16 / bf16 with
    ``k <= 16``: these are the largest tiles that ptxas (Triton 3.8, sm_90a)
    compiles without register spills -- the similarity tile, its int64 keys and
    the two int64 lists all live in registers. Not tuned on a GPU.
    """
    k_p = triton.next_power_of_2(k)
    block_q = 64 if k_p <= 16 and dtype != torch.float32 else 32
    # k = 50 in fp16 / bf16 spills a few bytes on sm_80 with 32-wide D slices
    block_d = 16 if k_p > 32 and dtype != torch.float32 else 32
    return block_q, 64, block_d, k_p, 8


@on_tensor_device
def mine_pairs_forward(features: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor,
                       query_labels: torch.Tensor, query_index: torch.Tensor, k: int, *,
                       block_q: int | None = None, block_n: int | None = None,
                       block_d: int | None = None) -> tuple[torch.Tensor, ...]:
    """Launch the kernel; returns ``(pos_idx, pos_sim, neg_idx, neg_sim)``, each ``(Q, k)``.

    Expects validated arguments (the public wrapper's checks) with ``k <= MAX_K``
    and a fp32 / fp16 / bf16 dtype. ``block_*`` override the tile sizes (tests use
    small tiles to cross many tile boundaries on small inputs).
    """
    if k > MAX_K:
        raise ValueError(f"mine_pairs (triton): k: expected <= {MAX_K}, got {k}")
    if features.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"mine_pairs (triton): features: expected fp32 / fp16 / bf16, got {features.dtype}")
    q, n, d = queries.shape[0], features.shape[0], features.shape[1]
    dev = features.device
    pos_idx = torch.empty((q, k), dtype=torch.long, device=dev)
    neg_idx = torch.empty((q, k), dtype=torch.long, device=dev)
    pos_sim = torch.empty((q, k), dtype=torch.float32, device=dev)
    neg_sim = torch.empty((q, k), dtype=torch.float32, device=dev)
    if q == 0:
        return pos_idx, pos_sim, neg_idx, neg_sim
    bq, bn, bd, k_p, warps = launch_shape(k, features.dtype)
    bq, bn, bd = block_q or bq, max(block_n or bn, k_p), block_d or bd
    f = features.contiguous()
    same_rows = queries.data_ptr() == features.data_ptr() and queries.shape == features.shape \
        and queries.stride() == features.stride()
    finv = _inv_norm(f)
    qf = f if same_rows else queries.contiguous()
    qinv = finv if same_rows else _inv_norm(qf)
    mine_pairs_kernel[(triton.cdiv(q, bq),)](
        qf, qinv, query_labels.contiguous(), query_index.contiguous(),
        f, finv, labels.contiguous(),
        pos_idx, pos_sim, neg_idx, neg_sim,
        q, n, d, k,
        BLOCK_Q=bq, BLOCK_N=bn, BLOCK_D=bd, K_P=k_p, IEEE=features.dtype == torch.float32,
        num_warps=warps)
    return pos_idx, pos_sim, neg_idx, neg_sim
