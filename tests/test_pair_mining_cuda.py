"""mine_pairs ``cuda`` backend (csrc/cuda/pair_mining.cu) against the eager reference.

GPU tests (``@pytest.mark.gpu``): random data with duplicated and zero rows, tiny
classes, k larger than a class, N and D off the tile sizes, fp32 / fp64 / fp16 /
bf16, sharded and external queries, exact ties decided by the lower-index rule,
bit-identical results for every number of key ranges (MSA_FAST_MINE_PAIRS_SPLITS).
The reference always runs on the CPU (no TF32 whatever the CUDA matmul settings).

CPU tests: a lane-by-lane NumPy emulation of the kernel's per-row list
(``WarpTopK``), of its tile loop / epilogue and of the key-range merge, checked
against a sort and
against the reference, so the selection logic is exercised without a GPU. The
emulation mirrors the CUDA code statement by statement: change both together.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from mining_data import random_mining_data as _data  # tests/mining_data.py

import msa_fast
from msa_fast.ops import mine_pairs
from msa_fast.ops import reference as R

_INFO = msa_fast.build_info()
needs_cuda_kernel = pytest.mark.skipif(
    not _INFO["extension"] or "mine_pairs" not in _INFO.get("cuda_ops", []),
    reason="msa_fast._C has no CUDA mine_pairs kernel (build with nvcc: pip install -e .)",
)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_kernel_was_built_where_gpu_check_requires_it():
    """On the GPU machine (``gpu_check.sh`` exports MSA_FAST_REQUIRE_CUDA_KERNELS=1) a build that
    lost the CUDA kernel is a failure, not a row of skipped tests."""
    if os.environ.get("MSA_FAST_REQUIRE_CUDA_KERNELS") != "1":
        pytest.skip("MSA_FAST_REQUIRE_CUDA_KERNELS is not 1 (only gpu_check.sh requires the build)")
    assert _INFO["extension"], _INFO
    assert "mine_pairs" in _INFO.get("cuda_ops", []), _INFO


# Kernel constants (csrc/cuda/pair_mining.cu) the emulation and the shapes use.
LANES = 32
TILE_KEYS = 64  # kBN
BLOCK_ROWS = 32  # kBQ
MAX_K = 64  # kMaxK

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (similarity tolerance, near-tie tolerance) per input dtype. fp16 / bf16 products
# are exact in the tensor cores' fp32 accumulators, so the error vs the fp32
# reference is fp32 rounding of the sums (looser: the MMA accumulation rounds
# differently from IEEE fma).
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 2e-6),
    torch.float16: (5e-5, 5e-5),
    torch.bfloat16: (5e-5, 5e-5),
}


# --------------------------------------------------------------------------- #
# Data and comparison helpers
# --------------------------------------------------------------------------- #


def _one_hot_data(n, d, classes, dtype, seed=1):
    """Rows +-2^p e_c and every 97th row zero: every similarity is exactly -1, 0 or 1
    in any arithmetic (products and norms of powers of two), so the lower-index rule
    alone orders the many ties -- across tile boundaries, for every dtype."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, d, (n,), generator=g)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    scale = sign * 2.0 ** torch.randint(-3, 4, (n,), generator=g)
    f = torch.zeros(n, d, dtype=torch.float64)
    f[torch.arange(n), c] = scale.double()
    f[::97] = 0
    return f.to(dtype), torch.randint(0, classes, (n,), generator=g)


def _true_sims(features, queries, idx, chunk=256):
    """fp64 cosine of each query with its rows ``idx`` (-1 -> nan), chunked over queries."""
    fn = R.normalize_rows(features.double())
    qn = R.normalize_rows(queries.double())
    out = torch.empty(idx.shape, dtype=torch.float64)
    for a in range(0, idx.shape[0], chunk):
        safe = idx[a:a + chunk].clamp(min=0)
        out[a:a + chunk] = (qn[a:a + chunk, None, :] * fn[safe]).sum(-1)
    return out.masked_fill(idx < 0, float("nan"))


def _cpu(res):
    return R.MinedPairs(*(t.cpu() for t in res))


