"""Contrastive losses (FD-CMDIE eq. 9-12, contract §3.4): nt_xent, triplet,
fd_cmdie_contrastive_loss and the FDCMDIEContrastiveLoss module."""

import math
import warnings

import pytest
import torch

import msa_fast
from msa_fast.nn import FDCMDIEContrastiveLoss
from msa_fast.ops import _common as P
from msa_fast.ops import fd_cmdie_contrastive_loss, nt_xent, triplet
from msa_fast.ops import reference as R

F64 = torch.float64


def _rand(*shape, dtype=F64, grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


def _fd_inputs(b, kp, kn, d, dtype=F64, grad=False):
    return (_rand(b, 3, d, dtype=dtype, grad=grad), _rand(b, 3, d, dtype=dtype, grad=grad),
            _rand(b, kp, 2, 3, d, dtype=dtype, grad=grad), _rand(b, kn, 3, d, dtype=dtype, grad=grad))


def _random_mask(*shape, p=0.6):
    return torch.rand(*shape) < p


# --------------------------------------------------------------------------- #
# Hand-computed cases
# --------------------------------------------------------------------------- #


def test_nt_xent_hand_computed():
    # Row 0: c_p = 1/sqrt(2); negatives c = 0, -1, 0.8.  Row 1: c_p = 1; negatives
    # c = 0 and 1/sqrt(2) (the middle one is masked out). tau = 0.5.
    anchor = torch.tensor([[3.0, 0.0], [0.0, 2.0]], dtype=F64)
    positive = torch.tensor([[2.0, 2.0], [0.0, 1.0]], dtype=F64)
    negatives = torch.tensor([[[0.0, -5.0], [-1.0, 0.0], [4.0, 3.0]],
                              [[1.0, 0.0], [0.0, -3.0], [1.0, 1.0]]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    c = 1 / math.sqrt(2)
    row0 = math.log(math.exp(2 * c) + 1 + math.exp(-2) + math.exp(1.6)) - 2 * c
    row1 = math.log(math.exp(2) + 1 + math.exp(2 * c)) - 2
    assert row0 == pytest.approx(0.9083327812587885, rel=1e-12)
    assert row1 == pytest.approx(0.5259131455039494, rel=1e-12)
    out = nt_xent(anchor, positive, negatives, mask, tau=0.5, reduction="none")
    torch.testing.assert_close(out, torch.tensor([row0, row1], dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nt_xent(anchor, positive, negatives, mask, tau=0.5),
                               torch.tensor(0.7171229633813689, dtype=F64), rtol=1e-12, atol=1e-12)


def test_triplet_hand_computed():
    # d = 1 - cos. Row 0: 0.29289 - 1 + 0.5 < 0 -> 0. Row 1: 1 - 0.29289 + 0.5.
    # Row 2: zero anchor, cos 0 with everything -> d(a,p) = d(a,n) = 1 -> margin.
    anchor = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]], dtype=F64)
    positive = torch.tensor([[1.0, 1.0], [0.0, 3.0], [1.0, 2.0]], dtype=F64)
    negative = torch.tensor([[0.0, 1.0], [3.0, 3.0], [-1.0, 5.0]], dtype=F64)
    out = triplet(anchor, positive, negative, margin=0.5, reduction="none")
    want = torch.tensor([0.0, 1.5 - (1 - 1 / math.sqrt(2)), 0.5], dtype=F64)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1], torch.tensor(1.2071067811865475, dtype=F64))
    torch.testing.assert_close(triplet(anchor, positive, negative, margin=0.5, reduction="sum"), want.sum())


