"""mine_pairs (SPEC 3.4): the eager reference on a hand-computed case, the C++
(``cpp``) and CUDA (``cuda``) kernels against the reference, validation, opcheck,
torch.compile, and ``sentiment_classes``."""

from __future__ import annotations

import math

import pytest
import torch

import msa_fast
from msa_fast.ops import mine_pairs, sentiment_classes
from msa_fast.ops import reference as R

HAS_EXT = msa_fast.build_info()["extension"]
needs_cpp = pytest.mark.skipif(
    not HAS_EXT or "mine_pairs" not in msa_fast.build_info()["cpu_ops"],
    reason="msa_fast._C is not built (pip install --no-build-isolation -e .)",
)

SIM_TOL = 1e-5  # fp32 cosine of unit vectors: the kernels' GEMM tiles round differently
TIE_TOL = 1e-6  # two similarities this close may legitimately swap order


# --------------------------------------------------------------------------- #
# Comparison helper
# --------------------------------------------------------------------------- #


def _true_sims(features, queries, idx):
    """fp64 cosine of each query with the rows ``idx`` (-1 -> nan)."""
    fn = R.normalize_rows(features.double())
    qn = R.normalize_rows(queries.double())
    safe = idx.clamp(min=0)
    s = (qn[:, None, :] * fn[safe]).sum(-1)
    return s.masked_fill(idx < 0, float("nan"))


def _near(a, b, tol):
    return (a - b).abs() <= tol


def assert_mined_equal(got, want, features=None, queries=None, sim_tol=SIM_TOL, tie_tol=TIE_TOL):
    """``got`` equals ``want`` up to ties.

    Similarities: allclose (``sim_tol``), nan (missing) slots identical. Indices:
    equal wherever the slot is not a near tie, i.e. where the reference
    similarity differs by more than ``tie_tol`` from both neighbouring slots and,
    when ``features`` is given, where the two picked rows' exact (fp64)
    similarities differ by more than ``tie_tol`` (covers a tie with the first row
    just outside the top-k).
    """
    for name in ("pos", "neg"):
        gi, gs = getattr(got, f"{name}_idx"), getattr(got, f"{name}_sim")
        wi, ws = getattr(want, f"{name}_idx"), getattr(want, f"{name}_sim")
        assert gi.shape == wi.shape and gs.shape == ws.shape, name
        assert gi.dtype == torch.int64 and gs.dtype == ws.dtype, name
        assert torch.equal(gi < 0, wi < 0), f"{name}: different number of candidates"
        torch.testing.assert_close(gs, ws, rtol=0, atol=sim_tol, equal_nan=True, msg=name)
        w = ws.double()
        tie = torch.zeros_like(wi, dtype=torch.bool)
        if w.shape[1] > 1:
            step = _near(w[:, 1:], w[:, :-1], tie_tol)
            tie[:, 1:] |= step
            tie[:, :-1] |= step
        if features is not None:
            q = features if queries is None else queries
            tie |= _near(_true_sims(features, q, gi), _true_sims(features, q, wi), tie_tol)
        bad = (gi != wi) & ~tie
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} index mismatches outside ties, first at "
            f"{bad.nonzero()[0].tolist()}: got {gi[bad][:5].tolist()} want {wi[bad][:5].tolist()}")


def assert_valid(res, labels, query_labels, query_index):
    """Every picked row obeys the label / self rules and the lists are sorted."""
    for name, same in (("pos", True), ("neg", False)):
        idx, sim = getattr(res, f"{name}_idx"), getattr(res, f"{name}_sim")
        ok = idx >= 0
        lab = labels[idx.clamp(min=0)]
        assert ((lab == query_labels[:, None]) == same)[ok].all(), name
        if same:
            assert not (idx == query_index[:, None])[ok & (query_index[:, None] >= 0)].any()
        d = sim[:, 1:] - sim[:, :-1]
        both = ok[:, 1:] & ok[:, :-1]
        assert ((d <= 0) if same else (d >= 0))[both].all(), f"{name} not sorted"