def assert_mined_close(got, want, features, queries, labels, qlabels, qindex, sim_tol, tie_tol):
    """``got`` is a correct result and equals the reference ``want`` up to near ties.

    Exact: shapes, dtypes, which slots are missing (min(k, #candidates) filled), the
    label / self rules, sorted lists without repeated rows. Within ``sim_tol``: each
    similarity vs the reference slot by slot (sorted order statistics move by at
    most the error) and vs the fp64 cosine of the row it names. Indices: equal to
    the reference's unless the two rows' fp64 cosines are within ``tie_tol``.
    All tensors on the CPU.
    """
    n = features.shape[0]
    same = qlabels[:, None] == labels[None, :]  # (Q, N): test sizes only
    is_self = qindex[:, None] == torch.arange(n)[None, :]
    for name, cand in (("pos", same & ~is_self), ("neg", ~same)):
        gi, gs = getattr(got, f"{name}_idx"), getattr(got, f"{name}_sim")
        wi, ws = getattr(want, f"{name}_idx"), getattr(want, f"{name}_sim")
        k = wi.shape[1]
        assert gi.shape == wi.shape and gs.shape == ws.shape, name
        assert gi.dtype == torch.int64 and gs.dtype == ws.dtype, (name, gs.dtype, ws.dtype)
        filled = torch.arange(k)[None, :] < cand.sum(1, keepdim=True).clamp(max=k)
        assert torch.equal(gi >= 0, filled), f"{name}: wrong number of candidates"
        assert torch.equal(gs.isnan(), ~filled), f"{name}: nan slots"
        ok = gi >= 0
        assert cand.gather(1, gi.clamp(min=0))[ok].all(), f"{name}: label / self rule broken"
        srt = gi.sort(1).values  # the -1 slots first
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, :-1] >= 0)
        assert not dup.any(), f"{name}: a row picked twice"
        step = gs[:, 1:] - gs[:, :-1]
        both = ok[:, 1:] & ok[:, :-1]
        assert ((step <= 0) if name == "pos" else (step >= 0))[both].all(), f"{name}: not sorted"
        torch.testing.assert_close(gs, ws, rtol=0, atol=sim_tol, equal_nan=True, msg=name)
        tg = _true_sims(features, queries, gi)
        assert ((gs.double() - tg).abs() <= sim_tol)[ok].all(), f"{name}: sim vs fp64 cosine"
        tie = (tg - _true_sims(features, queries, wi)).abs() <= tie_tol
        bad = (gi != wi) & ~tie
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} index mismatches outside near ties, first at "
            f"{bad.nonzero()[0].tolist()}: got {gi[bad][:5].tolist()} want {wi[bad][:5].tolist()}")


def _assert_identical(got, want):
    for a, b, name in zip(got, want, R.MinedPairs._fields):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


# --------------------------------------------------------------------------- #
# CPU: lane-level emulation of the kernel's selection
# --------------------------------------------------------------------------- #


def _before(largest, a_s, a_i, b_s, b_i):
    """ranks_before: larger (pos) / smaller (neg) similarity, then lower index."""
    better = (a_s > b_s) if largest else (a_s < b_s)
    return np.where(a_s != b_s, better, a_i < b_i)


def _shfl_up(x):
    # __shfl_up_sync(mask, x, 1): lane l reads lane l - 1; lane 0 keeps its own value.
    return np.concatenate([x[:1], x[:-1]])