def test_fd_cmdie_hand_computed_no_partners():
    # Kp = Kn = 0: only the anchor T_s with positives {V_s, A_s} and negatives
    # {T_d, A_d, V_d}, plus the 6 triplets. Unit axes make every cosine 0 or 1.
    e = torch.eye(4, dtype=F64)
    sim = torch.stack([e[0], e[0], e[1]])[None]        # T_s = A_s = e0, V_s = e1
    diff = torch.stack([e[2], e[0], e[3]])[None]       # A_d = e0 (cos 1 with T_s)
    empty_p, empty_n = torch.zeros(1, 0, 2, 3, 4, dtype=F64), torch.zeros(1, 0, 3, 4, dtype=F64)
    tau, margin, lam = 0.5, 0.5, 0.1
    # logits /tau: V_s 0, A_s 2, T_d 0, A_d 2, V_d 0
    lse = math.log(3 + 2 * math.exp(2))
    l_nt = (lse - 0) + (lse - 2)
    # d(T, V_s) = 1, d(T, A_s) = 0; d(T, .) over diff = 1, 0, 1.
    # dp = 1: 0.5 + 1.5 + 0.5; dp = 0: 0 + 0.5 + 0 -> 3.0
    l_tri = sum(max(0.0, dp - dn + margin) for dp in (1.0, 0.0) for dn in (1.0, 0.0, 1.0))
    assert l_tri == pytest.approx(3.0)
    out = fd_cmdie_contrastive_loss(sim, diff, empty_p, empty_n, tau, margin, lam)
    torch.testing.assert_close(out, torch.tensor(l_nt + lam * l_tri, dtype=F64), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- #
# fd_cmdie_contrastive_loss against an explicit loop over P^i and N^i
# --------------------------------------------------------------------------- #


def _slow_fd_cmdie(s, d, ps, ns, pm, nm, tau, margin, lam):
    """Build P^i / N^i pair by pair (section 2.3.2) and apply eq. 9-12 literally."""

    def cos(x, y):
        nx, ny = float(x.norm()), float(y.norm())
        return 0.0 if nx == 0 or ny == 0 else float(x @ y) / (nx * ny)

    T, A, Vm = 0, 1, 2
    per_sample = []
    for i in range(s.shape[0]):
        pairs = []  # (anchor key, anchor, other, positive?)
        pairs += [(("i", T), s[i, T], s[i, Vm], True), (("i", T), s[i, T], s[i, A], True)]  # Positive_in
        pairs += [(("i", T), s[i, T], d[i, m], False) for m in range(3)]  # Negative_in
        for j in range(ps.shape[1]):
            if not pm[i, j]:
                continue
            tj = ps[i, j, 0, T]
            pairs += [(("j", j), tj, ps[i, j, 0, Vm], True), (("j", j), tj, ps[i, j, 0, A], True)]
            pairs += [(("j", j), tj, ps[i, j, 1, m], False) for m in range(3)]
            pairs += [(("i", m), s[i, m], ps[i, j, 0, m], True) for m in range(3)]  # Positive_out
        for k in range(ns.shape[1]):
            if nm[i, k]:
                pairs += [(("i", m), s[i, m], ns[i, k, m], False) for m in range(3)]  # Negative_out
        l_nt = 0.0
        for key, a, b, positive in pairs:
            if positive:
                denom = sum(math.exp(cos(a2, g) / tau) for key2, a2, g, _ in pairs if key2 == key)
                l_nt -= math.log(math.exp(cos(a, b) / tau) / denom)
        l_tri = sum(max(0.0, (1 - cos(s[i, T], p)) - (1 - cos(s[i, T], n)) + margin)
                    for p in (s[i, Vm], s[i, A]) for n in d[i])
        per_sample.append(l_nt + lam * l_tri)
    return per_sample


@pytest.mark.parametrize("b,kp,kn,d", [(3, 2, 3, 5), (1, 1, 1, 7), (4, 0, 2, 3), (2, 3, 0, 6)])
def test_fd_cmdie_matches_explicit_pair_loop(b, kp, kn, d):
    s, df, ps, ns = _fd_inputs(b, kp, kn, d)
    pm, nm = _random_mask(b, kp), _random_mask(b, kn)
    if b > 1:
        pm[0] = False  # a sample whose similar^i is empty (class too small)
        nm[-1] = False
    tau, margin, lam = 0.3, 0.4, 0.25
    want = torch.tensor(_slow_fd_cmdie(s, df, ps, ns, pm, nm, tau, margin, lam), dtype=F64)
    got = fd_cmdie_contrastive_loss(s, df, ps, ns, tau, margin, lam, pm, nm, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fd_cmdie_contrastive_loss(s, df, ps, ns, tau, margin, lam, pm, nm), want.mean())


def test_fd_cmdie_masked_partners_are_ignored():
    s, df, ps, ns = _fd_inputs(3, 3, 4, 5)
    pm, nm = _random_mask(3, 3), _random_mask(3, 4)
    base = fd_cmdie_contrastive_loss(s, df, ps, ns, 0.5, 0.5, 0.1, pm, nm, reduction="none")
    ps2, ns2 = ps.clone(), ns.clone()
    ps2[~pm] = torch.randn_like(ps2[~pm]) * 100
    ns2[~nm] = 0.0
    torch.testing.assert_close(
        fd_cmdie_contrastive_loss(s, df, ps2, ns2, 0.5, 0.5, 0.1, pm, nm, reduction="none"), base)


# --------------------------------------------------------------------------- #
# Gradients, zero vectors, dtypes
# --------------------------------------------------------------------------- #


def test_gradcheck_nt_xent():
    a, p, n = _rand(5, 7, grad=True), _rand(5, 7, grad=True), _rand(5, 3, 7, grad=True)
    mask = _random_mask(5, 3)
    mask[2] = False
    assert torch.autograd.gradcheck(lambda a, p, n: R.nt_xent(a, p, n, mask, 0.3, "none"), (a, p, n))


def test_gradcheck_triplet():
    a, p, n = _rand(6, 5, grad=True), _rand(6, 5, grad=True), _rand(6, 5, grad=True)
    # Large margin keeps every row off the hinge's kink.
    assert torch.autograd.gradcheck(lambda a, p, n: R.triplet(a, p, n, 3.0, "none"), (a, p, n))


def test_gradcheck_fd_cmdie():
    inputs = _fd_inputs(3, 2, 3, 5, grad=True)
    pm, nm = _random_mask(3, 2), _random_mask(3, 3)
    pm[1] = False
    fn = lambda *x: R.fd_cmdie_contrastive_loss(*x, 0.4, 3.0, 0.3, pm, nm, "none")
    assert torch.autograd.gradcheck(fn, inputs)


def test_unit_vectors_zero_safe():
    x = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]], dtype=F64, requires_grad=True)
    u = R.unit_vectors(x)
    torch.testing.assert_close(u.detach(), torch.tensor([[0.0, 0.0, 0.0], [0.6, 0.0, 0.8]], dtype=F64))
    (u * torch.randn_like(u)).sum().backward()
    assert torch.all(x.grad[0] == 0) and torch.isfinite(x.grad).all() and x.grad[1].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_zero_vectors_finite_loss_and_grads(dtype):
    a = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
    p = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
    n = torch.randn(3, 2, 4, dtype=dtype)
    n[0] = 0
    n.requires_grad_(True)
    loss = nt_xent(a, p, n) + triplet(a, p, n[:, 0])
    loss.backward()
    # Every cosine is 0: nt_xent = log(1 + K), triplet = margin.
    torch.testing.assert_close(loss.float(), torch.tensor(math.log(3) + 0.5), rtol=2e-2, atol=1e-2)
    for t in (a, p, n):
        assert torch.isfinite(t.grad.float()).all()

    zs = [torch.zeros(x.shape, dtype=dtype, requires_grad=True) for x in _fd_inputs(2, 2, 3, 4)]
    out = fd_cmdie_contrastive_loss(*zs)
    out.backward()
    assert torch.isfinite(out.float())
    assert all(torch.isfinite(z.grad.float()).all() for z in zs)


