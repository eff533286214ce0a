"""Property-based fuzzing of every public op against its eager reference (contract §9, 10).

For each op of ``msa_fast.ops`` and each fused backend that runs on this machine
(``cpp``; ``triton`` under ``TRITON_INTERPRET=1``, marked ``interpret``), hypothesis
draws small random shapes (0 and 1 included wherever the op takes them), a dtype
the backend takes (fp32 / fp16; bf16 and fp64 where the backend takes them and the
interpreter can do the math: ``cpp`` only), masks with fully padded rows, and a
memory layout per tensor argument: contiguous, transposed (non-contiguous),
sliced (a strided view at an offset) or expanded (a stride-0 view). Then either

* both the fused backend and the reference (the public op with ``backend="eager"``)
  raise a ``ValueError``, with the same message, or
* the fused forward equals the reference computed in fp64 on the same values, and
  so does every input gradient (under a random upstream gradient or the stride-0
  one of ``out.sum()``).

Tolerances (contract §9): fp32 1e-5 relative, 1e-4 where a dot product or a backward is
involved; fp16 2e-2 (forward) / 5e-2 (backward).

Cost: values come from a seeded ``torch.Generator`` (hypothesis draws shapes, flags
and the seed), shapes stay small (the interpreter costs ~1 ms per program) and the
``ci`` profile runs a fixed number of derandomised examples per test. Select a
profile with ``HYPOTHESIS_PROFILE``: ``ci`` (default), ``thorough`` (10x examples,
random).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mining_data import random_mining_data  # noqa: E402  (tests/mining_data.py)

import msa_fast  # noqa: E402
from msa_fast import _backend, ops  # noqa: E402

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=20, derandomize=True, deadline=None, database=None,
                          print_blob=True, suppress_health_check=_QUIET)
settings.register_profile("thorough", max_examples=200, deadline=None, print_blob=True,
                          suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _examples(n: int) -> settings:
    """``n`` examples under ``ci`` (20), scaled with the loaded profile's ``max_examples``."""
    return settings(max_examples=max(1, n * settings.default.max_examples // 20))


F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
FWD_TOL = {F32: 1e-5, F64: 1e-10, F16: 2e-2, BF16: 5e-2}
DOT_TOL = {F32: 1e-4, F64: 1e-10, F16: 2e-2, BF16: 5e-2}
GRAD_TOL = {F32: 1e-4, F64: 1e-10, F16: 5e-2, BF16: 1e-1}

HAS_CPP = "mine_pairs" in msa_fast.build_info().get("cpu_ops", [])


def _fused(op: str) -> list:
    """The fused backends of ``op`` that can run here, as pytest params."""
    out = []
    impl = _backend._IMPLEMENTED.get(op, ())
    if "cpp" in impl:
        out.append(pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="msa_fast._C not built")))
    if "triton" in impl:
        out.append(pytest.param("triton", marks=pytest.mark.interpret))
    return out


def _dtypes(backend: str, op: str) -> list[torch.dtype]:
    # the interpreter cannot do bf16 math (contract §9); otherwise what the backend declares
    # (mining's cpp takes fp64, attention's does not)
    if backend == "triton":
        return [F32, F16]
    fused = next(f for f in _backend.SPECS[op].fused if f.backend == backend)
    return [d for d in (F32, F64, F16, BF16) if d in fused.dtypes]


# --------------------------------------------------------------------------- #
# Inputs: a leaf per argument and the (possibly strided / stride-0) view the op gets
# --------------------------------------------------------------------------- #

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