class _WarpTopKEmu:
    """WarpTopK<T, kLargest> of csrc/cuda/pair_mining.cu, one NumPy element per lane."""

    def __init__(self, k, largest, dtype=np.float32):
        self.k, self.largest = k, largest
        self.s0 = np.zeros(LANES, dtype)
        self.s1 = np.zeros(LANES, dtype)
        self.i0 = np.full(LANES, -1, np.int64)
        self.i1 = np.full(LANES, -1, np.int64)
        self.size = 0
        self.worst_s, self.worst_i = dtype(0), -1

    def admits(self, s, i):
        return (self.size < self.k) | _before(self.largest, s, i, self.worst_s, self.worst_i)

    def insert(self, cs, ci):
        lane = np.arange(LANES)
        b0 = (lane < self.size) & _before(self.largest, self.s0, self.i0, cs, ci)
        b1 = (lane + 32 < self.size) & _before(self.largest, self.s1, self.i1, cs, ci)
        p = int(b0.sum() + b1.sum())  # popc of the two ballots
        prev_s0, prev_i0 = _shfl_up(self.s0), _shfl_up(self.i0)
        prev_s1, prev_i1 = _shfl_up(self.s1), _shfl_up(self.i1)
        prev_s1[0], prev_i1[0] = self.s0[31], self.i0[31]
        self.s0 = np.where(lane > p, prev_s0, np.where(lane == p, cs, self.s0)).astype(self.s0.dtype)
        self.i0 = np.where(lane > p, prev_i0, np.where(lane == p, ci, self.i0))
        self.s1 = np.where(lane + 32 > p, prev_s1, np.where(lane + 32 == p, cs, self.s1)).astype(self.s1.dtype)
        self.i1 = np.where(lane + 32 > p, prev_i1, np.where(lane + 32 == p, ci, self.i1))
        self.size = min(self.size + 1, self.k)
        if self.size == self.k:
            src = (self.k - 1) & 31
            if self.k - 1 < 32:
                self.worst_s, self.worst_i = self.s0[src], self.i0[src]
            else:
                self.worst_s, self.worst_i = self.s1[src], self.i1[src]

    def offer(self, ok, v, key):
        mask = ok & self.admits(v, key)  # the ballot
        for src in np.flatnonzero(mask):  # __ffs order: lowest lane first
            if self.admits(v[src], key[src]):
                self.insert(v[src], key[src])

    def result(self):
        lane = np.arange(LANES)
        idx = np.concatenate([np.where(lane < self.size, self.i0, -1),
                              np.where(lane + 32 < self.size, self.i1, -1)])[:self.k]
        sim = np.concatenate([np.where(lane < self.size, self.s0, np.nan),
                              np.where(lane + 32 < self.size, self.s1, np.nan)])[:self.k]
        return idx, sim


@pytest.mark.parametrize("k", [1, 2, 31, 32, 33, 63, 64])
@pytest.mark.parametrize("largest", [True, False], ids=["pos", "neg"])
def test_warp_topk_emulation_matches_sort(k, largest):
    # Few distinct values (many exact ties), random key order and random masks:
    # the list must hold the k best (sim, then lower index) whatever the order.
    rng = np.random.default_rng(k * 2 + largest)
    m = 9 * LANES
    keys = rng.permutation(10 * m)[:m]
    sims = (rng.integers(-6, 7, m) / 4).astype(np.float32)
    ok = rng.random(m) < 0.8
    lst = _WarpTopKEmu(k, largest)
    for a in range(0, m, LANES):
        lst.offer(ok[a:a + LANES], sims[a:a + LANES], keys[a:a + LANES])
    cand = sorted(zip(sims[ok].tolist(), keys[ok].tolist()),
                  key=lambda t: ((-t[0]) if largest else t[0], t[1]))[:k]
    want_idx = np.full(k, -1)
    want_sim = np.full(k, np.nan)
    want_idx[:len(cand)] = [c[1] for c in cand]
    want_sim[:len(cand)] = [c[0] for c in cand]
    got_idx, got_sim = lst.result()
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_array_equal(got_sim, want_sim)


def _merge_emu(parts, k, largest):
    """merge_splits_kernel for one row: the partial lists offered 32 slots at a time."""
    lst = _WarpTopKEmu(k, largest)
    for idx, sim in parts:  # each of length k, -1 / nan past its size
        for t in range(0, k, LANES):
            m = min(LANES, k - t)  # lanes with slot t + lane < k
            i = np.full(LANES, -1, np.int64)
            i[:m] = idx[t:t + m]
            v = np.zeros(LANES, np.float32)
            v[:m] = np.where(i[:m] >= 0, sim[t:t + m], np.float32(0))
            lst.offer(i >= 0, v, i)
    return lst.result()