def test_nt_xent_gradient_flows_and_masked_negatives_get_none():
    a, p, n = _rand(4, 6, grad=True), _rand(4, 6, grad=True), _rand(4, 5, 6, grad=True)
    mask = _random_mask(4, 5)
    mask[1] = False
    nt_xent(a, p, n, mask).backward()
    assert torch.all(n.grad[~mask] == 0)
    assert torch.all(n.grad[mask].abs().sum(-1) > 0)
    # Row 1 has no valid negative: constant loss 0, so no gradient at all.
    assert torch.all(a.grad[1] == 0) and torch.all(p.grad[1] == 0)
    assert torch.all(a.grad[[0, 2, 3]].abs().sum(-1) > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_matches_fp64(dtype):
    a, p, n = _rand(9, 13), _rand(9, 13), _rand(9, 4, 13)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    # Compare against fp64 of the *rounded* inputs: the loss math itself runs in fp32.
    a_, p_, n_ = (x.to(dtype) for x in (a, p, n))
    out = nt_xent(a_, p_, n_, tau=0.7, reduction="none")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), R.nt_xent(a_.double(), p_.double(), n_.double(), None, 0.7, "none"),
                               **tol)
    xs = [x.to(dtype) for x in _fd_inputs(3, 2, 2, 11)]
    out = fd_cmdie_contrastive_loss(*xs, reduction="none")
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), R.fd_cmdie_contrastive_loss(*(x.double() for x in xs), reduction="none"),
                               **tol)


# --------------------------------------------------------------------------- #
# Reductions and masks
# --------------------------------------------------------------------------- #


def test_reductions():
    a, p, n = _rand(7, 3), _rand(7, 3), _rand(7, 5, 3)
    mask = _random_mask(7, 5)
    none = nt_xent(a, p, n, mask, reduction="none")
    assert none.shape == (7,) and torch.all(none >= 0)
    torch.testing.assert_close(nt_xent(a, p, n, mask, reduction="sum"), none.sum())
    torch.testing.assert_close(nt_xent(a, p, n, mask), none.mean())
    t_none = triplet(a, p, n[:, 0], 0.8, reduction="none")
    assert t_none.shape == (7,)
    torch.testing.assert_close(triplet(a, p, n[:, 0], 0.8), t_none.mean())
    torch.testing.assert_close(triplet(a, p, n[:, 0], 0.8, reduction="sum"), t_none.sum())
    xs = _fd_inputs(5, 2, 3, 4)
    f_none = fd_cmdie_contrastive_loss(*xs, reduction="none")
    assert f_none.shape == (5,)
    torch.testing.assert_close(fd_cmdie_contrastive_loss(*xs), f_none.mean())
    torch.testing.assert_close(fd_cmdie_contrastive_loss(*xs, reduction="sum"), f_none.sum())


def test_nt_xent_mask_equals_dropping_negatives():
    a, p, n = _rand(5, 9), _rand(5, 9), _rand(5, 6, 9)
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[:, [1, 4]] = True
    torch.testing.assert_close(nt_xent(a, p, n, mask, reduction="none"),
                               nt_xent(a, p, n[:, [1, 4]], reduction="none"))
    # A row with no valid negative: only the positive in the denominator -> loss 0.
    mask[3] = False
    out = nt_xent(a, p, n, mask, reduction="none")
    assert out[3] == 0 and torch.all(out[[0, 1, 2, 4]] > 0)
    # K = 0 behaves like an all-invalid row.
    torch.testing.assert_close(nt_xent(a, p, n[:, :0], reduction="none"), torch.zeros(5, dtype=F64))


# --------------------------------------------------------------------------- #
# Public ops: dispatch and bad input
# --------------------------------------------------------------------------- #