def _data(n, d, classes, dtype=torch.float32, dup=0, zeros=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    if dup:  # exact duplicates of earlier rows -> exact similarity ties
        src = torch.randint(0, n, (dup,), generator=g)
        dst = torch.randint(0, n, (dup,), generator=g)
        f[dst] = f[src]
    if zeros:
        f[torch.randint(0, n, (zeros,), generator=g)] = 0
    return f, labels


# --------------------------------------------------------------------------- #
# Reference
# --------------------------------------------------------------------------- #


def test_reference_hand_case():
    # Unit rows r0=(1,0) r1=(0,1) r2=(1,1)/sqrt2 r3=(-1,0) r4=(1,0); labels 0 0 0 1 1.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1])
    r = R.mine_pairs(f, labels, 2)
    h = 1 / math.sqrt(2)
    nan = float("nan")
    assert r.pos_idx.tolist() == [[2, 1], [2, 0], [0, 1], [4, -1], [3, -1]]  # row 2: exact tie 0 vs 1
    assert r.neg_idx.tolist() == [[3, 4], [3, 4], [3, 4], [0, 2], [1, 2]]  # row 1: 0 vs 0 tie
    want_pos = torch.tensor([[h, 0], [h, 0], [h, h], [-1, nan], [-1, nan]], dtype=torch.float64)
    want_neg = torch.tensor([[-1, 1], [0, 0], [-h, h], [-1, -h], [0, h]], dtype=torch.float64)
    torch.testing.assert_close(r.pos_sim, want_pos, equal_nan=True)
    torch.testing.assert_close(r.neg_sim, want_neg, equal_nan=True)


def test_sentiment_classes():
    y = torch.tensor([-3.7, -3.0, -2.5, -1.5, -0.5, 0.0, 0.5, 1.5, 2.5, 3.0, 9.0, -0.2, 0.2])
    # Half to even before the +3 shift: -2.5 -> -2, -1.5 -> -2, -0.5 -> 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    assert sentiment_classes(y, "7").tolist() == [0, 0, 1, 1, 3, 3, 3, 5, 5, 6, 6, 3, 3]
    assert sentiment_classes(y, "3").tolist() == [0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 0, 2]
    assert sentiment_classes(y, "2").tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1]
    assert sentiment_classes(y).dtype == torch.int64
    with pytest.raises(ValueError, match="scheme"):
        sentiment_classes(y, "5")


# --------------------------------------------------------------------------- #
# C++ kernel vs reference
# --------------------------------------------------------------------------- #

CASES = {
    # id: (N, D, classes, k, dtype, duplicated rows, zero rows)
    "fp32-dups-zeros": (1000, 37, 5, 7, torch.float32, 40, 3),
    # > one key block (2048) and > one query block (512), N a multiple of neither.
    "fp64-blocks": (2501, 19, 7, 50, torch.float64, 30, 2),
    "fp32-blocks-k1": (2049, 64, 3, 1, torch.float32, 10, 1),
    "k>N": (10, 5, 2, 15, torch.float32, 2, 1),
    "one-class": (300, 8, 1, 4, torch.float64, 0, 0),  # no negatives at all
}


@needs_cpp
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cpp_matches_reference(case):
    n, d, classes, k, dtype, dup, zeros = CASES[case]
    f, labels = _data(n, d, classes, dtype, dup=dup, zeros=zeros)
    got = mine_pairs(f, labels, k, backend="cpp")
    want = R.mine_pairs(f, labels, k)
    assert got.pos_sim.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_mined_equal(got, want, f)
    assert_valid(got, labels, labels, torch.arange(n))


