"""dual_gate (contract §3.1): reference by hand, public op, validation, compile, DualGateFusion."""

import math

import pytest
import torch

import msa_fast
from msa_fast import ops
from msa_fast.ops import reference as R

F64 = torch.float64


def _rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _inputs(lead=(4,), m=3, d=7, c=5, dtype=torch.float32):
    """``(h, u, w_z, b_z, g_logits)``, fresh random values."""
    return _rand(*lead, m, d, dtype=dtype), _rand(*lead, m, c, dtype=dtype), _rand(m, d, dtype=dtype), \
        _rand(m, dtype=dtype), _rand(*lead, m, dtype=dtype)


def _softmax(xs):
    mx = max(xs)
    ex = [math.exp(x - mx) for x in xs]
    return [e / sum(ex) for e in ex]


def _entropy(row):
    p = _softmax(row)
    return -sum(pi * math.log(pi) for pi in p)


def _spec_formula(h, u, w_z, b_z, gl, tau):
    """contract §3.1 written out with plain softmax / log (fine on moderate fp64 inputs)."""
    q = torch.softmax(u, -1)
    H = -(q * q.log()).sum(-1) / math.log(u.shape[-1])
    e = torch.softmax((h * w_z).sum(-1) + b_z - H / tau, -1)
    g = torch.sigmoid(gl)
    return (e[..., None] * h).sum(-2), (g[..., None] * h).flatten(-2), e, g, H


def test_dual_gate_hand_computed():
    ln2, tau = math.log(2.0), 0.5
    h = [[1.0, 1.0, 1.0], [ln2, 0.0, 0.0]]
    u = [[0.3, 0.3, 0.3], [ln2, 0.0, 0.0]]  # q = uniform; q = (1/2, 1/4, 1/4)
    w_z = [[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]]
    b_z = [0.5, -1.0]
    g_logits = [0.0, math.log(3.0)]  # g = (1/2, 3/4)
    H = [1.0, 1.5 * ln2 / math.log(3.0)]  # uniform: exactly 1; (1/2, 1/4, 1/4): 1.5 ln 2 nats / ln 3
    assert H[0] == pytest.approx(_entropy(u[0]) / math.log(3)) and H[1] == pytest.approx(_entropy(u[1]) / math.log(3))
    z = [1 + 2 + 0.5, 3 * ln2 - 1.0]
    e = _softmax([z[0] - H[0] / tau, z[1] - H[1] / tau])
    h_ent = [e[0] * a + e[1] * b for a, b in zip(*h)]
    h_imp_in = [0.5, 0.5, 0.5, 0.75 * ln2, 0.0, 0.0]

    t = lambda x: torch.tensor(x, dtype=F64)  # noqa: E731
    out = R.dual_gate(t(h), t(u), t(w_z), t(b_z), t(g_logits), tau)
    torch.testing.assert_close(out[0], t(h_ent))
    torch.testing.assert_close(out[1], t(h_imp_in))
    torch.testing.assert_close(out[2], t(e))
    torch.testing.assert_close(out[3], t([0.5, 0.75]))
    torch.testing.assert_close(out[4], t(H))


@pytest.mark.parametrize("c", [5, 37])
def test_dual_gate_matches_formula_on_random_input(c):
    h, u, w_z, b_z, gl = _inputs(lead=(5, 2), m=3, d=37, c=c, dtype=F64)
    out = ops.dual_gate(h, u, w_z, b_z, gl, tau=0.7)
    for got, want in zip(out, _spec_formula(h, u, w_z, b_z, gl, 0.7)):
        torch.testing.assert_close(got, want)
    h_ent, h_imp_in, e, g, H = out
    assert h_ent.shape == (5, 2, 37) and h_imp_in.shape == (5, 2, 111)
    assert e.shape == g.shape == H.shape == (5, 2, 3)
    assert (H >= 0).all() and (H <= 1).all()