class Arg:
    """One floating tensor argument of logical ``shape``.

    ``leaf`` is what gradients are taken of; :meth:`view` rebuilds the argument from
    a leaf (a copy of it in another dtype for the reference): ``transposed`` stores
    the dims reversed and permutes back, ``sliced`` takes every other element of a
    twice-as-wide last dim at offset 1, ``expanded`` broadcasts a size-1 dim
    (stride 0, so that dim's entries are equal).
    """

    def __init__(self, shape, dtype, layout, gen, *, scale=1.0, offset=0.0, grad=True, dim=0):
        self.shape, self.layout = tuple(shape), layout
        nd = len(self.shape)
        if layout == "expanded":
            self.dim = dim % nd if nd else 0
            leaf_shape = list(self.shape)
            if nd:
                leaf_shape[self.dim] = min(1, leaf_shape[self.dim])
        elif layout == "transposed":
            leaf_shape = self.shape[::-1]
        elif layout == "sliced" and nd:
            leaf_shape = (*self.shape[:-1], 2 * self.shape[-1] + 1)
        else:
            leaf_shape = self.shape
        x = torch.randn(leaf_shape, generator=gen, dtype=F64) * scale + offset
        self.leaf = x.to(dtype).requires_grad_(grad)

    def view(self, leaf: torch.Tensor) -> torch.Tensor:
        nd = len(self.shape)
        if self.layout == "expanded" and nd:
            return leaf.expand(self.shape)
        if self.layout == "transposed":
            return leaf.permute(*reversed(range(nd)))
        if self.layout == "sliced" and nd:
            return leaf[..., 1::2]
        return leaf


class Case:
    """The arguments of one call: tensors (``Arg``), masks and plain values, in order."""

    def __init__(self, args: list):
        self.args = args

    def build(self, dtype: torch.dtype | None = None):
        """``(call args, views)``: views of fresh leaves (cast to ``dtype`` if given).

        Gradients are compared on the views, i.e. the op's own input gradients: on a
        stride-0 view the leaf's gradient would be a sum of terms that may cancel
        (under LayerNorm, by construction), an ill-conditioned check of nothing the
        op computes."""
        views, out = [], []
        for a in self.args:
            if isinstance(a, Arg):
                leaf = a.leaf.detach().clone()
                leaf = (leaf.to(dtype) if dtype is not None else leaf).requires_grad_(a.leaf.requires_grad)
                views.append(a.view(leaf))
                out.append(views[-1])
            else:
                out.append(a)
        return out, views


def _mask(draw, gen, shape, *, true_means="padding", layout=None):
    """A bool mask with random entries, some rows all True (padding) / all False."""
    m = torch.rand(shape, generator=gen) < draw(st.sampled_from([0.0, 0.3, 0.7]))
    if len(shape) >= 2 and shape[0] and draw(st.booleans()):
        m[draw(st.integers(0, shape[0] - 1))] = True  # a fully padded (or fully valid) row
    layout = layout or draw(st.sampled_from(["contiguous", "transposed", "expanded"]))
    if layout == "transposed" and m.dim() >= 2:
        m = m.t().contiguous().t()
    elif layout == "expanded" and m.dim() >= 2:
        m = m[:1].expand(shape) if shape[0] else m
    return m


def _layout(draw):
    return draw(st.sampled_from(LAYOUTS))


def _gen(draw):
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


# --------------------------------------------------------------------------- #
# The comparison
# --------------------------------------------------------------------------- #