@needs_cpp
def test_cpp_tiny_classes():
    # Classes of size 1, 2 and 3 (k larger than the class) next to a big one.
    f, labels = _data(400, 11, 1, torch.float32, dup=5, zeros=2)
    labels[[3, 100, 250, 7, 399, 0]] = torch.tensor([1, 2, 2, 3, 3, 3])
    got = mine_pairs(f, labels, 5, backend="cpp")
    want = R.mine_pairs(f, labels, 5)
    assert_mined_equal(got, want, f)
    assert (got.pos_idx[3] == -1).all() and got.pos_sim[3].isnan().all()
    assert got.pos_idx[100].tolist() == [250, -1, -1, -1, -1]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_exact_ties(dtype):
    # Rows 2^p * e_c: unit rows are exact one-hots, every similarity is exactly 0
    # or 1, so the lower-index rule alone decides -- across tile boundaries too.
    g = torch.Generator().manual_seed(1)
    n, d = 2600, 3
    c = torch.randint(0, d, (n,), generator=g)
    scale = 2.0 ** torch.randint(-3, 4, (n,), generator=g).to(dtype)
    f = torch.zeros(n, d, dtype=dtype)
    f[torch.arange(n), c] = scale
    f[::97] = 0  # zero rows: similarity 0 to everything
    labels = torch.randint(0, 3, (n,), generator=g)
    got = mine_pairs(f, labels, 9, backend="cpp")
    want = R.mine_pairs(f, labels, 9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_half_inputs(dtype):
    f, labels = _data(700, 24, 4, dtype, dup=10)
    got = mine_pairs(f, labels, 6, backend="cpp")
    want = R.mine_pairs(f, labels, 6)
    assert got.pos_sim.dtype == torch.float32
    assert_mined_equal(got, want, f)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_external_queries(dtype):
    f, labels = _data(2300, 21, 4, dtype, dup=10, zeros=2)
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(37, 21, generator=g, dtype=torch.float64).to(dtype)
    queries[5] = f[100]  # an external copy of a row: itself is a candidate
    queries[6] = 0
    qlabels = torch.randint(0, 4, (37,), generator=g)
    qlabels[5] = labels[100]
    got = mine_pairs(f, labels, 8, queries, qlabels, backend="cpp")
    want = R.mine_pairs(f, labels, 8, queries, qlabels)
    assert_mined_equal(got, want, f, queries)
    qi = torch.full((37,), -1)
    assert_valid(got, labels, qlabels, qi)
    assert got.pos_sim[5, 0] == pytest.approx(1.0, abs=1e-6)  # its copy at row 100 (or a duplicate)
    assert (got.pos_sim[6][got.pos_idx[6] >= 0] == 0).all()  # zero query
    assert (got.neg_sim[6][got.neg_idx[6] >= 0] == 0).all()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_sharded_rows_equal_full(dtype):
    f, labels = _data(1900, 33, 6, dtype, dup=20, zeros=2)
    full_cpp = mine_pairs(f, labels, 10, backend="cpp")
    full_ref = R.mine_pairs(f, labels, 10)
    for a, b in ((0, 1), (200, 713), (1500, 1900)):
        rows = torch.arange(a, b)
        shard = mine_pairs(f, labels, 10, f[a:b], labels[a:b], rows, backend="cpp")
        want = type(full_ref)(*(t[a:b] for t in full_ref))
        assert_mined_equal(shard, want, f, f[a:b])
        assert_mined_equal(shard, type(full_cpp)(*(t[a:b] for t in full_cpp)), f, f[a:b])


@needs_cpp
def test_cpp_copied_queries_take_general_path():
    # queries == features but another tensor: the kernel cannot use the symmetric
    # half-GEMM path and streams all Q x N tiles (Q spans several query blocks).
    f, labels = _data(2200, 17, 5, torch.float32, dup=20, zeros=2)
    got = mine_pairs(f, labels, 12, f.clone(), labels.clone(), torch.arange(2200), backend="cpp")
    assert_mined_equal(got, R.mine_pairs(f, labels, 12), f)
    assert_mined_equal(got, mine_pairs(f, labels, 12, backend="cpp"), f)


@needs_cpp
def test_cpp_empty_features():
    f = torch.zeros(0, 4)
    out = mine_pairs(f, torch.zeros(0, dtype=torch.long), 3, torch.randn(2, 4),
                     torch.tensor([0, 1]), backend="cpp")
    assert out.pos_idx.shape == (2, 3) and (out.pos_idx == -1).all() and out.neg_sim.isnan().all()


@needs_cpp
def test_cpp_direct_call_checks():
    # C++ users reach the op without the Python validation.
    f, labels = _data(20, 4, 2)
    op = torch.ops.msa_fast.mine_pairs
    with pytest.raises(RuntimeError, match="query_index"):
        op(f, labels, f, labels, torch.full((20,), 20), 3)
    with pytest.raises(RuntimeError, match="k: expected"):
        op(f, labels, f, labels, torch.arange(20), 0)
    with pytest.raises(RuntimeError, match="labels"):
        op(f, labels[:5], f, labels, torch.arange(20), 3)


@needs_cpp
def test_opcheck():
    f, labels = _data(40, 6, 3, dup=3, zeros=1)
    q = torch.randn(5, 6)
    # No missing slots: opcheck compares outputs without equal_nan.
    for args in ((f, labels, f, labels, torch.arange(40), 4),
                 (f, labels, q, torch.tensor([0, 1, 2, 0, 1]), torch.tensor([-1, 3, -1, 0, 39]), 3),
                 (f.double(), labels, f.double(), labels, torch.arange(40), 2)):
        torch.library.opcheck(torch.ops.msa_fast.mine_pairs, args)


@needs_cpp
def test_torch_compile_fullgraph():
    f, labels = _data(64, 8, 3)
    fn = torch.compile(lambda x, y: mine_pairs(x, y, 5, backend="cpp"), fullgraph=True)
    got = fn(f, labels)
    assert_mined_equal(got, R.mine_pairs(f, labels, 5), f)


# --------------------------------------------------------------------------- #
# Validation and backends
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(features=torch.randn(10)), "features"),  # wrong rank
        (dict(labels=torch.zeros(9, dtype=torch.long)), "labels"),  # wrong length
        (dict(labels=torch.zeros(10)), "labels"),  # float labels
        (dict(k=0), "k"),
        (dict(queries=torch.randn(3, 5), query_labels=torch.zeros(3, dtype=torch.long)), "queries"),
        (dict(queries=torch.randn(3, 4), query_labels=torch.zeros(2, dtype=torch.long)), "query_labels"),
        (dict(queries=torch.randn(3, 4), query_labels=torch.zeros(3, dtype=torch.long),
              query_index=torch.tensor([0, 1, 10])), "query_index"),
    ],
)
def test_bad_inputs(kwargs, arg):
    args = dict(features=torch.randn(10, 4), labels=torch.zeros(10, dtype=torch.long), k=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"mine_pairs: {arg}:"):
        mine_pairs(**args, backend="eager")