def test_dual_gate_default_tau_is_half():
    args = _inputs(dtype=F64)
    for a, b in zip(ops.dual_gate(*args), ops.dual_gate(*args, tau=0.5)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_higher_entropy_lowers_the_weight_whatever_the_sign_of_z():
    """contract §3.1's property: raising H_m (a flatter softmax(u_m)) lowers e_m for any z_m,
    negative included. The v1 gate softmax(z * exp(-H / tau)) fails this for z_m < 0
    (a higher entropy pulled the logit towards 0, i.e. up), which this test checks too."""
    torch.manual_seed(0)
    B, M, D, C = 64, 3, 6, 7
    h, w_z = torch.randn(B, M, D, dtype=F64), torch.randn(M, D, dtype=F64)
    gl = torch.randn(B, M, dtype=F64)
    z0 = (h * w_z).sum(-1)
    b_z = torch.zeros(M, dtype=F64)
    b_z[0] = -3.0 - z0[:, 0].max()  # modality 0: z < 0 on every sample
    b_z[1] = 3.0 - z0[:, 1].min()   # modality 1: z > 0 on every sample
    z = z0 + b_z
    assert (z[:, 0] < 0).all() and (z[:, 1] > 0).all()
    peaked = torch.randn(B, M, C, dtype=F64) * 4.0
    for m in (0, 1):
        flatter = peaked.clone()
        flatter[:, m] = flatter[:, m] * 0.1  # same ranking, flatter softmax: higher entropy
        _, _, e_lo, _, H_lo = ops.dual_gate(h, peaked, w_z, b_z, gl, 0.5)
        _, _, e_hi, _, H_hi = ops.dual_gate(h, flatter, w_z, b_z, gl, 0.5)
        assert (H_hi[:, m] > H_lo[:, m]).all()
        assert (e_hi[:, m] < e_lo[:, m]).all(), m

        # the v1 formulation (entropy of softmax of the same logits, multiplicative) breaks it
        def v1_weight(u_, m=m):
            q = torch.softmax(u_, -1)
            ent = -(q * q.log()).sum(-1)
            return torch.softmax(z * torch.exp(-ent / 0.5), -1)[:, m]

        if m == 0:
            assert (v1_weight(flatter) > v1_weight(peaked)).any()


def test_dual_gate_single_class_has_zero_entropy():
    h, _, w_z, b_z, gl = _inputs(lead=(3,), m=2, d=4, dtype=F64)
    u = _rand(3, 2, 1, dtype=F64, requires_grad=True)
    h_ent, _, e, _, H = ops.dual_gate(h, u, w_z, b_z, gl)
    torch.testing.assert_close(H, torch.zeros(3, 2, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(e, torch.softmax((h * w_z).sum(-1) + b_z, -1))
    (grad,) = torch.autograd.grad(e.sum() + H.sum(), u)
    torch.testing.assert_close(grad, torch.zeros_like(u), rtol=0, atol=0)


def test_dual_gate_entropy_is_stable_for_peaked_inputs():
    h, u, w_z, b_z, gl = _inputs(lead=(3,), m=2, d=5, c=7)
    u = (u * 1e4).requires_grad_(True)  # softmax underflows to exact zeros: q log q must read as 0, not NaN
    h.requires_grad_(True)
    out = ops.dual_gate(h, u, w_z, b_z, gl)
    assert all(torch.isfinite(o).all() for o in out)
    torch.testing.assert_close(out[4], torch.zeros(3, 2), rtol=0, atol=1e-6)
    sum(o.sum() for o in out).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(u.grad).all()


@pytest.mark.parametrize("shape", [(2, 2, 3, 4), (1, 1, 37, 7), (3, 3, 4, 4)])
def test_dual_gate_gradcheck(shape):
    b, m, d, c = shape
    args = [t.requires_grad_(True) for t in _inputs(lead=(b,), m=m, d=d, c=c, dtype=F64)]
    assert torch.autograd.gradcheck(lambda *a: R.dual_gate(*a, tau=1.3), args)
    assert torch.autograd.gradgradcheck(lambda *a: R.dual_gate(*a, tau=0.5), args)


def test_dual_gate_bf16_close_to_fp32():
    h, u, w_z, b_z, gl = _inputs(lead=(6,), m=3, d=20, c=7)
    out = ops.dual_gate(h.bfloat16(), u.bfloat16(), w_z.bfloat16(), b_z.bfloat16(), gl.bfloat16())
    ref = ops.dual_gate(h.bfloat16().float(), u.bfloat16().float(), w_z.bfloat16().float(),
                        b_z.bfloat16().float(), gl.bfloat16().float())
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case,arg", [("h_rank", "h"), ("u_lead", "u"), ("u_m", "u"), ("u_empty", "u"),
                                      ("u_dtype", "u"), ("w_width", "w_z"), ("b_len", "b_z"),
                                      ("g_batch", "g_logits"), ("w_dtype", "w_z"), ("g_device", "g_logits"),
                                      ("tau", "tau"), ("h_int", "h")])
def test_dual_gate_bad_input(case, arg):
    h, u, w_z, b_z, gl = _inputs(lead=(4,), m=3, d=7)
    tau = 1.0
    if case == "h_rank":
        h = h[0, 0]
    elif case == "u_lead":
        u = _rand(5, 3, 5)
    elif case == "u_m":
        u = _rand(4, 2, 5)
    elif case == "u_empty":
        u = _rand(4, 3, 0)
    elif case == "u_dtype":
        u = u.double()
    elif case == "w_width":
        w_z = _rand(3, 6)
    elif case == "b_len":
        b_z = _rand(2)
    elif case == "g_batch":
        gl = _rand(5, 3)
    elif case == "w_dtype":
        w_z = w_z.double()
    elif case == "g_device":
        gl = gl.to("meta")
    elif case == "tau":
        tau = 0.0
    elif case == "h_int":
        h = h.long()
    with pytest.raises(ValueError, match=f"dual_gate: {arg}: expected") as info:
        ops.dual_gate(h, u, w_z, b_z, gl, tau)
    if case.startswith("u_") and case != "u_dtype":
        assert "got shape" in str(info.value)


def test_dual_gate_backend_and_compile():
    args = _inputs(lead=(3,), m=3, d=9, c=7)
    with pytest.raises(RuntimeError, match="dual_gate: backend 'cuda' is unavailable"):
        ops.dual_gate(*args, backend="cuda")
    ref = ops.dual_gate(*args, backend="eager")
    for a, b in zip(ops.dual_gate(*args, backend="auto"), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fn = torch.compile(lambda *a: ops.dual_gate(*a, tau=0.5), fullgraph=True)
    for a, b in zip(fn(*args), ops.dual_gate(*args, tau=0.5)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- module


@pytest.mark.parametrize("source", ["classes", "features"])
def test_dual_gate_fusion_matches_spec_formula(source):
    mod = msa_fast.nn.DualGateFusion(11, num_modalities=3, tau=0.8, hidden=13, entropy_source=source,
                                     num_classes=5).double()
    with torch.no_grad():
        mod.alpha.fill_(0.4)  # away from the 0 init so that both branches matter
    h = _rand(2, 5, 3, 11, dtype=F64)
    fused = mod(h)
    if source == "classes":
        u = torch.stack([h[..., m, :] @ mod.W_u[m].T + mod.b_u[m] for m in range(3)], dim=-2)
        assert u.shape == (2, 5, 3, 5) and mod.num_classes == 5
    else:
        u = h
        assert mod.num_classes == 11 and not hasattr(mod, "W_u")
    g_logits = mod.importance(h.reshape(2, 5, 33))
    h_ent, h_imp_in, e, g, H = _spec_formula(h, u, mod.w_z, mod.b_z, g_logits, 0.8)
    h_imp = h_imp_in @ mod.W_f.weight.T + mod.W_f.bias
    a = torch.sigmoid(torch.tensor(0.4, dtype=F64))
    torch.testing.assert_close(fused, a * h_ent + (1 - a) * h_imp)
    e_last, g_last, H_last = mod.last_weights
    for got, want in ((e_last, e), (g_last, g), (H_last, H)):
        torch.testing.assert_close(got, want)
        assert not got.requires_grad
    torch.testing.assert_close(mod.entropy_logits, u)
    if source == "classes":
        assert mod.entropy_logits.requires_grad  # with its graph, for the auxiliary loss
    else:
        assert mod.entropy_logits is h


def test_dual_gate_fusion_defaults():
    mod = msa_fast.nn.DualGateFusion(10)
    assert mod.tau == 0.5 and mod.entropy_source == "classes" and mod.num_classes == 7
    assert mod.W_u.shape == (3, 7, 10) and mod.b_u.shape == (3, 7)


def test_dual_gate_fusion_aux_gradient_reaches_the_class_weights():
    mod = msa_fast.nn.DualGateFusion(6)
    h = _rand(4, 3, 6, requires_grad=True)
    mod(h)
    ce = torch.nn.functional.cross_entropy(mod.entropy_logits.flatten(0, 1), torch.randint(0, 7, (12,)))
    ce.backward()
    assert mod.W_u.grad.abs().sum() > 0 and mod.b_u.grad.abs().sum() > 0 and h.grad.abs().sum() > 0


@pytest.mark.parametrize("source", ["classes", "features"])
def test_dual_gate_fusion_shapes_and_backward(source):
    mod = msa_fast.nn.DualGateFusion(10, num_modalities=2, dropout=0.1, entropy_source=source)
    assert float(mod.alpha.detach()) == 0.0
    h = _rand(7, 2, 10, requires_grad=True)
    out = mod(h)
    assert out.shape == (7, 10)
    out.sum().backward()
    assert torch.isfinite(h.grad).all()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the entropy logits reach the output: their weights get a gradient from the fused output alone
    if source == "classes":
        assert mod.W_u.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="DualGateFusion: h: expected"):
        mod(_rand(7, 3, 10))


@pytest.mark.parametrize("kwargs,name", [({"entropy_source": "logits"}, "entropy_source"),
                                         ({"num_classes": 1}, "num_classes"), ({"tau": 0.0}, "tau"),
                                         ({"num_classes": 2.0}, "num_classes"),
                                         ({"relevance_init": "xavier"}, "relevance_init")])
def test_dual_gate_fusion_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"DualGateFusion: {name}: expected"):
        msa_fast.nn.DualGateFusion(8, **kwargs)


def test_dual_gate_fusion_zero_relevance_init_favours_no_modality():
    torch.manual_seed(0)
    mod = msa_fast.nn.DualGateFusion(6, relevance_init="zeros").eval()
    assert torch.all(mod.w_z == 0) and mod.w_z.requires_grad
    h = _rand(5, 3, 6)
    mod(h)
    e, _, H = mod.last_weights
    # z_m = 0 for every m: the entropy gate is exactly softmax(-H / tau)
    torch.testing.assert_close(e, torch.softmax(-H / mod.tau, dim=-1))
    mod.train()(h).sum().backward()
    assert mod.w_z.grad.abs().sum() > 0  # it learns from 0
    assert not torch.all(msa_fast.nn.DualGateFusion(6).w_z == 0)  # the default draws N(0, 1/D)


def test_dual_gate_fusion_backend_is_passed_to_the_op():
    mod = msa_fast.nn.DualGateFusion(6, backend="cuda")
    with pytest.raises(RuntimeError, match="dual_gate: backend 'cuda'"):
        mod(_rand(2, 3, 6))


def test_dual_gate_fusion_compiles_fullgraph():
    torch.manual_seed(2)
    mod = msa_fast.nn.DualGateFusion(12, num_modalities=3)
    h = _rand(4, 3, 12)
    want = mod(h)
    fn = torch.compile(mod, fullgraph=True)
    torch.testing.assert_close(fn(h), want, rtol=1e-5, atol=1e-5)
    assert mod.last_weights[2].shape == (4, 3)


# --------------------------------------------------------------------------- #
# triton backend (interpreted on the CPU) vs the reference
# --------------------------------------------------------------------------- #


def _triton_dual_gate_inputs(shape, dtype):
    *lead, m, d, c = shape
    h = torch.randn(*lead, m, d, dtype=dtype)
    u = torch.randn(*lead, m, c, dtype=dtype) * 2.0
    w_z = torch.randn(m, d, dtype=dtype) / d**0.5
    b_z = torch.randn(m, dtype=dtype)
    g_logits = torch.randn(*lead, m, dtype=dtype)
    return [t.requires_grad_() for t in (h, u, w_z, b_z, g_logits)]


@pytest.mark.interpret
@pytest.mark.parametrize("shape", [(1, 3, 1, 7), (5, 3, 7, 7), (2, 4, 3, 37, 7), (2, 3, 37, 37), (3, 1, 5, 5),
                                   (3, 2, 130, 1), (2, 2, 9, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dual_gate_matches_reference(shape, dtype):
    inputs = _triton_dual_gate_inputs(shape, dtype)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    out = msa_fast.ops.dual_gate(*inputs, 0.7, backend="triton")
    ref = R.dual_gate(*ref_in, 0.7)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(out, ref):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, **tol)
    # one random cotangent per output, and a stride-0 one (what out.sum().backward() hands)
    cots = [torch.randn_like(o) for o in out]
    cots[0] = torch.ones((), dtype=dtype).expand_as(out[0])
    cots[4] = torch.ones((), dtype=dtype).expand_as(out[4])
    got = torch.autograd.grad(out, inputs, cots)
    want = torch.autograd.grad(ref, ref_in, [c.double() for c in cots])
    gtol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **gtol)


@pytest.mark.interpret
def test_triton_dual_gate_non_contiguous_gradient_and_unused_outputs():
    h, u, w_z, b_z, g_logits = _triton_dual_gate_inputs((6, 3, 11, 7), torch.float32)
    h_ent, h_imp, e, g, H = msa_fast.ops.dual_gate(h, u, w_z, b_z, g_logits, 1.3, backend="triton")
    cot = torch.randn(11, 6).T  # non-contiguous
    got = torch.autograd.grad(h_ent, (h, u, w_z, b_z, g_logits), cot, retain_graph=True)
    r_in = [t.detach().requires_grad_() for t in (h, u, w_z, b_z, g_logits)]
    want = torch.autograd.grad(R.dual_gate(*r_in, 1.3)[0], r_in, cot, allow_unused=True)
    assert want[4] is None  # h_ent does not depend on the importance gate
    torch.testing.assert_close(got[4], torch.zeros_like(g_logits))
    for a, b in zip(got[:4], want[:4]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # H alone: its gradient reaches u only
    cot_h = torch.randn(3, 6).T
    got = torch.autograd.grad(H, (h, u, w_z), cot_h)
    want = torch.autograd.grad(R.dual_gate(*r_in, 1.3)[4], r_in[:3], cot_h, allow_unused=True)
    assert want[0] is None and want[2] is None
    torch.testing.assert_close(got[0], torch.zeros_like(h))
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)


@pytest.mark.interpret
def test_triton_dual_gate_features_source_shares_the_tensor():
    """u = h (entropy_source="features"): the gradients of both uses add up."""
    h, _, w_z, b_z, g_logits = _triton_dual_gate_inputs((4, 3, 9, 9), torch.float32)
    got = torch.autograd.grad(sum(o.sum() for o in msa_fast.ops.dual_gate(h, h, w_z, b_z, g_logits,
                                                                           backend="triton")), h)
    want = torch.autograd.grad(sum(o.sum() for o in R.dual_gate(h, h, w_z, b_z, g_logits)), h)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)


@pytest.mark.interpret
def test_triton_dual_gate_opcheck_and_compile():
    inputs = _triton_dual_gate_inputs((4, 3, 19, 7), torch.float32)
    torch.library.opcheck(torch.ops.msa_fast.dual_gate_triton, (*inputs, 0.5))
    fn = torch.compile(lambda *a: msa_fast.ops.dual_gate(*a, 0.5, backend="triton"), fullgraph=True)
    for a, b in zip(fn(*inputs), R.dual_gate(*inputs, 0.5)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize("source", ["classes", "features"])
def test_dual_gate_fusion_triton_equals_eager(source):
    torch.manual_seed(1)
    mod = msa_fast.nn.DualGateFusion(24, num_modalities=3, entropy_source=source)
    h = torch.randn(5, 3, 24, requires_grad=True)
    with msa_fast.use_backend("eager"):
        want = mod(h)
    (want_grad,) = torch.autograd.grad(want.sum(), h)
    mod_t = msa_fast.nn.DualGateFusion(24, num_modalities=3, entropy_source=source, backend="triton")
    mod_t.load_state_dict(mod.state_dict())
    got = mod_t(h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), h)[0], want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.interpret
def test_dual_gate_fusion_triton_compiles_fullgraph():
    torch.manual_seed(3)
    mod = msa_fast.nn.DualGateFusion(16, backend="triton")
    h = torch.randn(3, 3, 16)
    with msa_fast.use_backend("eager"):
        want = msa_fast.nn.DualGateFusion(16, backend="eager")
        want.load_state_dict(mod.state_dict())
        want = want(h)
    torch.testing.assert_close(torch.compile(mod, fullgraph=True)(h), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("c", [7, 768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_dual_gate_gpu_large(dtype, c):
    torch.manual_seed(0)
    inputs = [t.detach().cuda().requires_grad_() for t in _triton_dual_gate_inputs((4096, 3, 768, c), dtype)]
    out = msa_fast.ops.dual_gate(*inputs, 0.5, backend="triton")
    ref_in = [t.detach().float().requires_grad_() for t in inputs]
    ref = R.dual_gate(*ref_in, 0.5)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.float(), b, **tol)
    got = torch.autograd.grad(sum(o.float().sum() for o in out), inputs)
    want = torch.autograd.grad(sum(o.sum() for o in ref), ref_in)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=5e-2 if dtype == torch.bfloat16 else 1e-4,
                                   atol=5e-2 if dtype == torch.bfloat16 else 1e-3)