def test_public_ops_equal_reference_and_backends():
    a, p, n = _rand(4, 5), _rand(4, 5), _rand(4, 3, 5)
    want = R.nt_xent(a, p, n, None, 0.5, "mean")
    for backend in (None, "auto", "eager"):
        torch.testing.assert_close(nt_xent(a, p, n, backend=backend), want, rtol=0, atol=0)
    with msa_fast.use_backend("eager"):
        torch.testing.assert_close(nt_xent(a, p, n), want, rtol=0, atol=0)
    xs = _fd_inputs(2, 2, 2, 5)
    for backend in ("cuda", "cpp"):  # triton: see the Triton section below
        with pytest.raises(RuntimeError, match=f"backend '{backend}' is unavailable"):
            nt_xent(a, p, n, backend=backend)
        with pytest.raises(RuntimeError, match="unavailable"):
            triplet(a, p, n[:, 0], backend=backend)
        with pytest.raises(RuntimeError, match="unavailable"):
            fd_cmdie_contrastive_loss(*xs, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        nt_xent(a, p, n, backend="fastest")


def _bad_cases():
    a, p, n = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 3, 5)
    s, df, ps, ns = (x.float() for x in _fd_inputs(2, 2, 3, 5))
    return [
        ("anchor", lambda: nt_xent(a[0], p, n)),
        ("positive", lambda: nt_xent(a, p[:3], n)),
        ("positive", lambda: nt_xent(a, p.double(), n)),
        ("negatives", lambda: nt_xent(a, p, n[0])),
        ("negatives", lambda: nt_xent(a, p, n[..., :4])),
        ("negatives", lambda: nt_xent(a, p, n[:2])),
        ("negatives_mask", lambda: nt_xent(a, p, n, torch.ones(4, 3))),
        ("negatives_mask", lambda: nt_xent(a, p, n, torch.ones(4, 2, dtype=torch.bool))),
        ("tau", lambda: nt_xent(a, p, n, tau=0.0)),
        ("tau", lambda: nt_xent(a, p, n, tau=-1.0)),
        ("reduction", lambda: nt_xent(a, p, n, reduction="avg")),
        ("anchor", lambda: triplet(a.long(), p, p)),
        ("negative", lambda: triplet(a, p, n)),
        ("margin", lambda: triplet(a, p, p, margin=float("nan"))),
        ("reduction", lambda: triplet(a, p, p, reduction=None)),
        ("sim_feats", lambda: fd_cmdie_contrastive_loss(s[0], df, ps, ns)),
        ("sim_feats", lambda: fd_cmdie_contrastive_loss(s[:, :2], df, ps, ns)),
        ("diff_feats", lambda: fd_cmdie_contrastive_loss(s, df[..., :4], ps, ns)),
        ("pos_partner_feats", lambda: fd_cmdie_contrastive_loss(s, df, ps[:, :, 0], ns)),
        ("pos_partner_feats", lambda: fd_cmdie_contrastive_loss(s, df, ps[:1], ns)),
        ("neg_partner_feats", lambda: fd_cmdie_contrastive_loss(s, df, ps, ns[..., :2])),
        ("neg_partner_feats", lambda: fd_cmdie_contrastive_loss(s, df, ps, ns.double())),
        ("pos_partner_mask", lambda: fd_cmdie_contrastive_loss(s, df, ps, ns, pos_partner_mask=torch.ones(2, 2))),
        ("neg_partner_mask", lambda: fd_cmdie_contrastive_loss(
            s, df, ps, ns, neg_partner_mask=torch.ones(2, 2, dtype=torch.bool))),
        ("tau", lambda: fd_cmdie_contrastive_loss(s, df, ps, ns, tau=0)),
        ("lambda_tri", lambda: fd_cmdie_contrastive_loss(s, df, ps, ns, lambda_tri=-0.1)),
        ("reduction", lambda: fd_cmdie_contrastive_loss(s, df, ps, ns, reduction="batchmean")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_value_error_naming_argument(case):
    name, call = _bad_cases()[case]
    with pytest.raises(ValueError, match=rf"\b{name}: expected"):
        call()


_BACKENDS = ["eager", pytest.param("triton", marks=pytest.mark.interpret)]


def _zero_row_cases(dtype):
    g = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=True)  # noqa: E731
    return {
        "nt_xent": (nt_xent, (g(0, 4), g(0, 4), g(0, 3, 4))),
        "nt_xent_masked": (nt_xent, (g(0, 4), g(0, 4), g(0, 3, 4), torch.zeros(0, 3, dtype=torch.bool))),
        "triplet": (triplet, (g(0, 4), g(0, 4), g(0, 4))),
        "fd_cmdie": (fd_cmdie_contrastive_loss, (g(0, 3, 4), g(0, 3, 4), g(0, 2, 2, 3, 4), g(0, 1, 3, 4))),
    }


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("case", ["nt_xent", "nt_xent_masked", "triplet", "fd_cmdie"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_rows_mean_is_zero_with_zero_grads(backend, case, reduction):
    """contract §10 policy: the mean over zero rows (a batch without pairs) is 0, not NaN,
    and its backward runs, giving (empty) zero gradients."""
    dtype = torch.float32
    fn, args = _zero_row_cases(dtype)[case]
    loss = fn(*args, reduction=reduction, backend=backend)
    if reduction == "none":
        assert loss.shape == (0,)
        loss = loss.sum()
    assert loss.shape == () and loss.dtype == dtype and loss.item() == 0.0
    loss.backward()
    for a in args:
        if a.requires_grad:
            assert a.grad is not None and a.grad.shape == a.shape and not a.grad.any()


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_tau_and_margin_raise(backend, value):
    a, p, n = _rand(4, 5, dtype=torch.float32), _rand(4, 5, dtype=torch.float32), _rand(4, 3, 5, dtype=torch.float32)
    s, df, ps, ns = _fd_inputs(2, 1, 1, 5, dtype=torch.float32)
    for name, call in [
        ("nt_xent: tau", lambda: nt_xent(a, p, n, tau=value, backend=backend)),
        ("triplet: margin", lambda: triplet(a, p, p, margin=value, backend=backend)),
        ("fd_cmdie_contrastive_loss: tau", lambda: fd_cmdie_contrastive_loss(s, df, ps, ns, tau=value,
                                                                               backend=backend)),
        ("fd_cmdie_contrastive_loss: margin", lambda: fd_cmdie_contrastive_loss(s, df, ps, ns, margin=value,
                                                                                  backend=backend)),
        ("fd_cmdie_contrastive_loss: lambda_tri", lambda: fd_cmdie_contrastive_loss(
            s, df, ps, ns, lambda_tri=value, backend=backend)),
    ]:
        with pytest.raises(ValueError, match=rf"{name}: expected a (finite )?float.*, got {value}"):
            call()


# --------------------------------------------------------------------------- #
# FDCMDIEContrastiveLoss: forward partners vs memory bank
# --------------------------------------------------------------------------- #


def _dataset(n, d, dtype=torch.float32):
    return torch.randn(n, 3, d, dtype=dtype), torch.randn(n, 3, d, dtype=dtype)


def test_bank_and_forward_sources_agree():
    n, d, b = 11, 6, 4
    sims, diffs = _dataset(n, d)
    idx = torch.tensor([3, 0, 10, 7])
    pos_idx = torch.tensor([[5, 1, -1], [2, -1, -1], [4, 8, 9], [-1, -1, -1]])
    neg_idx = torch.tensor([[6, 2], [9, -1], [1, 0], [3, 5]])
    bank_loss = FDCMDIEContrastiveLoss(n, d, tau=0.4, margin=0.3, lambda_tri=0.2, partner_source="bank")
    bank_loss.update(torch.arange(n), sims, diffs)
    fwd_loss = FDCMDIEContrastiveLoss(tau=0.4, margin=0.3, lambda_tri=0.2)

    s, df = sims[idx].clone().requires_grad_(True), diffs[idx].clone().requires_grad_(True)
    got = bank_loss(s, df, pos_idx=pos_idx, neg_idx=neg_idx, indices=idx)
    got.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert not bank_loss.bank.requires_grad

    pp = torch.stack([sims[pos_idx.clamp_min(0)], diffs[pos_idx.clamp_min(0)]], dim=2)  # (B, Kp, 2, 3, D)
    nn_ = sims[neg_idx.clamp_min(0)]
    want = fwd_loss(sims[idx], diffs[idx], pp, nn_, pos_idx >= 0, neg_idx >= 0)
    torch.testing.assert_close(got, want)
    assert b == idx.numel()


def test_bank_unfilled_rows_are_missing_partners_and_forward_refreshes():
    n, d = 9, 5
    sims, diffs = _dataset(n, d, F64)
    loss = FDCMDIEContrastiveLoss(n, d, partner_source="bank").double()
    with torch.no_grad():
        loss.update(torch.tensor([0, 1, 2, 3]), sims[:4], diffs[:4])
    assert loss.filled.tolist() == [True] * 4 + [False] * 5
    pos_idx = torch.tensor([[1, 6], [7, 8]])  # 6, 7, 8 unfilled
    neg_idx = torch.tensor([[2, 5], [0, 3]])  # 5 unfilled
    bf, bn, pm, nm = loss.gather(pos_idx, neg_idx)
    assert pm.tolist() == [[True, False], [False, False]]
    assert nm.tolist() == [[True, False], [True, True]]
    loss.eval()
    s, df = sims[[4, 5]], diffs[[4, 5]]
    got = loss(s, df, pos_idx=pos_idx, neg_idx=neg_idx, indices=torch.tensor([4, 5]))
    assert not loss.filled[4:].any()  # eval: the bank is not written
    want = fd_cmdie_contrastive_loss(s, df, bf, bn, pos_partner_mask=pm, neg_partner_mask=nm)
    torch.testing.assert_close(got, want)

    loss.train()
    fresh = torch.randn(2, 3, d, dtype=F64, requires_grad=True)
    loss(fresh, df, pos_idx=pos_idx, neg_idx=neg_idx, indices=torch.tensor([6, 7]))
    assert loss.filled[[6, 7]].all() and not loss.filled[8]
    torch.testing.assert_close(loss.bank[[6, 7], 0], fresh.detach())
    assert "bank" in loss.state_dict() and "filled" in loss.state_dict()


def test_module_bad_configuration_and_indices():
    with pytest.raises(ValueError, match="num_samples"):
        FDCMDIEContrastiveLoss(partner_source="bank", dim=4)
    with pytest.raises(ValueError, match="dim"):
        FDCMDIEContrastiveLoss(5, partner_source="bank")
    with pytest.raises(ValueError, match="partner_source"):
        FDCMDIEContrastiveLoss(partner_source="queue")
    loss = FDCMDIEContrastiveLoss(5, 4, partner_source="bank")
    s, df = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="pos_idx"):
        loss(s, df, pos_idx=torch.tensor([[0, 5]]).expand(2, 2), neg_idx=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="neg_idx"):
        loss(s, df, pos_idx=torch.zeros(2, 1, dtype=torch.long), neg_idx=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="indices"):
        loss.update(torch.tensor([0, -1]), s, df)
    with pytest.raises(ValueError, match="pos_partner_feats"):
        FDCMDIEContrastiveLoss()(s, df)
    with pytest.raises(RuntimeError, match="bank"):
        FDCMDIEContrastiveLoss().update(torch.tensor([0, 1]), s, df)


# --------------------------------------------------------------------------- #
# torch.compile
# --------------------------------------------------------------------------- #


def test_nt_xent_compiles_fullgraph():
    a, p, n = torch.randn(6, 10), torch.randn(6, 10), torch.randn(6, 3, 10)
    mask = _random_mask(6, 3)
    fn = torch.compile(lambda a, p, n, m: nt_xent(a, p, n, m, tau=0.25, reduction="sum"), fullgraph=True)
    torch.testing.assert_close(fn(a, p, n, mask), R.nt_xent(a, p, n, mask, 0.25, "sum"), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# triton backend (interpreted on the CPU: TRITON_INTERPRET=1 from conftest) vs
# the reference in fp64 on the same (rounded) inputs, forward and every gradient
# --------------------------------------------------------------------------- #

F16, F32 = torch.float16, torch.float32
_FWD_TOL = {F32: dict(rtol=1e-5, atol=1e-5), F16: dict(rtol=2e-3, atol=2e-3)}
_GRAD_TOL = {F32: dict(rtol=1e-4, atol=1e-5), F16: dict(rtol=1e-2, atol=1e-3)}


def _against_reference(triton_fn, ref_fn, inputs, dtype, cotangent=None):
    """Forward and all input gradients of ``triton_fn`` vs ``ref_fn`` (fp64)."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    xr = [x.detach().double().requires_grad_() for x in xs]
    out, ref = triton_fn(*xs), ref_fn(*xr)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, **_FWD_TOL[dtype])
    cot = torch.randn(ref.shape, dtype=dtype) if cotangent is None else cotangent(out)
    got = torch.autograd.grad(out, xs, cot)
    want = torch.autograd.grad(ref, xr, cot.double())
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype and a.shape == b.shape, i
        assert torch.isfinite(a).all(), i
        torch.testing.assert_close(a.double(), b, **_GRAD_TOL[dtype], msg=lambda m, i=i: f"input {i}: {m}")
    return out, got


def _mask_with_empty_row(*shape):
    m = _random_mask(*shape)
    if shape[0] > 1 and shape[1]:
        m[0] = False  # every negative / partner of this row is invalid
        m[1, 0] = True
    return m


@pytest.mark.parametrize("p,k,d,masked,dtype", [
    (5, 6, 33, True, F32), (3, 1, 7, False, F32), (4, 0, 16, False, F32), (6, 19, 7, True, F32),
    (3, 11, 300, True, F32),  # D_P = 512: several negative blocks per row (online log-sum-exp)
    (5, 6, 33, True, F16), (3, 1, 7, True, F16)])
@pytest.mark.interpret
def test_triton_nt_xent_matches_reference(p, k, d, masked, dtype):
    mask = _mask_with_empty_row(p, k) if masked else None
    _against_reference(lambda a, pos, n: nt_xent(a, pos, n, mask, 0.3, "none", backend="triton"),
                       lambda a, pos, n: R.nt_xent(a, pos, n, mask, 0.3, "none"),
                       [torch.randn(p, d), torch.randn(p, d), torch.randn(p, k, d)], dtype)


@pytest.mark.interpret
def test_triton_nt_xent_all_negatives_invalid_row_is_zero_with_zero_grad():
    a, pos, n = _rand(3, 9, dtype=F32, grad=True), _rand(3, 9, dtype=F32, grad=True), _rand(3, 4, 9, dtype=F32, grad=True)
    mask = _mask_with_empty_row(3, 4)
    out = nt_xent(a, pos, n, mask, 0.5, "none", backend="triton")
    out.sum().backward()
    assert out[0] == 0 and out[1] > 0
    assert torch.all(a.grad[0] == 0) and torch.all(pos.grad[0] == 0) and torch.all(n.grad[~mask] == 0)
    assert torch.all(n.grad[mask].abs().sum(-1) > 0)


@pytest.mark.parametrize("p,d,margin,dtype", [(6, 7, 0.3, F32), (5, 33, 0.5, F32), (1, 16, 3.0, F32),
                                              (7, 33, 0.2, F16)])
@pytest.mark.interpret
def test_triton_triplet_matches_reference(p, d, margin, dtype):
    a, pos, n = (torch.randn(p, d) for _ in range(3))
    # cos(a, p) ~ 1, cos(a, n) ~ -1: the hinge is inactive on even rows (margin < 1)
    pos[::2] = 0.2 * pos[::2] + a[::2]
    n[::2] = 0.2 * n[::2] - a[::2]
    out, _ = _against_reference(lambda a, pos, n: triplet(a, pos, n, margin, "none", backend="triton"),
                                lambda a, pos, n: R.triplet(a, pos, n, margin, "none"), [a, pos, n], dtype)
    active = out > 0
    if margin < 1:
        assert not active[::2].any() and active[1::2].any()  # both sides of the hinge are exercised
    else:
        assert active.all()


@pytest.mark.parametrize("b,kp,kn,d,masked,dtype", [
    (3, 3, 4, 7, True, F32), (2, 1, 1, 33, False, F32), (3, 0, 2, 7, True, F32), (2, 2, 0, 16, True, F32),
    (2, 6, 9, 200, True, F32),  # D_P = 256: several partner blocks per sample, a partial last one
    (2, 3, 2, 600, True, F32),  # D_P = 1024: one partner per block (BLOCK_J = 1)
    (2, 3, 5, 33, True, F16)])
@pytest.mark.interpret
def test_triton_fd_cmdie_matches_reference(b, kp, kn, d, masked, dtype):
    pm = _mask_with_empty_row(b, kp) if masked else None
    nm = _mask_with_empty_row(b, kn).flip(0) if masked else None  # a different sample without negatives
    hyper = (0.4, 0.6, 0.3)
    _against_reference(
        lambda *x: fd_cmdie_contrastive_loss(*x, *hyper, pm, nm, "none", backend="triton"),
        lambda *x: R.fd_cmdie_contrastive_loss(*x, *hyper, pm, nm, "none"),
        [x.float() for x in _fd_inputs(b, kp, kn, d)], dtype)


# Other pair tables of the form the kernel takes (anchors T_s, positives among A_s/V_s,
# negatives among the dissimilarity features): T_s inside and outside the inter-sample rows.
_TABLES = [
    dict(FD_CMDIE_INTRA_POSITIVES=((P.T_S, P.V_S),), FD_CMDIE_INTRA_NEGATIVES=((P.T_S, P.A_D), (P.T_S, P.V_D)),
         FD_CMDIE_TRIPLETS=((P.T_S, P.V_S, P.A_D), (P.T_S, P.V_S, P.V_D)), FD_CMDIE_INTER_MODALITIES=(P.T_S, P.V_S)),
    dict(FD_CMDIE_INTRA_POSITIVES=((P.T_S, P.A_S), (P.T_S, P.V_S)), FD_CMDIE_INTRA_NEGATIVES=((P.T_S, P.T_D),),
         FD_CMDIE_TRIPLETS=((P.T_S, P.A_S, P.T_D),), FD_CMDIE_INTER_MODALITIES=(P.A_S,)),
]


@pytest.mark.interpret
@pytest.mark.parametrize("table", range(len(_TABLES)))
def test_triton_fd_cmdie_and_reference_read_one_pair_table(monkeypatch, table):
    """Kernel and reference both follow ``ops/_common``'s pair table: replaced there, the
    loss changes and the two still agree, forward and backward."""
    inputs = [x.float() for x in _fd_inputs(3, 3, 2, 7)]
    pm = _mask_with_empty_row(3, 3)
    fd = lambda *x: R.fd_cmdie_contrastive_loss(*x, pos_partner_mask=pm, reduction="none")  # noqa: E731
    before = fd(*(x.double() for x in inputs))
    for name, value in _TABLES[table].items():
        monkeypatch.setattr(P, name, value)
    after = fd(*(x.double() for x in inputs))
    assert not torch.allclose(before, after)
    _against_reference(lambda *x: fd_cmdie_contrastive_loss(*x, pos_partner_mask=pm, reduction="none",
                                                            backend="triton"), fd, inputs, F32)


# tables neither path computes: an anchor other than T_s, a positive among the
# dissimilarity rows, a row twice (the kernels' bit masks would count it once)
_BAD_TABLES = [("FD_CMDIE_INTRA_POSITIVES", ((P.A_S, P.V_S),)), ("FD_CMDIE_INTRA_POSITIVES", ((P.T_S, P.T_D),)),
               ("FD_CMDIE_INTRA_POSITIVES", ((P.T_S, P.V_S), (P.T_S, P.V_S))),
               ("FD_CMDIE_INTRA_NEGATIVES", ((P.T_S, P.A_D), (P.T_S, P.A_D))),
               ("FD_CMDIE_TRIPLETS", ((P.T_S, P.V_S, P.T_D),) * 2), ("FD_CMDIE_INTER_MODALITIES", (P.A_S, P.A_S)),
               ("FD_CMDIE_INTER_MODALITIES", (P.T_D,))]


@pytest.mark.interpret
@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("bad", range(len(_BAD_TABLES)))
def test_fd_cmdie_pair_table_neither_path_computes_is_refused(monkeypatch, backend, bad):
    monkeypatch.setattr(P, *_BAD_TABLES[bad])
    with pytest.raises(ValueError, match="pair table: expected"):
        fd_cmdie_contrastive_loss(*(x.float() for x in _fd_inputs(2, 1, 1, 8)), backend=backend)


@pytest.mark.interpret
def test_triton_fd_cmdie_empty_table_parts_match_reference(monkeypatch):
    """No Positive_in and no triplets (only the inter-sample pairs carry a loss), then no
    pairs at all: empty groups add 0 and no exp overflows."""
    inputs = [x.float() for x in _fd_inputs(2, 2, 2, 8)]
    for name in ("FD_CMDIE_INTRA_POSITIVES", "FD_CMDIE_TRIPLETS", "FD_CMDIE_INTER_MODALITIES"):
        monkeypatch.setattr(P, name, ())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the interpreter's numpy warns on an exp overflow
            out, _ = _against_reference(
                lambda *x: fd_cmdie_contrastive_loss(*x, reduction="none", backend="triton"),
                lambda *x: R.fd_cmdie_contrastive_loss(*x, reduction="none"), inputs, F32)
        if name == "FD_CMDIE_TRIPLETS":
            assert torch.all(out > 0)  # the inter-sample groups
    assert torch.all(out == 0)


@pytest.mark.interpret
def test_triton_zero_vectors_match_reference_without_nan():
    a, pos, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 3, 8)
    a[0] = 0
    pos[1] = 0
    n[2, 1] = 0
    n[3] = 0
    mask = _random_mask(4, 3)
    _against_reference(lambda *x: nt_xent(*x, mask, 0.5, "none", backend="triton"),
                       lambda *x: R.nt_xent(*x, mask, 0.5, "none"), [a, pos, n], F32)
    _against_reference(lambda *x: triplet(*x, 0.5, "none", backend="triton"),
                       lambda *x: R.triplet(*x, 0.5, "none"), [a, pos, n[:, 1]], F32)
    s, df, ps, ns = (x.float() for x in _fd_inputs(3, 2, 2, 8))
    s[0] = 0  # a whole sample of zero similarity features
    s[1, 1] = 0
    df[2, 0] = 0
    ps[1, 0] = 0
    ps[2, 1, 1, 2] = 0
    ns[0, 1] = 0
    _, grads = _against_reference(lambda *x: fd_cmdie_contrastive_loss(*x, reduction="none", backend="triton"),
                                  lambda *x: R.fd_cmdie_contrastive_loss(*x, reduction="none"), [s, df, ps, ns], F32)
    assert torch.all(grads[0][0] == 0) and torch.all(grads[2][1, 0] == 0)
    zs = [torch.zeros(x.shape) for x in (s, df, ps, ns)]
    _against_reference(lambda *x: fd_cmdie_contrastive_loss(*x, backend="triton"),
                       lambda *x: R.fd_cmdie_contrastive_loss(*x), zs, F32)


@pytest.mark.interpret
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_reductions_and_strided_upstream_gradients(reduction):
    # mean / sum hand the kernels stride-0 row gradients; "none" gets a strided one.
    cot = (lambda out: torch.randn(2 * out.numel())[::2]) if reduction == "none" else None
    mask = _mask_with_empty_row(4, 5)
    _against_reference(lambda *x: nt_xent(*x, mask, 0.7, reduction, backend="triton"),
                       lambda *x: R.nt_xent(*x, mask, 0.7, reduction),
                       [torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 5, 10)], F32, cot)
    _against_reference(lambda *x: triplet(*x, 0.4, reduction, backend="triton"),
                       lambda *x: R.triplet(*x, 0.4, reduction), [torch.randn(6, 10) for _ in range(3)], F32, cot)
    pm, nm = _mask_with_empty_row(3, 2), _mask_with_empty_row(3, 3)
    _against_reference(lambda *x: fd_cmdie_contrastive_loss(*x, 0.5, 0.5, 0.1, pm, nm, reduction, backend="triton"),
                       lambda *x: R.fd_cmdie_contrastive_loss(*x, 0.5, 0.5, 0.1, pm, nm, reduction),
                       [x.float() for x in _fd_inputs(3, 2, 3, 10)], F32, cot)


@pytest.mark.interpret
def test_triton_non_contiguous_inputs():
    a = torch.randn(9, 5).T  # (5, 9), non-contiguous
    n = torch.randn(5, 9, 4).transpose(1, 2)  # (5, 4, 9)
    _against_reference(lambda a, pos, n: nt_xent(a, pos, n, None, 0.5, "none", backend="triton"),
                       lambda a, pos, n: R.nt_xent(a, pos, n, None, 0.5, "none"), [a, torch.randn(5, 9), n], F32)
    s = torch.randn(2, 11, 3).transpose(1, 2)
    ps = torch.randn(2, 2, 3, 2, 11).transpose(2, 3)
    _against_reference(lambda *x: fd_cmdie_contrastive_loss(*x, reduction="sum", backend="triton"),
                       lambda *x: R.fd_cmdie_contrastive_loss(*x, reduction="sum"),
                       [s, torch.randn(2, 3, 11), ps, torch.randn(2, 3, 3, 11)], F32)


@pytest.mark.interpret
def test_triton_detached_partners_skip_their_gradients():
    s, df, ps, ns = (x.float() for x in _fd_inputs(3, 2, 3, 12))
    pm = _mask_with_empty_row(3, 2)
    s_t, df_t = s.clone().requires_grad_(), df.clone().requires_grad_()
    fd_cmdie_contrastive_loss(s_t, df_t, ps, ns, pos_partner_mask=pm, backend="triton").backward()
    s_r, df_r = s.double().requires_grad_(), df.double().requires_grad_()
    R.fd_cmdie_contrastive_loss(s_r, df_r, ps.double(), ns.double(), pos_partner_mask=pm).backward()
    torch.testing.assert_close(s_t.grad.double(), s_r.grad, **_GRAD_TOL[F32])
    torch.testing.assert_close(df_t.grad.double(), df_r.grad, **_GRAD_TOL[F32])
    a, pos, n = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6), torch.randn(3, 2, 6)
    nt_xent(a, pos, n, backend="triton").backward()
    a_r = a.detach().double().requires_grad_()
    R.nt_xent(a_r, pos.double(), n.double()).backward()
    torch.testing.assert_close(a.grad.double(), a_r.grad, **_GRAD_TOL[F32])


@pytest.mark.interpret
def test_triton_opcheck():
    a, pos, n = (torch.randn(*s, requires_grad=True) for s in ((3, 7), (3, 7), (3, 4, 7)))
    mask = _mask_with_empty_row(3, 4)
    torch.library.opcheck(torch.ops.msa_fast.nt_xent_triton, (a, pos, n, mask, 0.5))
    torch.library.opcheck(torch.ops.msa_fast.nt_xent_triton, (a, pos, n, None, 0.5))
    torch.library.opcheck(torch.ops.msa_fast.triplet_triton, (a, pos, n[:, 0].detach().requires_grad_(), 0.5))
    xs = [x.float().requires_grad_() for x in _fd_inputs(2, 2, 2, 7)]
    torch.library.opcheck(torch.ops.msa_fast.fd_cmdie_contrastive_loss_triton,
                          (*xs, _mask_with_empty_row(2, 2), None, 0.5, 0.5, 0.1))


@pytest.mark.interpret
def test_triton_compiles_fullgraph_with_backward():
    xs = [x.float() for x in _fd_inputs(2, 2, 3, 9)]
    pm = _mask_with_empty_row(2, 2)

    def loss(s, df, ps, ns):
        return 2.0 * fd_cmdie_contrastive_loss(s, df, ps, ns, 0.5, 0.5, 0.1, pm, None, backend="triton")

    def ref(s, df, ps, ns):
        return 2.0 * R.fd_cmdie_contrastive_loss(s, df, ps, ns, 0.5, 0.5, 0.1, pm, None)

    _against_reference(torch.compile(loss, fullgraph=True), ref, xs, F32)


@pytest.mark.interpret
def test_triton_backend_selection():
    a, pos, n = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 2, 5)
    xs = [x.float() for x in _fd_inputs(2, 1, 1, 5)]
    # fp64: the kernels compute in fp32, so an explicit request raises naming the dtype
    # and auto runs the reference.
    with pytest.raises(ValueError, match="nt_xent: backend 'triton' takes dtypes .* got torch.float64"):
        nt_xent(a.double(), pos.double(), n.double(), backend="triton")
    with pytest.raises(ValueError, match="fd_cmdie_contrastive_loss: backend 'triton' .* torch.float64"):
        fd_cmdie_contrastive_loss(*(x.double() for x in xs), backend="triton")
    torch.testing.assert_close(nt_xent(a.double(), pos.double(), n.double(), backend="auto"),
                               R.nt_xent(a.double(), pos.double(), n.double()))
    assert msa_fast.available("triplet", "cpu") == ["eager", "triton", "compile"]  # triton interpreted here


def test_triton_unavailable_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, pos, n = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 2, 5)
    xs = [x.float() for x in _fd_inputs(2, 1, 1, 5)]
    for call in (lambda b: nt_xent(a, pos, n, backend=b), lambda b: triplet(a, pos, n[:, 0], backend=b),
                 lambda b: fd_cmdie_contrastive_loss(*xs, backend=b)):
        with pytest.raises(RuntimeError, match="backend 'triton' is unavailable: Triton kernels need CUDA"):
            call("triton")
        with msa_fast.use_backend("triton"), pytest.raises(RuntimeError, match="unavailable"):
            call(None)
        # auto on the CPU is the compiled reference: equal to eager within fp32 rounding
        # (inductor's reduction order differs by an ulp on torch 2.11), not bit for bit
        torch.testing.assert_close(call("auto"), call("eager"))


@pytest.mark.interpret
def test_fd_cmdie_module_triton_equals_eager():
    n, d = 10, 12
    sims, diffs = _dataset(n, d)
    idx = torch.tensor([3, 0, 7])
    pos_idx = torch.tensor([[5, 1], [2, -1], [-1, -1]])
    neg_idx = torch.tensor([[6, 2, 9], [9, -1, 4], [1, 0, 8]])
    losses = {}
    for backend in ("eager", "triton"):
        mod = FDCMDIEContrastiveLoss(n, d, tau=0.4, margin=0.3, lambda_tri=0.2, partner_source="bank",
                                     backend=backend)
        mod.update(torch.arange(n), sims, diffs)
        s = sims[idx].clone().requires_grad_(True)
        df = diffs[idx].clone().requires_grad_(True)
        out = mod(s, df, pos_idx=pos_idx, neg_idx=neg_idx, indices=idx)
        out.backward()
        losses[backend] = (out, s.grad, df.grad)
    for a, b in zip(losses["triton"], losses["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# GPU only: compiled kernels, bf16, large shapes
# --------------------------------------------------------------------------- #


def _gpu_check(triton_fn, ref_fn, inputs, dtype):
    xs = [x.cuda().to(dtype).requires_grad_() for x in inputs]
    xr = [x.detach().float().requires_grad_() for x in xs]
    out, ref = triton_fn(*xs), ref_fn(*xr)
    low = dtype != F32
    torch.testing.assert_close(out.float(), ref, rtol=2e-2 if low else 1e-5, atol=2e-2 if low else 1e-4)
    cot = torch.randn_like(ref)
    got = torch.autograd.grad(out, xs, cot.to(dtype))
    want = torch.autograd.grad(ref, xr, cot.to(dtype).float())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=5e-2 if low else 1e-4, atol=5e-3 if low else 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, F16, F32])
def test_triton_gpu_large(dtype):
    torch.manual_seed(0)
    p, k, d = 4096, 50, 256
    mask = (torch.rand(p, k) < 0.9).cuda()
    _against = lambda f, r, x: _gpu_check(f, r, x, dtype)  # noqa: E731
    _against(lambda *x: nt_xent(*x, mask, 0.5, "none", backend="triton"),
             lambda *x: R.nt_xent(*x, mask, 0.5, "none"), [torch.randn(p, d), torch.randn(p, d), torch.randn(p, k, d)])
    _against(lambda *x: triplet(*x, 0.5, "none", backend="triton"), lambda *x: R.triplet(*x, 0.5, "none"),
             [torch.randn(p, d) for _ in range(3)])
    b, kp, kn = 512, 50, 50
    pm, nm = (torch.rand(b, kp) < 0.9).cuda(), (torch.rand(b, kn) < 0.9).cuda()
    _against(lambda *x: fd_cmdie_contrastive_loss(*x, 0.5, 0.5, 0.1, pm, nm, "none", backend="triton"),
             lambda *x: R.fd_cmdie_contrastive_loss(*x, 0.5, 0.5, 0.1, pm, nm, "none"),
             [x.float() for x in _fd_inputs(b, kp, kn, d)])