def _close(got, want, tol, what, same=None):
    """``|got - want| <= tol (1 + |want|)`` elementwise, ``want`` the fp64 reference, NaN
    where it is NaN. ``same``: the reference in ``got``'s dtype; its own rounding error,
    twice, is allowed on top, so that an ill-conditioned input (a constant row under
    LayerNorm: rounding times ``1/sqrt(eps)``) asks of the kernel no more than of the
    reference in that precision."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN in different places"
    ok = ~torch.isnan(want)
    err = (got - want).abs()[ok]
    allowed = tol * (1 + want.abs()[ok])
    if same is not None:
        allowed = allowed + 2 * (same.double() - want).abs()[ok].nan_to_num(posinf=0.0)
    bad = err > allowed
    if bad.any():
        i = int((err - allowed).argmax())
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements off, worst: got "
                             f"{got[ok][i].item():.8g}, want {want[ok][i].item():.8g} (allowed +-{allowed[i].item():.3g})")


def _outputs(res):
    return list(res) if isinstance(res, (tuple, list)) else [res]


def check_op(fn, case: Case, backend: str, dtype: torch.dtype, gen, *, fwd_tol, grad_tol=None,
             upstream: str = "random"):
    """The fused ``backend`` equals the reference, forward and backward, or both raise
    the same ``ValueError``."""
    args, leaves = case.build()
    try:
        got = _outputs(fn(*args, backend=backend))
    except ValueError as exc:
        eager_args, _ = case.build()
        with pytest.raises(ValueError) as ref_exc:
            fn(*eager_args, backend="eager")
        assert str(ref_exc.value) == str(exc)
        return
    ref_args, ref_leaves = case.build(F64)
    want = _outputs(fn(*ref_args, backend="eager"))
    same_args, same_leaves = case.build()
    same = _outputs(fn(*same_args, backend="eager"))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"output {i}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert g.dtype == dtype, f"output {i}: dtype {g.dtype} != {dtype}"
        _close(g, w, fwd_tol[dtype], f"output {i}", same[i])
    grad_ids = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
    diff = [i for i, g in enumerate(got) if g.requires_grad]
    if not grad_ids or not diff:
        return
    losses = [0, 0, 0]
    for i in diff:
        cot = None if upstream == "sum" else torch.randn(got[i].shape, generator=gen, dtype=F64).to(dtype)
        for j, out in enumerate((got[i], want[i], same[i])):
            # out.sum() hands the kernel a stride-0 gradient
            losses[j] = losses[j] + (out.sum() if cot is None else (out * cot.to(out.dtype)).sum())
    grads = [torch.autograd.grad(loss, [ls[i] for i in grad_ids], allow_unused=True)
             for loss, ls in zip(losses, (leaves, ref_leaves, same_leaves))]
    for j, (g, w, s) in enumerate(zip(*grads)):
        zero = torch.zeros(leaves[grad_ids[j]].shape, dtype=F64)
        g, w, s = (zero if t is None else t for t in (g, w, s))
        assert torch.isfinite(g).all(), f"grad {grad_ids[j]}: not finite"
        _close(g, w, (grad_tol or GRAD_TOL)[dtype], f"grad of argument {grad_ids[j]}", s)


_UPSTREAM = st.sampled_from(["random", "sum"])


# --------------------------------------------------------------------------- #
# One test per op
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("backend", _fused("add_layer_norm"))
@_examples(25)
@given(data=st.data())
def test_fuzz_add_layer_norm(backend, data):
    draw = data.draw
    dtype, gen = draw(st.sampled_from(_dtypes(backend, "add_layer_norm"))), _gen(draw)
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    d = draw(st.sampled_from([0, 1, 2, 5, 16, 37]))
    shape = (*lead, d)
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.5]))
    case = Case([Arg(shape, dtype, _layout(draw), gen, dim=draw(st.integers(0, 3))),
                 Arg(shape, dtype, _layout(draw), gen, dim=draw(st.integers(0, 3))),
                 Arg((d,), dtype, _layout(draw), gen, scale=0.2, offset=1.0),
                 Arg((d,), dtype, _layout(draw), gen, scale=0.2), eps])
    check_op(ops.add_layer_norm, case, backend, dtype, gen, fwd_tol=FWD_TOL, upstream=draw(_UPSTREAM))


@pytest.mark.parametrize("backend", _fused("attention"))
@_examples(25)
@given(data=st.data())
def test_fuzz_attention(backend, data):
    draw = data.draw
    dtype, gen = draw(st.sampled_from(_dtypes(backend, "attention"))), _gen(draw)
    b, h = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    lq, lk = draw(st.sampled_from([0, 1, 3, 17])), draw(st.sampled_from([0, 1, 2, 5, 19]))
    dh = draw(st.sampled_from([0, 1, 4, 9, 16]))
    mask = draw(st.sampled_from(["none", "mask"]))
    kpm = _mask(draw, gen, (b, lk)) if mask == "mask" else None
    scale = draw(st.sampled_from([None, 0.3, 1.0]))
    dims = st.integers(0, 3)
    case = Case([Arg((b, h, lq, dh), dtype, _layout(draw), gen, dim=draw(dims)),
                 Arg((b, h, lk, dh), dtype, _layout(draw), gen, dim=draw(dims)),
                 Arg((b, h, lk, dh), dtype, _layout(draw), gen, dim=draw(dims)), kpm, scale])
    check_op(ops.attention, case, backend, dtype, gen, fwd_tol=DOT_TOL, upstream=draw(_UPSTREAM))


@pytest.mark.parametrize("backend", _fused("dual_gate"))
@_examples(25)
@given(data=st.data())
def test_fuzz_dual_gate(backend, data):
    draw = data.draw
    dtype, gen = draw(st.sampled_from(_dtypes(backend, "dual_gate"))), _gen(draw)
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=0, max_size=2)))
    m, d = draw(st.sampled_from([0, 1, 2, 3])), draw(st.sampled_from([0, 1, 3, 8, 19]))
    c = draw(st.sampled_from([0, 1, 2, 7, 19]))  # 0: rejected; 1: H = 0
    tau = draw(st.sampled_from([0.5, 1.0, 3.0]))
    dims = st.integers(0, 3)
    case = Case([Arg((*lead, m, d), dtype, _layout(draw), gen, dim=draw(dims)),
                 Arg((*lead, m, c), dtype, _layout(draw), gen, scale=2.0, dim=draw(dims)),
                 Arg((m, d), dtype, _layout(draw), gen, scale=0.5, dim=draw(dims)),
                 Arg((m,), dtype, _layout(draw), gen, scale=0.5),
                 Arg((*lead, m), dtype, _layout(draw), gen, dim=draw(dims)), tau])
    check_op(ops.dual_gate, case, backend, dtype, gen, fwd_tol=DOT_TOL, upstream=draw(_UPSTREAM))


@pytest.mark.parametrize("backend", _fused("gated_attention_pool"))
@_examples(25)
@given(data=st.data())
def test_fuzz_gated_attention_pool(backend, data):
    draw = data.draw
    dtype, gen = draw(st.sampled_from(_dtypes(backend, "gated_attention_pool"))), _gen(draw)
    m, b, seq = draw(st.sampled_from([0, 1, 3])), draw(st.integers(0, 2)), draw(st.sampled_from([0, 1, 4, 7]))
    d, hg, ha = draw(st.sampled_from([0, 1, 6, 16])), draw(st.sampled_from([0, 1, 5])), draw(st.sampled_from([0, 1, 4]))
    mask = _mask(draw, gen, (b, seq)) if draw(st.booleans()) else None
    lay, dims = (lambda: _layout(draw)), st.integers(0, 3)
    w = 1 / max(d, 1) ** 0.5
    case = Case([Arg((m, b, seq, d), dtype, lay(), gen, dim=draw(dims)),
                 Arg((m, d), dtype, lay(), gen, scale=0.2, offset=1.0, dim=draw(dims)),
                 Arg((m, d), dtype, lay(), gen, scale=0.2, dim=draw(dims)),
                 Arg((m, hg, d), dtype, lay(), gen, scale=w, dim=draw(dims)),
                 Arg((m, hg), dtype, lay(), gen, scale=0.2, dim=draw(dims)),
                 Arg((m, hg), dtype, lay(), gen, scale=0.5, dim=draw(dims)),
                 Arg((m,), dtype, lay(), gen, scale=0.2),
                 Arg((ha, d), dtype, lay(), gen, scale=w, dim=draw(dims)),
                 Arg((ha,), dtype, lay(), gen, scale=0.2),
                 Arg((ha,), dtype, lay(), gen, scale=0.5),
                 Arg((), dtype, "contiguous", gen, scale=0.2),
                 mask, draw(st.sampled_from([1e-5, 1e-2]))])
    check_op(ops.gated_attention_pool, case, backend, dtype, gen, fwd_tol=DOT_TOL, upstream=draw(_UPSTREAM))


def _vectors(draw, gen, dtype, shape, zero_rows=True):
    """A feature tensor whose rows are sometimes exactly zero (cosine 0, gradient 0)."""
    arg = Arg(shape, dtype, _layout(draw), gen, dim=draw(st.integers(0, 4)))
    if zero_rows and len(shape) >= 2 and shape[0] and arg.layout == "contiguous" and draw(st.booleans()):
        with torch.no_grad():
            arg.leaf[draw(st.integers(0, shape[0] - 1))] = 0
    return arg


@pytest.mark.parametrize("backend", _fused("nt_xent"))
@_examples(20)
@given(data=st.data())
def test_fuzz_nt_xent(backend, data):
    draw = data.draw
    dtype, gen = draw(st.sampled_from(_dtypes(backend, "nt_xent"))), _gen(draw)
    p, k, d = draw(st.integers(0, 4)), draw(st.sampled_from([0, 1, 3, 9])), draw(st.sampled_from([0, 1, 4, 33]))
    mask = _mask(draw, gen, (p, k)) if draw(st.booleans()) else None
    if mask is not None:
        mask = ~mask  # True = valid here; rows without any valid negative included
    case = Case([_vectors(draw, gen, dtype, (p, d)), _vectors(draw, gen, dtype, (p, d)),
                 _vectors(draw, gen, dtype, (p, k, d)), mask, draw(st.sampled_from([0.1, 0.5, 2.0])),
                 draw(st.sampled_from(["mean", "sum", "none"]))])
    check_op(ops.nt_xent, case, backend, dtype, gen, fwd_tol=DOT_TOL, upstream=draw(_UPSTREAM))


@pytest.mark.parametrize("backend", _fused("triplet"))
@_examples(20)
@given(data=st.data())
def test_fuzz_triplet(backend, data):
    draw = data.draw
    dtype, gen = draw(st.sampled_from(_dtypes(backend, "triplet"))), _gen(draw)
    p, d = draw(st.integers(0, 6)), draw(st.sampled_from([0, 1, 4, 33]))
    # margins away from the hinge's kink at the exact cosines of D = 1 (+-1) and of zero rows (0)
    margin = draw(st.sampled_from([0.3, -0.4, 1.7]))
    case = Case([_vectors(draw, gen, dtype, (p, d)), _vectors(draw, gen, dtype, (p, d)),
                 _vectors(draw, gen, dtype, (p, d)), margin, draw(st.sampled_from(["mean", "sum", "none"]))])
    check_op(ops.triplet, case, backend, dtype, gen, fwd_tol=DOT_TOL, upstream=draw(_UPSTREAM))


@pytest.mark.parametrize("backend", _fused("fd_cmdie_contrastive_loss"))
@_examples(20)
@given(data=st.data())
def test_fuzz_fd_cmdie_contrastive_loss(backend, data):
    draw = data.draw
    dtype, gen = draw(st.sampled_from(_dtypes(backend, "fd_cmdie_contrastive_loss"))), _gen(draw)
    b, kp, kn = draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    d = draw(st.sampled_from([0, 1, 5, 16]))
    pm = ~_mask(draw, gen, (b, kp)) if draw(st.booleans()) else None
    nm = ~_mask(draw, gen, (b, kn)) if draw(st.booleans()) else None
    case = Case([_vectors(draw, gen, dtype, (b, 3, d), False), _vectors(draw, gen, dtype, (b, 3, d), False),
                 _vectors(draw, gen, dtype, (b, kp, 2, 3, d), False), _vectors(draw, gen, dtype, (b, kn, 3, d), False),
                 draw(st.sampled_from([0.2, 0.5, 1.0])), draw(st.sampled_from([0.3, 1.7])),
                 draw(st.sampled_from([0.0, 0.1, 1.0])), pm, nm, draw(st.sampled_from(["mean", "sum", "none"]))])
    check_op(ops.fd_cmdie_contrastive_loss, case, backend, dtype, gen, fwd_tol=DOT_TOL, upstream=draw(_UPSTREAM))


def _dipu_backends() -> list:
    # no fused DIPU: its module runs on the fused attention and add + LayerNorm
    return [pytest.param("triton", marks=pytest.mark.interpret)]


@pytest.mark.parametrize("backend", _dipu_backends())
@_examples(12)
@given(data=st.data())
def test_fuzz_dipu_module_on_fused_ops_equals_op(backend, data):
    """``ops.dipu`` has only the reference; ``nn.DIPU(backend=...)`` computes the same
    function from the fused attention and add + LayerNorm: the two must agree (and
    raise the same ``ValueError`` type, the module's checks naming ``DIPU``)."""
    draw = data.draw
    dtype, gen = draw(st.sampled_from([F32, F16])), _gen(draw)
    b, lg, lx = draw(st.integers(0, 2)), draw(st.sampled_from([0, 1, 4])), draw(st.sampled_from([0, 1, 5]))
    heads = draw(st.sampled_from([1, 2]))
    d = heads * draw(st.sampled_from([1, 3, 4]))
    cross2 = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 1000)))
    mod = msa_fast.nn.DIPU(d, heads, draw(st.sampled_from([1, 6])), cross2=cross2, backend=backend).eval()
    params = {k: v.detach() for k, v in mod.named_parameters()}
    G = Arg((b, lg, d), F64, _layout(draw), gen, dim=draw(st.integers(0, 2)))
    X = Arg((b, lx, d), F64, _layout(draw), gen, dim=draw(st.integers(0, 2)))
    g_mask = _mask(draw, gen, (b, lg)) if draw(st.booleans()) else None
    x_mask = _mask(draw, gen, (b, lx)) if draw(st.booleans()) else None
    (g_in, x_in), _ = Case([G, X]).build(dtype)
    (g_ref, x_ref), _ = Case([G, X]).build(F64)
    try:
        want = ops.dipu(g_ref, x_ref, {k: v.double() for k, v in params.items()}, heads,
                        g_mask, x_mask, cross2=cross2, backend="eager")
    except ValueError:
        with pytest.raises(ValueError):
            mod.to(dtype)(g_in, x_in, g_mask, x_mask)
        return
    got = mod.to(dtype)(g_in, x_in, g_mask, x_mask)
    tol = {F32: 1e-4, F16: 5e-2}[dtype]
    for a, w in zip(got, want):
        assert a.dtype == dtype
        _close(a, w.detach(), tol, "DIPU output")
    if b and lg and lx:
        gg = torch.autograd.grad(got[0].sum() + got[1].float().square().sum(), [g_in, x_in])
        wg = torch.autograd.grad(want[0].sum() + want[1].square().sum(), [g_ref, x_ref])
        _close(gg[0], wg[0], 10 * tol, "dG")
        _close(gg[1], wg[1], 10 * tol, "dX")


