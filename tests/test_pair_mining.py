"""mine_pairs (contract §3.4): the eager reference on a hand-computed case, the C++
(``cpp``), Triton (``triton``, interpreted on the CPU) and CUDA (``cuda``) kernels
against the reference, sharding, the chunked helper, validation, opcheck,
torch.compile, and ``sentiment_classes``."""

from __future__ import annotations

import math

import pytest
import torch
from mining_data import random_mining_data as _data  # tests/mining_data.py

import msa_fast
from msa_fast import _backend
from msa_fast.ops import mine_pairs, mine_pairs_chunked, sentiment_classes
from msa_fast.ops import reference as R

HAS_EXT = msa_fast.build_info()["extension"]
needs_cpp = pytest.mark.skipif(
    not HAS_EXT or "mine_pairs" not in msa_fast.build_info()["cpu_ops"],
    reason="msa_fast._C is not built (pip install --no-build-isolation -e .)",
)

needs_triton = pytest.mark.skipif(
    "triton" not in _backend.available("mine_pairs", "cuda" if torch.cuda.is_available() else "cpu"),
    reason="triton is not installed, or no GPU and TRITON_INTERPRET is not 1",
)


@pytest.fixture(params=[pytest.param("cpu", marks=pytest.mark.interpret, id="interpreted"),
                        pytest.param("cuda", marks=pytest.mark.gpu, id="compiled")])
def dev(request):
    """The device of a Triton mining test, each test once per world: CPU tensors through
    the interpreter (``interpret``), CUDA tensors through the compiled kernel (``gpu``, so
    that ``pytest -m gpu`` -- gpu_check.sh -- runs them). One module-level device would
    have made the compiled runs invisible to ``-m gpu`` and the interpreted ones vanish on
    a GPU machine."""
    return request.param

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


# --------------------------------------------------------------------------- #
# cpp: the bf16 screen with exact fp32 rescoring (csrc/cpu/pair_mining.cpp)
# --------------------------------------------------------------------------- #


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            return set(next(line for line in fh if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


needs_screen = pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vl"} <= _cpu_flags(),
                                  reason="the bf16 screen's scan and rescoring need AVX-512 F/BW/VL")


@pytest.fixture
def screen(monkeypatch):
    """Run the cpp kernel with the screen forced on ("always") or off ("never")."""
    def use(mode):
        monkeypatch.setenv("MSA_FAST_MINING_SCREEN", mode)
    return use


@needs_cpp
@needs_screen
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][4] != torch.float64], ids=str)
def test_cpp_screen_matches_reference(case, screen):
    n, d, classes, k, dtype, dup, zeros = CASES[case]
    f, labels = _data(n, d, classes, dtype, dup=dup, zeros=zeros, seed=7)
    screen("always")
    got = mine_pairs(f, labels, k, backend="cpp")
    assert_mined_equal(got, R.mine_pairs(f, labels, k), f)
    assert_valid(got, labels, labels, torch.arange(n))
    screen("never")
    assert_mined_equal(got, mine_pairs(f, labels, k, backend="cpp"), f)


