"""gated_attention_pool (contract §3.2, eq. 25-29): reference by hand, op, masks, module."""

import math

import pytest
import torch
import torch.nn.functional as F

import msa_fast
from msa_fast import ops
from msa_fast.ops import reference as R

F64 = torch.float64


def _rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _params(m=3, d=9, h=4, ha=5, dtype=torch.float32):
    """ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a: fresh random values."""
    return [1 + 0.2 * _rand(m, d, dtype=dtype), 0.2 * _rand(m, d, dtype=dtype), _rand(m, h, d, dtype=dtype),
            _rand(m, h, dtype=dtype), _rand(m, h, dtype=dtype), _rand(m, dtype=dtype), _rand(ha, d, dtype=dtype),
            _rand(ha, dtype=dtype), _rand(ha, dtype=dtype), _rand((), dtype=dtype)]


def _mask(b, seq):
    m = torch.rand(b, seq) < 0.3
    m[0, -1] = True
    m[-1, 0] = False
    return m


def test_gap_hand_computed():
    eps = 1e-5
    gelu = lambda u: 0.5 * u * (1 + math.erf(u / math.sqrt(2)))  # noqa: E731
    sig = lambda u: 1 / (1 + math.exp(-u))  # noqa: E731
    x = [[1.0, 3.0], [4.0, 0.0]]  # M=2 modalities, one position, d=2
    ln_w, ln_b = [[2.0, 1.0], [1.0, 1.0]], [[0.0, 1.0], [0.5, 0.0]]
    W1g, b1g, w2g, b2g = [[[1.0, -1.0]], [[0.5, 2.0]]], [[0.1], [-0.2]], [[1.5], [-0.7]], [0.3, 0.1]
    W1a, b1a, w2a, b2a = [[0.4, -0.3]], [0.2], [1.2], -0.5
    # LayerNorm: mean 2 / variance 1 and mean 2 / variance 4
    c0, c1 = 1 / math.sqrt(1 + eps), 2 / math.sqrt(4 + eps)
    n = [[-c0 * 2 + 0, c0 * 1 + 1], [c1 * 1 + 0.5, -c1 * 1 + 0]]
    g = [sig(w2g[m][0] * gelu(W1g[m][0][0] * n[m][0] + W1g[m][0][1] * n[m][1] + b1g[m][0]) + b2g[m])
         for m in range(2)]  # eq. 25
    y = [[g[m] * v for v in n[m]] for m in range(2)]  # eq. 26
    s = [w2a[0] * math.tanh(W1a[0][0] * y[m][0] + W1a[0][1] * y[m][1] + b1a[0]) + b2a for m in range(2)]  # eq. 27
    alpha = [math.exp(si) / sum(math.exp(sj) for sj in s) for si in s]  # eq. 28
    out = [alpha[0] * y[0][i] + alpha[1] * y[1][i] for i in range(2)]  # eq. 29

    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    res = R.gated_attention_pool(t(x)[:, None, None, :], t(ln_w), t(ln_b), t(W1g), t(b1g), t(w2g), t(b2g),
                                 t(W1a), t(b1a), t(w2a), t(b2a), eps=eps)
    torch.testing.assert_close(res[0].reshape(2), t(out))
    torch.testing.assert_close(res[1].reshape(2), t(alpha))
    torch.testing.assert_close(res[2].reshape(2), t(g))


@pytest.mark.parametrize("m,b,seq,d", [(3, 2, 37, 20), (2, 1, 1, 7), (4, 3, 5, 33)])
def test_gap_matches_per_modality_formula(m, b, seq, d):
    p = _params(m, d, h=6, ha=3, dtype=F64)
    x = _rand(m, b, seq, d, dtype=F64)
    out, alpha, g = ops.gated_attention_pool(x, *p)
    ln_w, ln_b, W1g, b1g, w2g, b2g, W1a, b1a, w2a, b2a = p
    ys, ss, gs = [], [], []
    for i in range(m):
        n = F.layer_norm(x[i], (d,), ln_w[i], ln_b[i], 1e-5)
        gi = torch.sigmoid(F.gelu(n @ W1g[i].T + b1g[i]) @ w2g[i] + b2g[i])
        y = gi[..., None] * n
        ys.append(y)
        gs.append(gi)
        ss.append(torch.tanh(y @ W1a.T + b1a) @ w2a + b2a)
    a = torch.softmax(torch.stack(ss), 0)
    torch.testing.assert_close(alpha, a)
    torch.testing.assert_close(g, torch.stack(gs))
    torch.testing.assert_close(out, (a[..., None] * torch.stack(ys)).sum(0))
    assert out.shape == (b, seq, d) and alpha.shape == g.shape == (m, b, seq)