# --------------------------------------------------------------------------- #
# mine_pairs: discrete output, compared up to near ties (tests/test_pair_mining.py)
# --------------------------------------------------------------------------- #


def _assert_mined(got, want, features, queries):
    from test_pair_mining import assert_mined_equal  # noqa: PLC0415  (the suite's tie-aware comparison)

    if features.shape[0] == 0:  # nothing to look up: every slot is missing
        features = queries = None
    assert_mined_equal(got, want, features, queries)


@pytest.mark.parametrize("backend", _fused("mine_pairs"))
@_examples(30)
@given(data=st.data())
def test_fuzz_mine_pairs(backend, data):
    draw = data.draw
    dtype = draw(st.sampled_from(_dtypes(backend, "mine_pairs")))
    n, d, classes = draw(st.sampled_from([0, 1, 2, 7, 40])), draw(st.sampled_from([0, 1, 3, 10])), draw(st.integers(1, 4))
    k = draw(st.sampled_from([0, 1, 3, 8]))
    f, labels = random_mining_data(n, d, classes, dtype=F64, dup=n // 4, zeros=int(n > 3),
                                   seed=draw(st.integers(0, 10**6)))
    f = f.to(dtype)
    if n and d and draw(st.booleans()):  # the contract §10 policy: non-finite rows are neither mined nor mining
        f[draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    if layout == "transposed":
        f = f.t().contiguous().t()
    elif layout == "sliced":  # stride 2 on the last dim, at an offset
        big = torch.zeros(n, 2 * d + 1, dtype=dtype)
        big[:, 1::2] = f
        f = big[:, 1::2]
    elif layout == "expanded" and n:
        f = f[:1].expand(n, d)
    mode = draw(st.sampled_from(["all", "queries", "indexed"]))
    qargs = ()
    if mode != "all":
        q = draw(st.integers(0, 5))
        queries = torch.randn(q, d, dtype=F64, generator=torch.Generator().manual_seed(q)).to(dtype)
        if n and q and draw(st.booleans()):
            queries[: min(q, n)] = f[: min(q, n)]  # queries that are rows of features
        qlab = torch.randint(0, classes, (q,), generator=torch.Generator().manual_seed(q + 1))
        qidx = None
        if mode == "indexed":
            hi = draw(st.sampled_from([n, n + 2]))  # n + 2: out of range, a ValueError
            qidx = torch.randint(-1, max(hi, 0), (q,), generator=torch.Generator().manual_seed(q + 2))
        qargs = (queries, qlab, qidx)
    args = (f, labels, k, *qargs)
    try:
        got = ops.mine_pairs(*args, backend=backend)
    except ValueError as exc:
        with pytest.raises(ValueError) as ref_exc:
            ops.mine_pairs(*args, backend="eager")
        assert str(ref_exc.value) == str(exc)
        return
    want = ops.mine_pairs(*args, backend="eager")
    _assert_mined(got, want, f, qargs[0] if qargs else None)
    # and mined in chunks, the same rows (contract §3.4 sharding)
    if mode == "all" and n > 1 and k:
        chunked = ops.mine_pairs_chunked(f, labels, k, chunk_size=max(1, n // 3), backend=backend, progress=False)
        _assert_mined(chunked, want, f, None)


@_examples(40)
@given(y=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-5, 5)),
                  max_size=12),
       kind=st.sampled_from(["tensor", "list", "numpy"]), scheme=st.sampled_from(["7", "3", "2"]))
def test_fuzz_sentiment_classes(y, kind, scheme):
    """Equals MMSA's numpy formulas (half to even) for tensors, lists and arrays; NaN: ValueError."""
    arr = np.asarray(y, dtype=np.float64)
    inp = {"tensor": torch.tensor(arr), "list": y, "numpy": arr}[kind]
    if np.isnan(arr).any():
        with pytest.raises(ValueError, match="sentiment_classes: y:"):
            ops.sentiment_classes(inp, scheme)
        return
    got = ops.sentiment_classes(inp, scheme)
    want = {"7": np.round(np.clip(arr, -3, 3)) + 3, "3": np.sign(arr) + 1, "2": (arr >= 0)}[scheme].astype(np.int64)
    assert got.dtype == torch.int64 and got.tolist() == want.tolist()