def _near_tie_data(n, d, spread, seed):
    """Rows whose cosines to each other all lie within ``spread`` of one another -- far
    below bf16's resolution (its ulp at 0.5-1 is 2^-8-2^-7): a shared direction plus small
    independent parts, and exact copies, so the screen's bf16 values are tied everywhere."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g, dtype=torch.float64)
    f = base + spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    f[torch.randint(0, n, (20,), generator=g)] = f[torch.randint(0, n, (20,), generator=g)]
    labels = torch.randint(0, 3, (n,), generator=g)
    return f.float(), labels


@needs_cpp
@needs_screen
@pytest.mark.parametrize("spread,k", [(1e-3, 10), (2e-2, 25), (0.3, 7)])
def test_cpp_screen_adversarial_near_ties(spread, k, screen):
    """Similarities packed within bf16's rounding of each other (spread 1e-3: ~1e-6 apart,
    all one bf16 value) and around the screen's tolerance (2e-2): the lists stay the exact
    fp32 ones up to exact ties, also across tile boundaries (n > 1024) and for queries."""
    f, labels = _near_tie_data(2100, 40, spread, seed=int(spread * 1e4))
    screen("always")
    got = mine_pairs(f, labels, k, backend="cpp")
    want = R.mine_pairs(f, labels, k)
    assert_mined_equal(got, want, f)
    screen("never")
    assert_mined_equal(got, mine_pairs(f, labels, k, backend="cpp"), f)
    # external queries (the non-symmetric tiling) and sharded rows (query_index)
    screen("always")
    q, ql = f[300:340] * 3.0, labels[300:340]
    assert_mined_equal(mine_pairs(f, labels, k, q, ql, backend="cpp"), R.mine_pairs(f, labels, k, q, ql), f, q)
    rows = torch.arange(1000, 1100)
    shard = mine_pairs(f, labels, k, f[1000:1100], labels[1000:1100], rows, backend="cpp")
    assert_mined_equal(shard, type(want)(*(t[1000:1100] for t in want)), f, f[1000:1100])


@needs_cpp
@needs_screen
@pytest.mark.parametrize("k", [16, 17, 40, 64, 65, 150])
def test_cpp_screen_every_top_k_width(k, screen):
    """The screen's running k-th best lives in ceil(k / 16) vectors (1-4 in registers, more
    through the generic loop): every width, across tile boundaries, equals the reference
    and the fp32 pass, with duplicated rows (tied values in the slots) and classes smaller
    than k."""
    f, labels = _data(2100, 33, 9, torch.float32, dup=40, zeros=2, seed=k)
    labels[:5] = 11  # a class of five: fewer candidates than k
    screen("always")
    got = mine_pairs(f, labels, k, backend="cpp")
    assert_mined_equal(got, R.mine_pairs(f, labels, k), f)
    screen("never")
    assert_mined_equal(got, mine_pairs(f, labels, k, backend="cpp"), f)


@needs_cpp
@needs_screen
def test_cpp_screen_exact_ties_tiny_classes_and_bad_rows(screen):
    """One-hot rows (bf16-exact: every similarity exactly 0 or 1, the lower index decides),
    classes smaller than k, a NaN row and an inf row, fp16 and bf16 inputs."""
    screen("always")
    g = torch.Generator().manual_seed(1)
    n, d = 2600, 3
    f = torch.zeros(n, d)
    f[torch.arange(n), torch.randint(0, d, (n,), generator=g)] = 2.0 ** torch.randint(-3, 4, (n,), generator=g).float()
    f[::97] = 0
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[[5, 9]] = 7  # a class of two
    got = mine_pairs(f, labels, 9, backend="cpp")
    for a, b in zip(got, R.mine_pairs(f, labels, 9)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert got.pos_idx[5].tolist() == [9] + [-1] * 8
    f2, labels2 = _data(1500, 24, 4, torch.float32, dup=10, seed=3)
    f2[4, 2], f2[11] = float("nan"), float("inf")
    out = mine_pairs(f2, labels2, 6, backend="cpp")
    assert (out.pos_idx[[4, 11]] == -1).all() and not torch.isin(out.pos_idx, torch.tensor([4, 11])).any()
    screen("never")
    ref = mine_pairs(f2, labels2, 6, backend="cpp")
    assert_mined_equal(out, ref, f2)
    for dtype in (torch.float16, torch.bfloat16):
        screen("always")
        h = mine_pairs(f2.to(dtype), labels2, 6, backend="cpp")
        screen("never")
        assert_mined_equal(h, mine_pairs(f2.to(dtype), labels2, 6, backend="cpp"), f2.to(dtype))


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
# Triton kernel vs reference (interpreted on the CPU: small inputs, few tiles)
# --------------------------------------------------------------------------- #


def assert_triton_equal(got, want, features, queries=None):
    """``assert_mined_equal`` plus the tie rule the fused kernels keep (contract §3.4 as
    documented on ``kernels/triton/pair_mining.py``): equal *computed* similarities are
    ranked by the lower index. Copies of one row have bit-equal norms (``_inv_norm``)
    and, on a GPU, bit-equal dot products; under the interpreter numpy's matmul may
    round two positions of a tile differently, so copies may come in either order
    only when the kernel's own similarities of the two differ (by rounding)."""
    assert got.pos_sim.dtype == torch.float32
    assert_mined_equal(got, want, features, queries)
    for gi, wi, gs in ((got.pos_idx, want.pos_idx, got.pos_sim), (got.neg_idx, want.neg_idx, got.neg_sim)):
        for r, c in (gi != wi).nonzero().tolist():
            a, b = gi[r, c].item(), wi[r, c].item()
            if a < 0 or b < 0 or not (features[a] == features[b]).all():
                continue  # a near tie of different rows: assert_mined_equal bounds it
            where = (gi[r] == b).nonzero()
            if len(where):
                c2 = where[0, 0]
                assert (gs[r, c] - gs[r, c2]).abs() <= 1e-6, "copies of one row far apart"
                if a > b and c2 > c:  # the higher index first: only for a different computed value
                    assert gs[r, c] != gs[r, c2], "copies with equal similarity ranked by the higher index"


