"""dual_gate (SPEC 3.1): reference by hand, public op, validation, compile, DualGateFusion."""

import math

import pytest
import torch

import msa_fast
from msa_fast import ops
from msa_fast.ops import reference as R

F64 = torch.float64


def _rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _inputs(lead=(4,), m=3, d=7, dtype=torch.float32):
    return _rand(*lead, m, d, dtype=dtype), _rand(m, d, dtype=dtype), _rand(m, dtype=dtype), \
        _rand(*lead, m, dtype=dtype)


def _softmax(xs):
    mx = max(xs)
    ex = [math.exp(x - mx) for x in xs]
    return [e / sum(ex) for e in ex]


def _entropy(row):
    p = _softmax(row)
    return -sum(pi * math.log(pi) for pi in p)


def test_dual_gate_hand_computed():
    ln2, tau = math.log(2.0), 2.0
    h = [[1.0, 1.0, 1.0], [ln2, 0.0, 0.0]]  # p = uniform; p = (1/2, 1/4, 1/4)
    w_z = [[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]]
    b_z = [0.5, -1.0]
    g_logits = [0.0, math.log(3.0)]  # g = (1/2, 3/4)
    H = [math.log(3.0), 1.5 * ln2]
    assert H[0] == pytest.approx(_entropy(h[0])) and H[1] == pytest.approx(_entropy(h[1]))
    z = [1 + 2 + 0.5, 3 * ln2 - 1.0]
    e = _softmax([z[0] * math.exp(-H[0] / tau), z[1] * math.exp(-H[1] / tau)])
    h_ent = [e[0] * a + e[1] * b for a, b in zip(*h)]
    h_imp_in = [0.5, 0.5, 0.5, 0.75 * ln2, 0.0, 0.0]

    t = lambda x: torch.tensor(x, dtype=F64)  # noqa: E731
    out = R.dual_gate(t(h), t(w_z), t(b_z), t(g_logits), tau)
    torch.testing.assert_close(out[0], t(h_ent))
    torch.testing.assert_close(out[1], t(h_imp_in))
    torch.testing.assert_close(out[2], t(e))
    torch.testing.assert_close(out[3], t([0.5, 0.75]))


def test_dual_gate_matches_formula_on_random_input():
    h, w_z, b_z, gl = _inputs(lead=(5, 2), m=3, d=37, dtype=F64)
    h_ent, h_imp_in, e, g = ops.dual_gate(h, w_z, b_z, gl, tau=0.7)
    p = torch.softmax(h, -1)
    H = -(p * p.log()).sum(-1)
    e_ref = torch.softmax(((h * w_z).sum(-1) + b_z) * torch.exp(-H / 0.7), -1)
    torch.testing.assert_close(e, e_ref)
    torch.testing.assert_close(h_ent, torch.einsum("...m,...md->...d", e_ref, h))
    torch.testing.assert_close(g, torch.sigmoid(gl))
    torch.testing.assert_close(h_imp_in, (torch.sigmoid(gl)[..., None] * h).reshape(5, 2, 3 * 37))
    assert h_ent.shape == (5, 2, 37) and h_imp_in.shape == (5, 2, 111) and e.shape == g.shape == (5, 2, 3)


def test_dual_gate_entropy_is_stable_for_peaked_inputs():
    h, w_z, b_z, gl = _inputs(lead=(3,), m=2, d=5)
    h = h * 1e4  # softmax underflows to exact zeros: p log p must read as 0, not NaN
    h.requires_grad_(True)
    out = ops.dual_gate(h, w_z, b_z, gl)
    assert all(torch.isfinite(o).all() for o in out)
    sum(o.sum() for o in out).backward()
    assert torch.isfinite(h.grad).all()


def test_dual_gate_gradcheck():
    args = [t.requires_grad_(True) for t in _inputs(lead=(2,), m=2, d=3, dtype=F64)]
    assert torch.autograd.gradcheck(lambda *a: R.dual_gate(*a, tau=1.3), args)