def test_gap_padded_positions_are_zero_with_zero_grad():
    x = _rand(3, 4, 11, 10)
    mask = _mask(4, 11)
    x[:, mask] = float("nan")  # padding content must never leak
    x.requires_grad_(True)
    p = [t.requires_grad_(True) for t in _params(3, 10)]
    out, alpha, g = ops.gated_attention_pool(x, *p, mask=mask)
    assert torch.equal(out[mask], torch.zeros_like(out[mask]))
    assert torch.equal(alpha[:, mask], torch.zeros_like(alpha[:, mask]))
    assert torch.equal(g[:, mask], torch.zeros_like(g[:, mask]))
    valid = ~mask
    torch.testing.assert_close(alpha[:, valid].sum(0), torch.ones(int(valid.sum())))
    (out.sum() + alpha.sum() + g.sum()).backward()
    assert torch.equal(x.grad[:, mask], torch.zeros_like(x.grad[:, mask]))
    assert torch.isfinite(x.grad).all() and x.grad[:, valid].abs().sum() > 0
    for t in p:
        assert torch.isfinite(t.grad).all()
    # the unpadded positions are unaffected by the mask
    clean = x.detach().clone()
    clean[:, mask] = 1.0
    ref = ops.gated_attention_pool(clean, *[t.detach() for t in p])[0]
    torch.testing.assert_close(out[valid], ref[valid])


def test_gap_gradcheck():
    x = _rand(2, 2, 3, 4, dtype=F64, requires_grad=True)
    p = [t.requires_grad_(True) for t in _params(2, 4, h=3, ha=2, dtype=F64)]
    mask = torch.tensor([[False, False, True], [False, False, False]])
    assert torch.autograd.gradcheck(lambda *a: R.gated_attention_pool(*a, mask=mask), [x, *p])


def test_gap_bf16_close_to_fp32():
    p = _params(3, 16)
    x = _rand(3, 2, 5, 16)
    out = ops.gated_attention_pool(x.bfloat16(), *[t.bfloat16() for t in p])
    ref = ops.gated_attention_pool(x, *p)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("case,arg", [("x_rank", "x"), ("ln_w_m", "ln_w"), ("W1g_width", "W1g"),
                                      ("b1g_h", "b1g"), ("w2a_ha", "w2a"), ("b2a_shape", "b2a"),
                                      ("ln_b_dtype", "ln_b"), ("W1a_device", "W1a"), ("mask_dtype", "mask"),
                                      ("mask_len", "mask"), ("eps", "eps")])
def test_gap_bad_input(case, arg):
    x = _rand(3, 2, 5, 8)
    p = _params(3, 8, h=4, ha=4)
    mask, eps = None, 1e-5
    if case == "x_rank":
        x = x[0]
    elif case == "ln_w_m":
        p[0] = _rand(2, 8)
    elif case == "W1g_width":
        p[2] = _rand(3, 4, 7)
    elif case == "b1g_h":
        p[3] = _rand(3, 5)
    elif case == "w2a_ha":
        p[8] = _rand(3)
    elif case == "b2a_shape":
        p[9] = _rand(1)
    elif case == "ln_b_dtype":
        p[1] = p[1].double()
    elif case == "W1a_device":
        p[6] = p[6].to("meta")
    elif case == "mask_dtype":
        mask = torch.zeros(2, 5)
    elif case == "mask_len":
        mask = torch.zeros(2, 6, dtype=torch.bool)
    elif case == "eps":
        eps = -1.0
    with pytest.raises(ValueError, match=f"gated_attention_pool: {arg}: expected"):
        ops.gated_attention_pool(x, *p, mask=mask, eps=eps)