TRITON_CASES = {
    # id: (N, D, classes, k, dtype, duplicated rows, zero rows, (BLOCK_Q, BLOCK_N) or None)
    "fp32-dups-zeros": (300, 37, 5, 7, torch.float32, 30, 3, None),  # N not a multiple of 64
    "fp32-small-tiles": (150, 20, 4, 10, torch.float32, 15, 2, (16, 32)),  # 10 query x 5 key tiles
    "fp32-k64": (140, 9, 2, 64, torch.float32, 10, 1, None),  # MAX_K; classes of ~70 rows
    "fp32-k1": (130, 16, 3, 1, torch.float32, 10, 1, None),
    "fp16": (200, 40, 4, 12, torch.float16, 10, 2, None),
    "one-class": (100, 8, 1, 4, torch.float32, 0, 0, None),  # no negatives at all
}


@needs_triton
@pytest.mark.parametrize("case", list(TRITON_CASES), ids=list(TRITON_CASES))
def test_triton_matches_reference(case, dev):
    from msa_fast.kernels.triton.pair_mining import mine_pairs_forward

    n, d, classes, k, dtype, dup, zeros, blocks = TRITON_CASES[case]
    f, labels = _data(n, d, classes, dtype, dup=dup, zeros=zeros)
    f, labels = f.to(dev), labels.to(dev)
    if blocks is None:
        got = mine_pairs(f, labels, k, backend="triton")
    else:
        got = R.MinedPairs(*mine_pairs_forward(f, labels, f, labels, torch.arange(n, device=dev), k,
                                               block_q=blocks[0], block_n=blocks[1]))
    want = R.mine_pairs(f, labels, k)
    assert_triton_equal(got, want, f)
    assert_valid(got, labels, labels, torch.arange(n, device=dev))


@needs_triton
def test_triton_quantised_ties_and_tiny_classes(dev):
    # Entries in {-1, 0, 1}: many exactly equal dot products; classes of size 1, 2
    # and 3 (k larger than the class) next to two big ones.
    g = torch.Generator().manual_seed(4)
    f = torch.randint(-1, 2, (190, 6), generator=g).float()
    labels = torch.randint(0, 2, (190,), generator=g)
    labels[[3, 100, 150, 7, 189, 0]] = torch.tensor([2, 3, 3, 4, 4, 4])
    f, labels = f.to(dev), labels.to(dev)
    got = mine_pairs(f, labels, 5, backend="triton")
    assert_triton_equal(got, R.mine_pairs(f, labels, 5), f)
    assert (got.pos_idx[3] == -1).all() and got.pos_sim[3].isnan().all()
    assert got.pos_idx[100].tolist() == [150, -1, -1, -1, -1]
    assert sorted(got.pos_idx[0, :2].tolist()) == [7, 189] and (got.pos_idx[0, 2:] == -1).all()


@needs_triton
def test_triton_exact_ties(dev):
    # Rows 2^p * e_c (and zero rows): every similarity is exactly 0 or 1, so the
    # lower-index rule alone decides, across query and key tile boundaries.
    from msa_fast.kernels.triton.pair_mining import mine_pairs_forward

    g = torch.Generator().manual_seed(1)
    n, d = 210, 3
    c = torch.randint(0, d, (n,), generator=g)
    f = torch.zeros(n, d)
    f[torch.arange(n), c] = 2.0 ** torch.randint(-3, 4, (n,), generator=g).float()
    f[::37] = 0
    labels = torch.randint(0, 3, (n,), generator=g)
    f, labels = f.to(dev), labels.to(dev)
    want = R.mine_pairs(f, labels, 9)
    for blocks in ((None, None), (16, 32)):
        got = mine_pairs_forward(f, labels, f, labels, torch.arange(n, device=dev), 9,
                                 block_q=blocks[0], block_n=blocks[1])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@needs_triton