def test_cuda_backend_on_cpu_tensors():
    f, labels = _data(10, 4, 2)
    with pytest.raises(RuntimeError, match="cuda"):
        mine_pairs(f, labels, 3, backend="cuda")


# --------------------------------------------------------------------------- #
# CUDA kernel
# --------------------------------------------------------------------------- #


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_cuda_matches_reference(case):
    n, d, classes, k, dtype, dup, zeros = CASES[case]
    f, labels = _data(n, d, classes, dtype, dup=dup, zeros=zeros)
    f, labels = f.cuda(), labels.cuda()
    got = mine_pairs(f, labels, k, backend="cuda")
    want = R.mine_pairs(f, labels, k)
    assert_mined_equal(got, want, f)
    assert_valid(got, labels, labels, torch.arange(n, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_exact_ties_queries_and_half(dtype):
    f, labels = _data(3000, 40, 4, dtype, dup=30, zeros=3)
    f, labels = f.cuda(), labels.cuda()
    q, ql = f[500:777], labels[500:777]
    qi = torch.arange(500, 777, device="cuda")
    qi[::3] = -1
    got = mine_pairs(f, labels, 64, q, ql, qi, backend="cuda")
    want = R.mine_pairs(f, labels, 64, q, ql, qi)
    assert_mined_equal(got, want, f, q)
    with pytest.raises(RuntimeError, match="64"):
        mine_pairs(f, labels, 65, backend="cuda")