def test_dual_gate_bf16_close_to_fp32():
    h, w_z, b_z, gl = _inputs(lead=(6,), m=3, d=20)
    out = ops.dual_gate(h.bfloat16(), w_z.bfloat16(), b_z.bfloat16(), gl.bfloat16())
    ref = ops.dual_gate(h, w_z, b_z, gl)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("case,arg", [("h_rank", "h"), ("w_width", "w_z"), ("b_len", "b_z"),
                                      ("g_batch", "g_logits"), ("w_dtype", "w_z"), ("g_device", "g_logits"),
                                      ("tau", "tau"), ("h_int", "h")])
def test_dual_gate_bad_input(case, arg):
    h, w_z, b_z, gl = _inputs(lead=(4,), m=3, d=7)
    tau = 1.0
    if case == "h_rank":
        h = h[0, 0]
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
    with pytest.raises(ValueError, match=f"dual_gate: {arg}: expected"):
        ops.dual_gate(h, w_z, b_z, gl, tau)


def test_dual_gate_backend_and_compile():
    args = _inputs(lead=(3,), m=3, d=9)
    with pytest.raises(RuntimeError, match="dual_gate: backend 'cuda' is unavailable"):
        ops.dual_gate(*args, backend="cuda")
    ref = ops.dual_gate(*args, backend="eager")
    for a, b in zip(ops.dual_gate(*args, backend="auto"), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fn = torch.compile(lambda *a: ops.dual_gate(*a, tau=0.5), fullgraph=True)
    for a, b in zip(fn(*args), ops.dual_gate(*args, tau=0.5)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- module


def test_dual_gate_fusion_matches_spec_formula():
    mod = msa_fast.nn.DualGateFusion(11, num_modalities=3, tau=0.8, hidden=13).double()
    with torch.no_grad():
        mod.alpha.fill_(0.4)  # away from the 0 init so that both branches matter
    h = _rand(2, 5, 3, 11, dtype=F64)
    fused = mod(h)
    p = torch.softmax(h, -1)
    H = -(p * p.log()).sum(-1)
    e = torch.softmax(((h * mod.w_z).sum(-1) + mod.b_z) * torch.exp(-H / 0.8), -1)
    h_ent = (e[..., None] * h).sum(-2)
    g = torch.sigmoid(mod.importance(h.reshape(2, 5, 33)))
    h_imp = (g[..., None] * h).reshape(2, 5, 33) @ mod.W_f.weight.T + mod.W_f.bias
    a = torch.sigmoid(torch.tensor(0.4, dtype=F64))
    torch.testing.assert_close(fused, a * h_ent + (1 - a) * h_imp)
    e_last, g_last = mod.last_weights
    torch.testing.assert_close(e_last, e)
    torch.testing.assert_close(g_last, g)
    assert not e_last.requires_grad and not g_last.requires_grad


def test_dual_gate_fusion_shapes_and_backward():
    mod = msa_fast.nn.DualGateFusion(10, num_modalities=2, dropout=0.1)
    assert float(mod.alpha.detach()) == 0.0
    h = _rand(7, 2, 10, requires_grad=True)
    out = mod(h)
    assert out.shape == (7, 10)
    out.sum().backward()
    assert torch.isfinite(h.grad).all()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with pytest.raises(ValueError, match="DualGateFusion: h: expected"):
        mod(_rand(7, 3, 10))


def test_dual_gate_fusion_backend_is_passed_to_the_op():
    mod = msa_fast.nn.DualGateFusion(6, backend="cuda")
    with pytest.raises(RuntimeError, match="dual_gate: backend 'cuda'"):
        mod(_rand(2, 3, 6))


# --------------------------------------------------------------------------- #
# triton backend (interpreted on the CPU) vs the reference
# --------------------------------------------------------------------------- #


def _triton_dual_gate_inputs(shape, dtype):
    *lead, m, d = shape
    h = torch.randn(*shape, dtype=dtype)
    w_z = torch.randn(m, d, dtype=dtype) / d**0.5
    b_z = torch.randn(m, dtype=dtype)
    g_logits = torch.randn(*lead, m, dtype=dtype)
    return [t.requires_grad_() for t in (h, w_z, b_z, g_logits)]


@pytest.mark.interpret
@pytest.mark.parametrize("shape", [(1, 3, 1), (5, 3, 7), (2, 4, 3, 37), (3, 2, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dual_gate_matches_reference(shape, dtype):
    inputs = _triton_dual_gate_inputs(shape, dtype)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    out = msa_fast.ops.dual_gate(*inputs, 0.7, backend="triton")
    ref = R.dual_gate(*ref_in, 0.7)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(out, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **tol)
    # one random cotangent per output, and a stride-0 one (what out.sum().backward() hands)
    cots = [torch.randn_like(o) for o in out]
    cots[0] = torch.ones((), dtype=dtype).expand_as(out[0])
    got = torch.autograd.grad(out, inputs, cots)
    want = torch.autograd.grad(ref, ref_in, [c.double() for c in cots])
    gtol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **gtol)


@pytest.mark.interpret
def test_triton_dual_gate_non_contiguous_gradient_and_unused_outputs():
    h, w_z, b_z, g_logits = _triton_dual_gate_inputs((6, 3, 11), torch.float32)
    h_ent, h_imp, e, g = msa_fast.ops.dual_gate(h, w_z, b_z, g_logits, 1.3, backend="triton")
    cot = torch.randn(11, 6).T  # non-contiguous
    got = torch.autograd.grad(h_ent, (h, w_z, b_z, g_logits), cot)
    r_in = [t.detach().requires_grad_() for t in (h, w_z, b_z, g_logits)]
    want = torch.autograd.grad(R.dual_gate(*r_in, 1.3)[0], r_in, cot, allow_unused=True)
    assert want[3] is None  # h_ent does not depend on the importance gate
    torch.testing.assert_close(got[3], torch.zeros_like(g_logits))
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.interpret
def test_triton_dual_gate_opcheck_and_compile():
    inputs = _triton_dual_gate_inputs((4, 3, 19), torch.float32)
    torch.library.opcheck(torch.ops.msa_fast.dual_gate_triton, (*inputs, 0.5))
    fn = torch.compile(lambda *a: msa_fast.ops.dual_gate(*a, 0.5, backend="triton"), fullgraph=True)
    torch.testing.assert_close(fn(*inputs)[0], R.dual_gate(*inputs, 0.5)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
def test_dual_gate_fusion_triton_equals_eager():
    torch.manual_seed(1)
    mod = msa_fast.nn.DualGateFusion(24, num_modalities=3)
    h = torch.randn(5, 3, 24)
    with msa_fast.use_backend("eager"):
        want = mod(h)
    mod_t = msa_fast.nn.DualGateFusion(24, num_modalities=3, backend="triton")
    mod_t.load_state_dict(mod.state_dict())
    torch.testing.assert_close(mod_t(h), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_dual_gate_gpu_large(dtype):
    torch.manual_seed(0)
    inputs = [t.detach().cuda().requires_grad_() for t in _triton_dual_gate_inputs((4096, 3, 768), dtype)]
    out = msa_fast.ops.dual_gate(*inputs, 1.0, backend="triton")
    ref_in = [t.detach().float().requires_grad_() for t in inputs]
    ref = R.dual_gate(*ref_in, 1.0)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.float(), b, **tol)
    got = torch.autograd.grad(sum(o.float().sum() for o in out), inputs)
    want = torch.autograd.grad(sum(o.sum() for o in ref), ref_in)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=5e-2 if dtype == torch.bfloat16 else 1e-4, atol=5e-2 if dtype == torch.bfloat16 else 1e-3)