def test_triton_external_queries_and_shards(dev):
    f, labels = _data(230, 21, 4, dup=10, zeros=2)
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(37, 21, generator=g)
    queries[5] = f[100]  # an external copy of a row: itself is a candidate
    queries[6] = 0
    qlabels = torch.randint(0, 4, (37,), generator=g)
    qlabels[5] = labels[100]
    f, labels, queries, qlabels = f.to(dev), labels.to(dev), queries.to(dev), qlabels.to(dev)
    got = mine_pairs(f, labels, 8, queries, qlabels, backend="triton")
    assert_triton_equal(got, R.mine_pairs(f, labels, 8, queries, qlabels), f, queries)
    assert_valid(got, labels, qlabels, torch.full((37,), -1, device=dev))
    assert got.pos_idx[5, 0] == 100 and got.pos_sim[5, 0] == pytest.approx(1.0, abs=1e-6)
    assert (got.pos_sim[6][got.pos_idx[6] >= 0] == 0).all() and (got.neg_sim[6] == 0).all()
    # Shards of the data set's own rows (query_index: row i excluded, -1: nothing
    # excluded) are exactly the rows of the full call.
    full = mine_pairs(f, labels, 8, backend="triton")
    for a, b in ((0, 1), (50, 133), (200, 230)):
        rows = torch.arange(a, b, device=dev)
        shard = mine_pairs(f, labels, 8, f[a:b], labels[a:b], rows, backend="triton")
        if dev == "cuda":  # a row's arithmetic does not depend on its position in a tile
            for x, y in zip(shard, full):
                torch.testing.assert_close(x, y[a:b], rtol=0, atol=0, equal_nan=True)
        else:  # the interpreter's numpy matmul may round a row by its position in the tile
            assert_triton_equal(shard, R.MinedPairs(*(y[a:b] for y in full)), f, f[a:b])
    qi = torch.arange(60, 90, device=dev)
    qi[::2] = -1
    mixed = mine_pairs(f, labels, 8, f[60:90], labels[60:90], qi, backend="triton")
    assert_triton_equal(mixed, R.mine_pairs(f, labels, 8, f[60:90], labels[60:90], qi), f, f[60:90])


@needs_triton
def test_triton_empty(dev):
    f = torch.zeros(0, 4, device=dev)
    out = mine_pairs(f, torch.zeros(0, dtype=torch.long, device=dev), 3, torch.randn(2, 4, device=dev),
                     torch.tensor([0, 1], device=dev), backend="triton")
    assert out.pos_idx.shape == (2, 3) and (out.pos_idx == -1).all() and out.neg_sim.isnan().all()
    f, labels = _data(20, 4, 2)
    out = mine_pairs(f.to(dev), labels.to(dev), 3, f[:0].to(dev), labels[:0].to(dev), backend="triton")
    assert out.pos_idx.shape == (0, 3) and out.neg_sim.dtype == torch.float32


@needs_triton
def test_triton_limits(monkeypatch, dev):
    f, labels = _data(70, 5, 2)
    f, labels = f.to(dev), labels.to(dev)
    with pytest.raises(RuntimeError, match="k <= 64"):
        mine_pairs(f, labels, 65, backend="triton")
    with pytest.raises(ValueError, match="backend 'triton' takes dtypes .* got torch.float64"):
        mine_pairs(f.double(), labels, 3, backend="triton")
    # auto never fails: beyond the limits it falls back to eager.
    monkeypatch.setitem(_backend.AUTO_ORDER, ("mine_pairs", f.device.type), ("triton", "eager"))
    for x, k in ((f, 65), (f.double(), 3)):
        got = mine_pairs(x, labels, k, backend="auto")
        for a, b in zip(got, R.mine_pairs(x, labels, k)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@needs_triton
def test_triton_opcheck(dev):
    f, labels = _data(40, 6, 3, dup=3, zeros=1)
    q = torch.randn(5, 6)
    # No missing slots: opcheck compares outputs without equal_nan.
    for args in ((f, labels, f, labels, torch.arange(40), 4),
                 (f, labels, q, torch.tensor([0, 1, 2, 0, 1]), torch.tensor([-1, 3, -1, 0, 39]), 3)):
        args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.msa_fast.mine_pairs_triton, args)