def test_gap_backend_and_compile():
    x, p, mask = _rand(3, 2, 5, 8), _params(3, 8), _mask(2, 5)
    with pytest.raises(RuntimeError, match="gated_attention_pool: backend 'cuda' is unavailable"):
        ops.gated_attention_pool(x, *p, backend="cuda")
    fn = torch.compile(lambda *a: ops.gated_attention_pool(*a, mask=mask), fullgraph=True)
    for a, b in zip(fn(x, *p), ops.gated_attention_pool(x, *p, mask=mask)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- module


def test_gap_module_matches_op_and_backward():
    mod = msa_fast.nn.GatedAttentionPooling(14, num_modalities=3).double()
    assert mod.W1g.shape == (3, 7, 14) and mod.W1a.shape == (7, 14) and mod.b2a.shape == ()
    x = _rand(3, 2, 9, 14, dtype=F64, requires_grad=True)
    mask = _mask(2, 9)
    out = mod(x, mask)
    assert out.shape == (2, 9, 14)
    ref, alpha, _ = R.gated_attention_pool(x, mod.ln_w, mod.ln_b, mod.W1g, mod.b1g, mod.w2g, mod.b2g,
                                           mod.W1a, mod.b1a, mod.w2a, mod.b2a, mask)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(mod.last_alpha, alpha)
    assert not mod.last_alpha.requires_grad
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, prm in mod.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
    with pytest.raises(RuntimeError, match="gated_attention_pool: backend 'cuda'"):
        msa_fast.nn.GatedAttentionPooling(14, backend="cuda")(x.float())


# --------------------------------------------------------------------------- #
# triton backend (interpreted on the CPU) vs the reference
# --------------------------------------------------------------------------- #


def _triton_gap_inputs(M, B, L, d, h, ha, dtype):
    ws = [1 + 0.2 * torch.randn(M, d), 0.2 * torch.randn(M, d), torch.randn(M, h, d) / d**0.5,
          0.2 * torch.randn(M, h), torch.randn(M, h) / h**0.5, 0.2 * torch.randn(M),
          torch.randn(ha, d) / d**0.5, 0.2 * torch.randn(ha), torch.randn(ha) / ha**0.5, 0.2 * torch.randn(())]
    x = torch.randn(M, B, L, d)
    return [t.to(dtype).requires_grad_() for t in (x, *ws)]


@pytest.mark.interpret
@pytest.mark.parametrize("M,B,L,d,h,ha", [(3, 2, 37, 24, 12, 20), (3, 1, 1, 16, 8, 8), (2, 2, 5, 33, 40, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_gap_matches_reference(M, B, L, d, h, ha, dtype, masked):
    inputs = _triton_gap_inputs(M, B, L, d, h, ha, dtype)
    mask = None
    if masked:
        mask = torch.rand(B, L) < 0.3
        mask[-1] = True  # a fully padded sequence
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    out = msa_fast.ops.gated_attention_pool(*inputs, mask=mask, backend="triton")
    want = R.gated_attention_pool(*ref_in, mask=mask)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(out, want):
        torch.testing.assert_close(a.double(), b, **tol)
    cots = [torch.randn_like(o) for o in out]
    cots[0] = torch.ones((), dtype=dtype).expand_as(out[0])
    got = torch.autograd.grad(out, inputs, cots)
    exp = torch.autograd.grad(want, ref_in, [c.double() for c in cots])
    gtol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=6e-2, atol=6e-2)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b, **gtol)


@pytest.mark.interpret
def test_triton_gap_opcheck_and_compile():
    inputs = _triton_gap_inputs(3, 2, 5, 16, 8, 8, torch.float32)
    mask = torch.rand(2, 5) < 0.3
    torch.library.opcheck(torch.ops.msa_fast.gated_attention_pool_triton, (*inputs, mask, 1e-5))
    fn = torch.compile(lambda *a: msa_fast.ops.gated_attention_pool(*a, mask=mask, backend="triton"), fullgraph=True)
    torch.testing.assert_close(fn(*inputs)[0], R.gated_attention_pool(*inputs, mask=mask)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.interpret
def test_triton_gap_rejects_wide_hidden_layers():
    inputs = _triton_gap_inputs(3, 1, 2, 16, 2049, 8, torch.float32)
    with pytest.raises(RuntimeError, match="d, h, ha <= 2048"):
        msa_fast.ops.gated_attention_pool(*inputs, backend="triton")
    # auto never fails: it falls back to the reference
    out = msa_fast.ops.gated_attention_pool(*inputs, backend="auto")
    torch.testing.assert_close(out[0], R.gated_attention_pool(*inputs)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_gap_gpu_large(dtype):
    torch.manual_seed(0)
    inputs = [t.detach().cuda().requires_grad_() for t in _triton_gap_inputs(3, 64, 500, 128, 64, 64, dtype)]
    mask = (torch.rand(64, 500, device="cuda") < 0.2)
    out = msa_fast.ops.gated_attention_pool(*inputs, mask=mask, backend="triton")
    ref_in = [t.detach().float().requires_grad_() for t in inputs]
    ref = R.gated_attention_pool(*ref_in, mask=mask)
    big = dtype == torch.bfloat16
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.float(), b, rtol=2e-2 if big else 1e-4, atol=2e-2 if big else 1e-4)
    got = torch.autograd.grad(out[0].float().sum(), inputs)
    want = torch.autograd.grad(ref[0].sum(), ref_in)
    for a, b in zip(got, want):
        # weight gradients sum over 32k positions: compare relative to their scale
        scale = b.abs().max().clamp_min(1.0)
        assert (a.float() - b).abs().max() / scale < (5e-2 if big else 1e-3)