def _emulate_kernel(features, labels, queries, qlabels, qindex, k, splits=1):
    """mine_pairs_kernel's tile loop and epilogue for fp32 inputs, one query row at a
    time (rows are independent in the kernel): raw fp32 dot products, scaled by the
    two inverse norms in the kernel's association, lane l offering keys j0 + l and
    j0 + 32 + l of each 64-key tile to both lists; with ``splits`` > 1, the host's
    key ranges and merge_splits_kernel."""
    f = features.float()
    q = queries.float()

    def inv_norm(x):
        norm = torch.linalg.vector_norm(x, dim=1)
        return torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm)).numpy()

    inv_f, inv_q = inv_norm(f), inv_norm(q)
    raw = (q.double() @ f.double().T).float().numpy()  # the GEMM, rounded once to fp32
    lab, qlab, qidx = labels.numpy(), qlabels.numpy(), qindex.numpy()
    n, nq = f.shape[0], q.shape[0]
    out = [np.full((nq, k), -1, np.int64), np.full((nq, k), np.nan, np.float32),
           np.full((nq, k), -1, np.int64), np.full((nq, k), np.nan, np.float32)]
    lane = np.arange(LANES)
    ntiles = -(-n // TILE_KEYS)
    per = max(1, -(-ntiles // splits))  # launch(): tiles_per_split, then the used splits
    ranges = [(a * TILE_KEYS, min(n, (a + per) * TILE_KEYS)) for a in range(0, max(ntiles, 1), per)]
    for r in range(nq):
        pos_parts, neg_parts = [], []
        for j_begin, j_end in ranges:
            pos, neg = _WarpTopKEmu(k, True), _WarpTopKEmu(k, False)
            for j0 in range(j_begin, j_end, TILE_KEYS):
                for h in range(2):
                    key = j0 + lane + 32 * h
                    valid = key < j_end
                    safe = np.minimum(key, n - 1)
                    inv = np.where(valid, inv_f[safe], np.float32(0))
                    v = np.where(valid, raw[r, safe], np.float32(0)) * inv_q[r] * inv  # (dot * iq) * if
                    same = valid & (lab[safe] == qlab[r])
                    pos.offer(same & (key != qidx[r]), v.astype(np.float32), key)
                    neg.offer(valid & ~same, v.astype(np.float32), key)
            pos_parts.append(pos.result())
            neg_parts.append(neg.result())
        if len(ranges) == 1:
            (out[0][r], out[1][r]), (out[2][r], out[3][r]) = pos_parts[0], neg_parts[0]
        else:
            out[0][r], out[1][r] = _merge_emu(pos_parts, k, True)
            out[2][r], out[3][r] = _merge_emu(neg_parts, k, False)
    return R.MinedPairs(*(torch.from_numpy(o) for o in out))


@pytest.mark.parametrize("k, splits", [(5, 1), (33, 1), (64, 1), (5, 3), (33, 2)])
def test_kernel_emulation_matches_reference(k, splits):
    # N = 150: two full tiles and a partial one; classes of ~50 < k = 64; duplicated
    # and zero rows; the default queries plus external ones (-1) and shifted ones.
    f, labels = _data(150, 6, 3, dup=10, zeros=3, seed=k)
    qi = torch.cat([torch.arange(0, 150, 7), torch.tensor([-1, -1, -1])])
    q = f[qi.clamp(min=0)].clone()
    q[-1] = 0  # a zero query: every similarity 0, lowest indices first
    q[-2] = torch.randn(6)
    ql = labels[qi.clamp(min=0)].clone()
    got = _emulate_kernel(f, labels, q, ql, qi, k, splits)
    want = R.mine_pairs(f, labels, k, q, ql, qi)
    assert_mined_close(got, want, f, q, labels, ql, qi, *TOL[torch.float32])
    z = got.pos_idx[-1]
    cand = ((labels == ql[-1]).nonzero().flatten())[:k]
    assert torch.equal(z[:len(cand)], cand) and (z[len(cand):] == -1).all()


@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_emulation_exact_ties(splits):
    f, labels = _one_hot_data(200, 3, 3, torch.float32)
    qi = torch.arange(0, 200, 3)
    got = _emulate_kernel(f, labels, f[qi], labels[qi], qi, 40, splits)
    _assert_identical(got, R.mine_pairs(f, labels, 40, f[qi], labels[qi], qi))


# --------------------------------------------------------------------------- #
# GPU: the cuda backend against the CPU reference
# --------------------------------------------------------------------------- #

CASES = {
    # id: (N, D, classes, k, duplicated rows, zero rows)
    "d37": (1000, 37, 5, 7, 40, 3),  # D off every chunk size, N off the tile
    "d64-k64": (2049, 64, 3, 64, 10, 1),  # 16-byte loads for fp16 / bf16, k = max
    "k>class": (130, 8, 4, 50, 4, 1),  # classes of ~32 rows < k
    "n<tile": (10, 5, 2, 15, 2, 1),  # one partial tile, k > N
    "d200-k33": (700, 200, 6, 33, 5, 2),  # several D chunks, k across the two slots
}


def _run_case(f, labels, k, dtype, queries=None, qlabels=None, qindex=None):
    fc, lc = f.cuda(), labels.cuda()
    if queries is None:
        got = mine_pairs(fc, lc, k, backend="cuda")
        queries, qlabels, qindex = f, labels, torch.arange(f.shape[0])
    else:
        got = mine_pairs(fc, lc, k, queries.cuda(), qlabels.cuda(), qindex.cuda(), backend="cuda")
    want = R.mine_pairs(f, labels, k, queries, qlabels, qindex)
    got = _cpu(got)
    assert_mined_close(got, want, f, queries, labels, qlabels, qindex, *TOL[dtype])
    return got


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cuda_matches_reference(case, dtype):
    n, d, classes, k, dup, zeros = CASES[case]
    f, labels = _data(n, d, classes, dtype, dup=dup, zeros=zeros)
    got = _run_case(f, labels, k, dtype)
    assert got.pos_sim.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [3, 8])  # the scalar and (fp16 / bf16) 16-byte staging
@pytest.mark.parametrize("k", [9, 64])
def test_cuda_exact_ties(dtype, d, k):
    f, labels = _one_hot_data(2600, d, 3, dtype)
    got = _cpu(mine_pairs(f.cuda(), labels.cuda(), k, backend="cuda"))
    _assert_identical(got, R.mine_pairs(f, labels, k))


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_zero_rows_take_lowest_indices(dtype):
    # A zero query has similarity exactly 0 to every row: its lists are the lowest
    # candidate indices in order. Zero feature rows are candidates with similarity 0.
    f, labels = _data(300, 19, 3, dtype, zeros=5)
    f[[4, 150, 299]] = 0
    got = _run_case(f, labels, 40, dtype)
    for r in (4, 150, 299):
        pos_c = ((labels == labels[r]) & (torch.arange(300) != r)).nonzero().flatten()[:40]
        neg_c = (labels != labels[r]).nonzero().flatten()[:40]
        assert torch.equal(got.pos_idx[r], pos_c) and (got.pos_sim[r] == 0).all()
        assert torch.equal(got.neg_idx[r], neg_c) and (got.neg_sim[r] == 0).all()
    zero_rows = (f == 0).all(1)
    for idx, sim in ((got.pos_idx, got.pos_sim), (got.neg_idx, got.neg_sim)):
        hit = (idx >= 0) & zero_rows[idx.clamp(min=0)]
        assert (sim[hit] == 0).all()


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_tiny_classes(dtype):
    # Classes of 1, 2 and 3 rows (k larger than the class) next to a big one.
    f, labels = _data(400, 11, 1, dtype, dup=5, zeros=2)
    labels[[3, 100, 250, 7, 399, 0]] = torch.tensor([1, 2, 2, 3, 3, 3])
    got = _run_case(f, labels, 5, dtype)
    assert (got.pos_idx[3] == -1).all() and got.pos_sim[3].isnan().all()
    assert got.pos_idx[100].tolist() == [250, -1, -1, -1, -1]
    assert sorted(got.pos_idx[7, :2].tolist()) == [0, 399] and (got.pos_idx[7, 2:] == -1).all()


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_sharded_queries(dtype):
    # Blocks of rows with their query_index: the rows of the full result, whatever
    # the block's size or offset relative to the kernel's 32-row blocks.
    f, labels = _data(1900, 33, 6, dtype, dup=20, zeros=2)
    full = _run_case(f, labels, 10, dtype)
    for a, b in ((0, 1), (31, 97), (1500, 1900)):
        rows = torch.arange(a, b)
        shard = _run_case(f, labels, 10, dtype, f[a:b], labels[a:b], rows)
        assert_mined_close(shard, R.MinedPairs(*(t[a:b] for t in full)), f, f[a:b], labels,
                           labels[a:b], rows, *TOL[dtype])


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_external_queries(dtype):
    # Queries that are not rows (query_index -1): an exact copy of a row is its own
    # best positive; a zero query; a non-contiguous features view; and, for 16-bit
    # inputs with D % 8 == 0, queries at a 2-byte offset (the scalar staging path).
    base, labels = _data(2300, 48, 4, dtype, dup=10, zeros=2)
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(37 * 24 + 1, generator=g, dtype=torch.float64).to(dtype)
    queries = flat[1:].view(37, 24)  # storage offset 1 element
    f = base[:, ::2]  # (2300, 24), stride 2
    queries[5] = f[100]
    queries[6] = 0
    qlabels = torch.randint(0, 4, (37,), generator=g)
    qlabels[5] = labels[100]
    qi = torch.full((37,), -1)
    got = _run_case(f, labels, 8, dtype, queries, qlabels, qi)
    assert got.pos_sim[5, 0] == pytest.approx(1.0, abs=TOL[dtype][0])
    assert (got.pos_sim[6] == 0).all() and (got.neg_sim[6] == 0).all()
    # The misaligned queries through the kernel directly (the wrapper passes them as is).
    fc = f.cuda()
    qc = torch.empty(37 * 24 + 1, dtype=dtype, device="cuda")[1:].view(37, 24)
    qc.copy_(queries)
    out = _cpu(R.MinedPairs(*torch.ops.msa_fast.mine_pairs(fc, labels.cuda(), qc, qlabels.cuda(), qi.cuda(), 8)))
    # Same data, so the same result up to the norms' rounding (ATen may reduce a
    # misaligned row in another order).
    assert_mined_close(out, got, f, queries, labels, qlabels, qi, *TOL[dtype])


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_large(dtype):
    # Many query blocks and key tiles (MOSEI-like D), fp16 with values far from 1.
    f, labels = _data(6000, 128, 7, dtype, dup=50, zeros=4)
    if dtype == torch.float16:
        f = (f.float() * 300).half()
    _run_case(f, labels, 64, dtype)


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_key_splits_identical(dtype, monkeypatch):
    # Any number of key ranges gives the same bits: each range keeps its exact
    # top-k and the merge applies the same total order. 1000 forces one tile per
    # range (clamped to the 33 tiles); Q = 40 and 2100 (one and many query blocks).
    f, labels = _data(2100, 40, 4, dtype, dup=30, zeros=3)
    fc, lc = f.cuda(), labels.cuda()
    for q_rows in (40, 2100):
        qi = torch.arange(q_rows, device="cuda")
        results = []
        for splits in ("1", "2", "7", "1000", "0"):
            monkeypatch.setenv("MSA_FAST_MINE_PAIRS_SPLITS", splits)
            results.append(_cpu(mine_pairs(fc, lc, 37, fc[:q_rows], lc[:q_rows], qi, backend="cuda")))
        for other in results[1:]:
            _assert_identical(other, results[0])
        qi = qi.cpu()
        want = R.mine_pairs(f, labels, 37, f[:q_rows], labels[:q_rows], qi)
        assert_mined_close(results[0], want, f, f[:q_rows], labels, labels[:q_rows], qi, *TOL[dtype])


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_empty_and_degenerate_shapes():
    labels = torch.randint(0, 3, (70,), device="cuda")
    # D == 0: every similarity 0.
    got = mine_pairs(torch.zeros(70, 0, device="cuda"), labels, 5, backend="cuda")
    _assert_identical(_cpu(got), R.mine_pairs(torch.zeros(70, 0), labels.cpu(), 5))
    # N == 0: nothing to mine.
    out = mine_pairs(torch.zeros(0, 4, device="cuda"), torch.zeros(0, dtype=torch.long, device="cuda"),
                     3, torch.randn(2, 4, device="cuda"), torch.tensor([0, 1], device="cuda"),
                     backend="cuda")
    assert out.pos_idx.shape == (2, 3) and (out.pos_idx == -1).all() and out.neg_sim.isnan().all()
    # Q == 0.
    f = torch.randn(70, 4, device="cuda")
    out = mine_pairs(f, labels, 3, f[:0], labels[:0], backend="cuda")
    assert out.pos_idx.shape == (0, 3) and out.neg_sim.shape == (0, 3)


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_k_range_and_direct_checks():
    f, labels = _data(100, 4, 2)
    f, labels = f.cuda(), labels.cuda()
    _run_case(f.cpu(), labels.cpu(), MAX_K, torch.float32)
    with pytest.raises(RuntimeError, match=str(MAX_K)):
        mine_pairs(f, labels, MAX_K + 1, backend="cuda")
    op = torch.ops.msa_fast.mine_pairs
    qi = torch.arange(100, device="cuda")
    with pytest.raises(RuntimeError, match="k:"):
        op(f, labels, f, labels, qi, MAX_K + 1)
    with pytest.raises(RuntimeError, match="k:"):
        op(f, labels, f, labels, qi, 0)
    with pytest.raises(RuntimeError, match="query_index"):
        op(f, labels, f, labels, torch.full((100,), 100, device="cuda"), 3)
    with pytest.raises(RuntimeError, match="expected every tensor on"):
        op(f, labels.cpu(), f, labels, qi, 3)