# --------------------------------------------------------------------------- #
# Chunked mining
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("backend", ["eager", pytest.param("cpp", marks=needs_cpp),
                                     pytest.param("triton", marks=needs_triton)])
def test_mine_pairs_chunked_equals_one_call(backend, capsys):
    n = 150 if backend == "triton" else 1100
    f, labels = _data(n, 12, 4, dup=10, zeros=2)
    one = mine_pairs(f, labels, 6, backend=backend)
    # Blocks that do not divide N; progress=None under pytest (not a terminal): no bar.
    got = mine_pairs_chunked(f, labels, 6, 64 if backend == "triton" else 300, backend=backend)
    assert capsys.readouterr().err == ""
    if backend == "triton":  # one program per query block: a row's result is independent of its block
        for a, b in zip(got, one):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:  # a BLAS may round a similarity of a short block differently in the last bit
        assert_mined_equal(got, one, f, sim_tol=1e-6)
    assert_mined_equal(got, R.mine_pairs(f, labels, 6), f)


def test_mine_pairs_chunked_progress_and_checks(capsys):
    pytest.importorskip("tqdm")
    f, labels = _data(90, 5, 3)
    got = mine_pairs_chunked(f, labels, 3, 40, backend="eager", progress=True)
    assert "90/90" in capsys.readouterr().err
    assert_mined_equal(got, R.mine_pairs(f, labels, 3), f, sim_tol=1e-6)
    small = mine_pairs_chunked(f, labels, 3, 4096, backend="eager")  # one block
    assert small.pos_idx.shape == (90, 3)
    with pytest.raises(ValueError, match="mine_pairs_chunked: chunk_size:"):
        mine_pairs_chunked(f, labels, 3, 0)
    with pytest.raises(ValueError, match="mine_pairs: labels:"):
        mine_pairs_chunked(f, labels[:5], 3)
    with pytest.raises(ValueError, match="mine_pairs: k:"):
        mine_pairs_chunked(f, labels, 0)


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


_ALL_BACKENDS = ["eager", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton),
                 pytest.param("cuda", marks=pytest.mark.gpu)]


def _on(backend, *ts):
    dev = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    return [t.to(dev) for t in ts]


@pytest.mark.parametrize("backend", _ALL_BACKENDS)
@pytest.mark.parametrize("query_index", [[0, 1, 10], [0, -2, 1], [10, 11, 12]])
def test_query_index_out_of_range_every_backend(backend, query_index):
    f, labels = _on(backend, torch.randn(10, 4), torch.tensor([0, 1] * 5))
    qi = torch.tensor(query_index, device=f.device)
    with pytest.raises(ValueError, match=r"mine_pairs: query_index: expected values in \[-1, 9\].*got range"):
        mine_pairs(f, labels, 2, f[:3], labels[:3], qi, backend=backend)
    # without queries too: query_index then names the rows of features themselves
    full = torch.arange(10, device=f.device)
    full[-1] = 10 if query_index[0] != 10 else -3
    with pytest.raises(ValueError, match=r"mine_pairs: query_index: expected values in \[-1, 9\]"):
        mine_pairs(f, labels, 2, query_index=full, backend=backend)


@pytest.mark.parametrize("backend", _ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows_never_mined_nor_mining(backend, dtype, bad):
    """contract §10 policy: a row with a NaN / inf entry has no valid similarity."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton takes no fp64")
    f, labels = _data(23, 6, 3, dtype=torch.float64)
    f = f.to(dtype)
    f[4, 2] = bad
    f[11] = bad
    f, labels = _on(backend, f, labels)
    bad_rows = {4, 11}
    k = 9  # more than some classes hold: missing slots mix with the excluded rows
    got = mine_pairs(f, labels, k, backend=backend)
    # the reference on the finite rows alone, mapped back, is the answer
    keep = torch.tensor([i for i in range(23) if i not in bad_rows], device=f.device)
    sub = R.mine_pairs(f[keep], labels[keep], k)
    for name, want_sub in zip(got._fields, sub):
        g = getattr(got, name)
        assert g.shape == (23, k)
        rows = g[torch.tensor(sorted(bad_rows), device=f.device)]
        if name.endswith("idx"):
            assert (rows == -1).all(), name  # a bad query mines nothing
            mapped = torch.where(want_sub >= 0, keep[want_sub.clamp(min=0)], want_sub)
            assert not torch.isin(g, torch.tensor(sorted(bad_rows), device=f.device)).any(), name
            assert torch.equal(g[keep], mapped), name
        else:
            assert torch.isnan(rows).all(), name
            torch.testing.assert_close(g[keep], want_sub.to(g.dtype), equal_nan=True, rtol=1e-5, atol=1e-5)
    # as external queries, and with the bad rows queried by index
    q = f[[4, 0, 11]]
    got_q = mine_pairs(f, labels, k, q, labels[[4, 0, 11]], torch.tensor([4, 0, 11], device=f.device),
                       backend=backend)
    assert (got_q.pos_idx[[0, 2]] == -1).all() and (got_q.neg_idx[[0, 2]] == -1).all()
    assert torch.equal(got_q.pos_idx[1], got.pos_idx[0]) and torch.equal(got_q.neg_idx[1], got.neg_idx[0])


@pytest.mark.parametrize("backend", _ALL_BACKENDS)
def test_all_rows_non_finite(backend):
    f, labels = _on(backend, torch.full((5, 3), float("nan")), torch.tensor([0, 0, 1, 1, 2]))
    got = mine_pairs(f, labels, 2, backend=backend)
    assert (got.pos_idx == -1).all() and (got.neg_idx == -1).all()
    assert torch.isnan(got.pos_sim).all() and torch.isnan(got.neg_sim).all()


def test_sentiment_classes_bad_and_converted_inputs():
    import numpy as np

    with pytest.raises(ValueError, match=r"sentiment_classes: y: expected labels without NaN.*got 1 NaN of 3"):
        sentiment_classes(torch.tensor([0.5, float("nan"), 1.0]))
    for scheme in ("7", "3", "2"):
        with pytest.raises(ValueError, match="sentiment_classes: y:"):
            sentiment_classes(np.array([float("nan")]), scheme)
    want = sentiment_classes(torch.tensor([-2.6, 0.4, 1.5, 3.5]))
    assert torch.equal(sentiment_classes([-2.6, 0.4, 1.5, 3.5]), want)
    assert torch.equal(sentiment_classes(np.array([-2.6, 0.4, 1.5, 3.5])), want)
    assert torch.equal(sentiment_classes(np.array([-2.6, 0.4, 1.5, 3.5], dtype=np.float32)), want)
    assert sentiment_classes([-3, 0, 2]).tolist() == [0, 3, 5]  # integer labels
    assert sentiment_classes(torch.tensor([float("-inf"), float("inf")])).tolist() == [0, 6]
    with pytest.raises(ValueError, match="sentiment_classes: y:"):
        sentiment_classes(["a", "b"])
    with pytest.raises(ValueError, match="sentiment_classes: scheme:"):
        sentiment_classes([0.0], "5")


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, d, k", [(20000, 256, 50), (16326, 877, 10), (5000, 64, 64)])
def test_triton_gpu_large(n, d, k, dtype):
    f, labels = _data(n, d, 7, dtype, dup=50, zeros=3)
    f, labels = f.cuda(), labels.cuda()
    got = mine_pairs(f, labels, k, backend="triton")
    assert_triton_equal(got, R.mine_pairs(f, labels, k), f)


@pytest.mark.gpu
def test_triton_gpu_queries_chunks_limits():
    f, labels = _data(9000, 128, 5, torch.float32, dup=30, zeros=2)
    f, labels = f.cuda(), labels.cuda()
    q, ql = f[500:2777], labels[500:2777]
    qi = torch.arange(500, 2777, device="cuda")
    qi[::3] = -1
    got = mine_pairs(f, labels, 33, q, ql, qi, backend="triton")
    assert_triton_equal(got, R.mine_pairs(f, labels, 33, q, ql, qi), f, q)
    one = mine_pairs(f, labels, 20, backend="triton")
    for a, b in zip(mine_pairs_chunked(f, labels, 20, 1000, backend="triton"), one):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(RuntimeError, match="64"):
        mine_pairs(f, labels, 65, backend="triton")

