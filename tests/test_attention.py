"""attention and add_layer_norm (contract §3.3): reference, public op, validation, compile."""

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


def _kpm(b, lk, p=0.35, full_row=None):
    m = torch.rand(b, lk) < p
    m[:, 0] = False  # at least one valid key per row unless a full row is asked for
    if full_row is not None:
        m[full_row] = True
    return m


# ----------------------------------------------------------------------------- attention


def test_attention_hand_computed():
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=F64)  # (1, 1, 1, 2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=F64)
    v = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=F64)
    s0, s1 = 1 / math.sqrt(2), 0.0  # q.k / sqrt(Dh)
    p0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
    want = torch.tensor([p0 * 1 + (1 - p0) * 3, p0 * 2 + (1 - p0) * 4], dtype=F64)
    torch.testing.assert_close(R.attention(q, k, v)[0, 0, 0], want)
    # an explicit scale, and masking key 0 leaves only v[1]
    p0 = math.exp(0.5) / (math.exp(0.5) + 1)
    torch.testing.assert_close(R.attention(q, k, v, scale=0.5)[0, 0, 0],
                               torch.tensor([p0 + 3 * (1 - p0), 2 * p0 + 4 * (1 - p0)], dtype=F64))
    masked = R.attention(q, k, v, torch.tensor([[True, False]]))
    torch.testing.assert_close(masked[0, 0, 0], torch.tensor([3.0, 4.0], dtype=F64))


@pytest.mark.parametrize("b,h,lq,lk,dh", [(2, 3, 5, 7, 16), (1, 2, 1, 1, 8), (2, 1, 37, 37, 24), (3, 2, 4, 37, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_sdpa(b, h, lq, lk, dh, masked):
    q, k, v = _rand(b, h, lq, dh), _rand(b, h, lk, dh), _rand(b, h, lk, dh)
    kpm = _kpm(b, lk) if masked else None
    out = ops.attention(q, k, v, kpm)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=None if kpm is None else ~kpm[:, None, None, :])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    scale = 0.3
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=None if kpm is None else ~kpm[:, None, None, :],
                                         scale=scale)
    torch.testing.assert_close(ops.attention(q, k, v, kpm, scale), ref, rtol=1e-4, atol=1e-5)


def test_attention_gradients_match_sdpa():
    q, k, v = (_rand(2, 2, 6, 12, dtype=F64, requires_grad=True) for _ in range(3))
    k2 = _rand(2, 2, 9, 12, dtype=F64, requires_grad=True)
    v2 = _rand(2, 2, 9, 12, dtype=F64, requires_grad=True)
    kpm = _kpm(2, 9)
    go = _rand(2, 2, 6, 12, dtype=F64)
    g1 = torch.autograd.grad(ops.attention(q, k2, v2, kpm), (q, k2, v2), go)
    g2 = torch.autograd.grad(F.scaled_dot_product_attention(q, k2, v2, attn_mask=~kpm[:, None, None, :]),
                             (q, k2, v2), go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_fully_masked_rows_give_zeros_and_zero_grads():
    q = _rand(3, 2, 5, 8, requires_grad=True)
    k = _rand(3, 2, 6, 8, requires_grad=True)
    v = _rand(3, 2, 6, 8, requires_grad=True)
    kpm = _kpm(3, 6, full_row=1)
    out = ops.attention(q, k, v, kpm)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()  # a stride-0 incoming gradient
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
        assert t.grad[0].abs().sum() > 0
    # padded keys of the other rows get no gradient either
    padded_keys = k.grad.transpose(1, 2)[kpm]  # (n_padded, H, Dh)
    assert torch.equal(padded_keys, torch.zeros_like(padded_keys))


def test_attention_gradcheck():
    q = _rand(2, 2, 3, 5, dtype=F64, requires_grad=True)
    k = _rand(2, 2, 4, 5, dtype=F64, requires_grad=True)
    v = _rand(2, 2, 4, 5, dtype=F64, requires_grad=True)
    kpm = torch.tensor([[False, True, False, True], [True, True, True, True]])
    assert torch.autograd.gradcheck(lambda a, b, c: R.attention(a, b, c, kpm), (q, k, v))


def test_attention_bf16_close_to_fp32():
    q, k, v = _rand(2, 2, 7, 16), _rand(2, 2, 9, 16), _rand(2, 2, 9, 16)
    kpm = _kpm(2, 9)
    out = ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), kpm)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ops.attention(q, k, v, kpm), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case,arg", [
    ("q_rank", "q"), ("k_batch", "k"), ("k_width", "k"), ("v_len", "v"), ("k_dtype", "k"),
    ("k_device", "k"), ("mask_dtype", "key_padding_mask"), ("mask_shape", "key_padding_mask"),
    ("scale", "scale")])
def test_attention_bad_input(case, arg):
    q, k, v = _rand(2, 3, 4, 8), _rand(2, 3, 5, 8), _rand(2, 3, 5, 8)
    kw = {"key_padding_mask": None, "scale": None}
    if case == "q_rank":
        q = q[0]
    elif case == "k_batch":
        k = _rand(3, 3, 5, 8)
    elif case == "k_width":
        k = _rand(2, 3, 5, 7)
    elif case == "v_len":
        v = _rand(2, 3, 6, 8)
    elif case == "k_dtype":
        k = k.double()
    elif case == "k_device":
        k = k.to("meta")
    elif case == "mask_dtype":
        kw["key_padding_mask"] = torch.zeros(2, 5, dtype=torch.int64)
    elif case == "mask_shape":
        kw["key_padding_mask"] = torch.zeros(2, 4, dtype=torch.bool)
    elif case == "scale":
        kw["scale"] = -1.0
    with pytest.raises(ValueError, match=f"attention: {arg}: expected"):
        ops.attention(q, k, v, **kw)


_TRITON = pytest.param("triton", marks=pytest.mark.interpret)


@pytest.mark.parametrize("backend", ["eager", "sdpa", _TRITON])
@pytest.mark.parametrize("case,arg,what", [
    ("Lk0", "k", r"Lk >= 1 in \(B, H, Lk, Dh\), got shape \(2, 3, 0, 8\)"),
    ("Lk0_masked", "k", r"Lk >= 1"),
    ("Dh0", "q", r"Dh >= 1 in \(B, H, Lq, Dh\), got shape \(2, 3, 4, 0\)"),
    ("Dh0_scaled", "q", r"Dh >= 1"),
    ("scale_inf", "scale", r"a finite float > 0, got inf"),
    ("scale_nan", "scale", r"a finite float > 0, got nan"),
    ("scale_zero", "scale", r"a finite float > 0, got 0.0"),
    ("scale_bool", "scale", r"a finite float > 0, got True"),
])
def test_attention_empty_keys_heads_and_bad_scale(backend, case, arg, what):
    """contract §10: no key at all, an empty head and a non-finite scale are ValueErrors (not
    IndexError / ZeroDivisionError / NaN), on every backend."""
    q, k, v = _rand(2, 3, 4, 8), _rand(2, 3, 5, 8), _rand(2, 3, 5, 8)
    kw = {"key_padding_mask": None, "scale": None}
    if case.startswith("Lk0"):
        k, v = _rand(2, 3, 0, 8), _rand(2, 3, 0, 8)
        if case == "Lk0_masked":
            kw["key_padding_mask"] = torch.zeros(2, 0, dtype=torch.bool)
    elif case.startswith("Dh0"):
        q, k, v = _rand(2, 3, 4, 0), _rand(2, 3, 5, 0), _rand(2, 3, 5, 0)
        if case == "Dh0_scaled":
            kw["scale"] = 1.0
    else:
        kw["scale"] = {"scale_inf": math.inf, "scale_nan": math.nan, "scale_zero": 0.0, "scale_bool": True}[case]
    with pytest.raises(ValueError, match=f"attention: {arg}: expected {what}"):
        ops.attention(q, k, v, **kw, backend=backend)


@pytest.mark.parametrize("backend", ["eager", "sdpa", _TRITON])
@pytest.mark.parametrize("shape", [(0, 2, 3, 5, 8), (2, 0, 3, 5, 8), (2, 3, 0, 5, 8)])
def test_attention_empty_batch_heads_queries_are_fine(backend, shape):
    b, h, lq, lk, dh = shape
    q, k, v = (_rand(b, h, n, dh, requires_grad=True) for n in (lq, lk, lk))
    out = ops.attention(q, k, v, backend=backend)
    assert out.shape == (b, h, lq, dh)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and not k.grad.any()


def test_attention_explicit_unavailable_backend_raises():
    q = _rand(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="attention: backend 'cuda' is unavailable"):
        ops.attention(q, q, q, backend="cuda")
    torch.testing.assert_close(ops.attention(q, q, q, backend="auto"), ops.attention(q, q, q, backend="eager"))


def test_attention_compiles_fullgraph():
    q, k, v = _rand(2, 2, 3, 8), _rand(2, 2, 5, 8), _rand(2, 2, 5, 8)
    kpm = _kpm(2, 5, full_row=1)
    fn = torch.compile(lambda a, b, c, m: ops.attention(a, b, c, m), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, kpm), ops.attention(q, k, v, kpm), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- add_layer_norm


def test_add_layer_norm_hand_computed():
    x = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    r = torch.tensor([1.0, 0.0, -1.0], dtype=F64)
    w = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    b = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    eps = 1e-5
    s = [2.0, 2.0, 3.0]
    mu, var = 7 / 3, 2 / 9  # mean and biased variance of s
    want = [(si - mu) / math.sqrt(var + eps) * wi + bi for si, wi, bi in zip(s, w.tolist(), b.tolist())]
    torch.testing.assert_close(R.add_layer_norm(x, r, w, b, eps), torch.tensor(want, dtype=F64))


@pytest.mark.parametrize("shape", [(3, 37, 20), (1, 1, 7), (5, 33)])
def test_add_layer_norm_matches_torch(shape):
    x, r = _rand(*shape), _rand(*shape)
    w, b = _rand(shape[-1]), _rand(shape[-1])
    torch.testing.assert_close(ops.add_layer_norm(x, r, w, b), F.layer_norm(x + r, (shape[-1],), w, b),
                               rtol=1e-5, atol=1e-5)
    xb = ops.add_layer_norm(x.bfloat16(), r.bfloat16(), w.bfloat16(), b.bfloat16())
    assert xb.dtype == torch.bfloat16
    torch.testing.assert_close(xb.float(), F.layer_norm(x + r, (shape[-1],), w, b), rtol=2e-2, atol=3e-2)


def test_add_layer_norm_gradcheck():
    args = [_rand(2, 3, 5, dtype=F64, requires_grad=True), _rand(2, 3, 5, dtype=F64, requires_grad=True),
            _rand(5, dtype=F64, requires_grad=True), _rand(5, dtype=F64, requires_grad=True)]
    assert torch.autograd.gradcheck(R.add_layer_norm, args)


@pytest.mark.parametrize("case,arg", [("x_type", "x"), ("res_shape", "residual"), ("w_width", "weight"),
                                      ("b_dtype", "bias"), ("res_device", "residual"), ("eps", "eps")])
def test_add_layer_norm_bad_input(case, arg):
    x, r, w, b = _rand(2, 4, 6), _rand(2, 4, 6), _rand(6), _rand(6)
    eps = 1e-5
    if case == "x_type":
        x = x.tolist()
    elif case == "res_shape":
        r = _rand(2, 5, 6)
    elif case == "w_width":
        w = _rand(5)
    elif case == "b_dtype":
        b = b.double()
    elif case == "res_device":
        r = r.to("meta")
    elif case == "eps":
        eps = 0.0
    with pytest.raises(ValueError, match=f"add_layer_norm: {arg}: expected"):
        ops.add_layer_norm(x, r, w, b, eps)


def test_add_layer_norm_backend_and_compile():
    x, r, w, b = _rand(3, 7), _rand(3, 7), _rand(7), _rand(7)
    with pytest.raises(RuntimeError, match="add_layer_norm: backend 'cuda' is unavailable"):
        ops.add_layer_norm(x, r, w, b, backend="cuda")
    fn = torch.compile(lambda *a: ops.add_layer_norm(*a), fullgraph=True)
    torch.testing.assert_close(fn(x, r, w, b), ops.add_layer_norm(x, r, w, b), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# add_layer_norm: triton backend (interpreted on the CPU) vs the reference
# --------------------------------------------------------------------------- #


@pytest.mark.interpret
@pytest.mark.parametrize("shape", [(1, 1), (3, 37, 24), (2, 5, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_add_layer_norm_matches_reference(shape, dtype):
    d = shape[-1]
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    res = torch.randn(*shape, dtype=dtype, requires_grad=True)
    w = (1 + 0.2 * torch.randn(d, dtype=dtype)).requires_grad_()
    b = (0.2 * torch.randn(d, dtype=dtype)).requires_grad_()
    inputs = [x, res, w, b]
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    y = msa_fast.ops.add_layer_norm(*inputs, 1e-5, backend="triton")
    y_ref = R.add_layer_norm(*ref_in, 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    for cot in (torch.ones((), dtype=dtype).expand_as(y), torch.randn(*reversed(shape), dtype=dtype).permute(*reversed(range(len(shape))))):
        got = torch.autograd.grad(y, inputs, cot, retain_graph=True)
        want = torch.autograd.grad(y_ref, ref_in, cot.double(), retain_graph=True)
        gtol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
        for a, c in zip(got, want):
            torch.testing.assert_close(a.double(), c, **gtol)


@pytest.mark.interpret
def test_triton_add_layer_norm_opcheck_and_compile():
    x, r = torch.randn(2, 7, 24, requires_grad=True), torch.randn(2, 7, 24, requires_grad=True)
    w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    torch.library.opcheck(torch.ops.msa_fast.add_layer_norm_triton, (x, r, w, b, 1e-5))
    fn = torch.compile(lambda *a: msa_fast.ops.add_layer_norm(*a, backend="triton"), fullgraph=True)
    torch.testing.assert_close(fn(x, r, w, b), R.add_layer_norm(x, r, w, b), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# attention: sdpa backend (PyTorch's scaled_dot_product_attention) vs the reference
# --------------------------------------------------------------------------- #


def _matches_fp64_reference(q, k, v, mask, backend, cot, tol, gtol):
    """``backend``'s output and its q/k/v gradients (for the cotangent ``cot``) against the
    reference in fp64, within ``tol`` / ``gtol`` = (rtol, atol); finite gradients."""
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = ops.attention(q, k, v, mask, backend=backend)
    want = R.attention(*ref_in, mask)
    torch.testing.assert_close(out.double(), want, rtol=tol[0], atol=tol[1])
    got = torch.autograd.grad(out, (q, k, v), cot)
    for a, b in zip(got, torch.autograd.grad(want, ref_in, cot.double())):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=gtol[0], atol=gtol[1])
    return out, got


def test_auto_attention_on_cpu_is_cpp_then_sdpa():
    """The measured CPU chain: our C++ kernel, then SDPA (beyond the kernel's head width, or
    where it cannot run), then eager; on CUDA SDPA until a GPU measures triton."""
    from msa_fast import _backend

    assert _backend.AUTO_ORDER[("attention", "cpu")] == ("cpp", "sdpa", "eager")
    assert _backend.AUTO_ORDER[("attention", "cuda")][0] == "sdpa"  # until a GPU measures triton
    q = _rand(1, 1, 3, 4)
    want = "cpp" if _cpp_attention_reason() is None else "sdpa"
    assert _backend.choose(_backend.SPECS["attention"], (q, q, q, None, None), "auto").backend == want
    wide = _rand(1, 1, 3, 144)  # past the kernel's 128: SDPA
    assert _backend.choose(_backend.SPECS["attention"], (wide, wide, wide, None, None), "auto").backend == "sdpa"
    # fp64 is not a fused dtype: auto runs it on the reference, an explicit sdpa says why
    assert _backend.choose(_backend.SPECS["attention"], (q.double(),) * 3 + (None, None), "auto") is None
    with pytest.raises(ValueError, match="backend 'sdpa' takes dtypes"):
        ops.attention(q.double(), q.double(), q.double(), backend="sdpa")


@pytest.mark.parametrize("B,H,Lq,Lk,Dh", [(1, 1, 1, 1, 16), (2, 2, 37, 5, 24), (3, 2, 4, 37, 5), (2, 1, 40, 37, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", ["none", "some", "full_row"])
def test_sdpa_attention_matches_reference(B, H, Lq, Lk, Dh, dtype, masked):
    torch.manual_seed(B * 1000 + Lq * 10 + Lk)
    q = torch.randn(B, H, Lq, Dh, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, Lk, Dh, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, Lk, Dh, dtype=dtype, requires_grad=True)
    mask = None if masked == "none" else _kpm(B, Lk, full_row=0 if masked == "full_row" else None)
    fp32 = dtype == torch.float32
    out, got = _matches_fp64_reference(q, k, v, mask, "sdpa", torch.randn(B, H, Lq, Dh, dtype=dtype),
                                       (1e-5, 1e-5) if fp32 else (2e-2, 2e-2), (1e-4, 1e-5) if fp32 else (5e-2, 5e-2))
    assert out.dtype == dtype
    if masked == "full_row":
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        for g in got:
            assert torch.equal(g[0], torch.zeros_like(g[0]))


def test_sdpa_attention_fully_masked_rows_with_every_kernel():
    """The zero-output guard does not rely on the kernel: with SDPA's math kernel forced (which
    would otherwise give NaN on an all-masked row in older releases) the row is still 0."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (_rand(3, 2, n, 8, requires_grad=True) for n in (5, 6, 6))
    kpm = _kpm(3, 6, full_row=1)
    for kernel in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(kernel):
            out = ops.attention(q, k, v, kpm, backend="sdpa")
            out.sum().backward()
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        for t in (q, k, v):
            assert torch.isfinite(t.grad).all() and torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
            t.grad = None


def test_sdpa_attention_non_contiguous_inputs_and_stride0_gradient():
    q = torch.randn(2, 9, 3, 16).transpose(1, 2).requires_grad_()  # (B, H, L, Dh) strided
    k = torch.randn(2, 3, 11, 16, requires_grad=True)
    v = torch.randn(2, 3, 11, 16, requires_grad=True)
    kpm = _kpm(2, 11)
    out = ops.attention(q, k, v, kpm, 0.3, backend="sdpa")
    want = R.attention(q, k, v, kpm, 0.3)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    cot = torch.ones(()).expand_as(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(want, (q, k, v), cot)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sdpa_attention_compiles_fullgraph_and_backward():
    q, k, v = (_rand(2, 2, n, 8, requires_grad=True) for n in (3, 5, 5))
    kpm = _kpm(2, 5, full_row=1)
    fn = torch.compile(lambda a, b, c, m: ops.attention(a, b, c, m, backend="sdpa"), fullgraph=True)
    out = fn(q, k, v, kpm)
    torch.testing.assert_close(out, R.attention(q, k, v, kpm), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1])) and torch.isfinite(k.grad).all()


def test_sdpa_attention_at_fd_cmdie_unaligned_shape_has_no_nan():
    """FD-CMDIE's unaligned CMDIE shape (the last 75 of 875 keys padded, one sequence empty):
    equal to the reference forward and backward, nothing NaN."""
    torch.manual_seed(0)
    q, k, v = (_rand(2, 4, 875, 16, requires_grad=True) for _ in range(3))
    kpm = torch.zeros(2, 875, dtype=torch.bool)
    kpm[0, 800:] = True
    kpm[1] = True
    out = ops.attention(q, k, v, kpm)  # auto: cpp, or sdpa on a CPU without AVX-512
    want = R.attention(q, k, v, kpm)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(want, (q, k, v), go)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- #
# attention: triton backend (interpreted on the CPU) vs the reference
# --------------------------------------------------------------------------- #


@pytest.mark.interpret
@pytest.mark.parametrize("B,H,Lq,Lk,Dh", [(1, 1, 1, 1, 16), (2, 2, 37, 5, 24), (1, 2, 3, 70, 64), (2, 1, 40, 37, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_attention_matches_reference(B, H, Lq, Lk, Dh, dtype):
    q = torch.randn(B, H, Lq, Dh, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, Lk, Dh, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, Lk, Dh, dtype=dtype, requires_grad=True)
    mask = torch.rand(B, Lk) < 0.3
    mask[0] = True  # a sequence whose keys are all padding: its queries output zeros
    fp32 = dtype == torch.float32
    out, got = _matches_fp64_reference(q, k, v, mask, "triton", torch.ones((), dtype=dtype).expand(B, H, Lq, Dh),
                                       (1e-4, 1e-5) if fp32 else (2e-2, 2e-2), (1e-4, 1e-4) if fp32 else (5e-2, 5e-2))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(got[0][0], torch.zeros_like(got[0][0]))


@pytest.mark.interpret
def test_triton_attention_non_contiguous_inputs_and_gradient():
    q = torch.randn(2, 9, 3, 16).transpose(1, 2).requires_grad_()  # (B, H, L, Dh) strided
    k = torch.randn(2, 3, 11, 16, requires_grad=True)
    v = torch.randn(2, 3, 11, 16, requires_grad=True)
    out = msa_fast.ops.attention(q, k, v, None, 0.3, backend="triton")
    want = R.attention(q, k, v, None, 0.3)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    cot = torch.randn(2, 3, 16, 9).transpose(-1, -2)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(want, (q, k, v), cot)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.interpret
def test_triton_attention_opcheck_and_compile():
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (5, 7, 7))
    mask = torch.tensor([[False, False, True, False, True, True, False]])
    torch.library.opcheck(torch.ops.msa_fast.attention_triton, (q, k, v, mask, 0.25))
    fn = torch.compile(lambda *a: msa_fast.ops.attention(*a, backend="triton"), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, mask), R.attention(q, k, v, mask), rtol=1e-4, atol=1e-5)


@pytest.mark.interpret
def test_triton_attention_head_dim_limit():
    q = k = v = torch.randn(1, 1, 3, 136)
    with pytest.raises(RuntimeError, match="head dims up to 128"):
        msa_fast.ops.attention(q, k, v, backend="triton")
    torch.testing.assert_close(msa_fast.ops.attention(q, k, v, backend="auto"), R.attention(q, k, v))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("Dh", [32, 64, 128])
def test_triton_attention_gpu_large_matches_sdpa(dtype, Dh):
    torch.manual_seed(0)
    B, H, Lq, Lk = 8, 4, 500, 373
    q, k, v = (torch.randn(B, H, n, Dh, device="cuda", dtype=dtype, requires_grad=True) for n in (Lq, Lk, Lk))
    mask = torch.rand(B, Lk, device="cuda") < 0.3
    out = msa_fast.ops.attention(q, k, v, mask, backend="triton")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=(~mask)[:, None, None, :])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    cot = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), cot)
    want = torch.autograd.grad(ref, (q, k, v), cot.float())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **({**tol, "atol": tol["atol"] * 5}))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_add_layer_norm_gpu_large(dtype):
    x, r = (torch.randn(256, 500, 768, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    w = torch.randn(768, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(768, device="cuda", dtype=dtype, requires_grad=True)
    y = msa_fast.ops.add_layer_norm(x, r, w, b, backend="triton")
    ref_in = [t.detach().float().requires_grad_() for t in (x, r, w, b)]
    ref = R.add_layer_norm(*ref_in)
    big = dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2e-2 if big else 1e-5, atol=5e-2 if big else 1e-4)
    got = torch.autograd.grad(y.float().sum(), (x, r, w, b))
    want = torch.autograd.grad(ref.sum(), ref_in)
    for a, c in zip(got, want):
        scale = c.abs().max().clamp_min(1.0)
        assert (a.float() - c).abs().max() / scale < (5e-2 if big else 1e-3)


@pytest.mark.parametrize("pattern", ["common_tail", "tail_and_row", "no_padding", "all_masked", "holes"])
def test_sdpa_attention_trims_the_common_padded_tail_exactly(pattern):
    """The CPU path drops key columns every row masks (and the mask when none is left): the
    result and every gradient equal the reference, and the dropped keys' gradients are 0."""
    from msa_fast.ops.attention import _trim_padding

    torch.manual_seed(7)
    B, Lk = 3, 12
    q, k, v = (_rand(B, 2, n, 8, requires_grad=True) for n in (5, Lk, Lk))
    kpm = torch.zeros(B, Lk, dtype=torch.bool)
    kept = {"common_tail": 9, "tail_and_row": 9, "no_padding": Lk, "all_masked": 1, "holes": 10}[pattern]
    if pattern == "all_masked":
        kpm[:] = True
    elif pattern == "holes":  # masked columns inside the live range stay, the mask with them
        kpm[:, 10:] = True
        kpm[:, 2] = True
    elif pattern != "no_padding":
        kpm[:, 9:] = True
        if pattern == "tail_and_row":
            kpm[1, 4:] = True
    tk, _, tm = _trim_padding(k, v, kpm)
    assert tk.shape[2] == kept
    assert (tm is None) == (pattern in ("common_tail", "no_padding"))
    cot = torch.randn(B, 2, 5, 8)
    out, (dq, dk, dv) = _matches_fp64_reference(q, k, v, kpm, "sdpa", cot, (1e-5, 1e-5), (1e-4, 1e-5))
    assert torch.equal(dk[:, :, kept:], torch.zeros_like(dk[:, :, kept:]))
    assert torch.equal(dv[:, :, kept:], torch.zeros_like(dv[:, :, kept:]))
    if pattern == "all_masked":
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dq, torch.zeros_like(dq))


# --------------------------------------------------------------------------- #
# attention: cpp backend (csrc/cpu/attention.cpp) vs the reference
# --------------------------------------------------------------------------- #

def _cpp_attention_reason():
    from msa_fast import _backend
    from msa_fast.ops.attention import _cpp_limit

    return _backend.unavailable_reason("attention", "cpp", torch.device("cpu")) or _cpp_limit(torch.empty(1, 1, 1, 16))


needs_cpp_attention = pytest.mark.skipif(_cpp_attention_reason() is not None,
                                         reason=str(_cpp_attention_reason()))


@needs_cpp_attention
@pytest.mark.parametrize("B,H,Lq,Lk,Dh", [(1, 1, 1, 1, 16), (2, 2, 37, 5, 24), (3, 2, 9, 37, 5), (2, 1, 40, 37, 8),
                                          (2, 3, 17, 33, 16), (1, 2, 11, 70, 33), (2, 1, 6, 19, 64), (1, 1, 5, 21, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", ["none", "some", "full_row", "tail"])
def test_cpp_attention_matches_reference(B, H, Lq, Lk, Dh, dtype, masked):
    """Every head width 1-128 (1-8 registers a row, the last one partial), query counts
    on and off the 8 / 4 / 2-query blocks, and masks with holes, a padded tail common to
    all rows and an all-masked row, forward and backward against the fp64 reference."""
    torch.manual_seed(B * 1000 + Lq * 10 + Lk + Dh)
    q = torch.randn(B, H, Lq, Dh, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, Lk, Dh, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, Lk, Dh, dtype=dtype, requires_grad=True)
    if masked == "none":
        mask = None
    elif masked == "tail":
        mask = torch.zeros(B, Lk, dtype=torch.bool)
        mask[:, Lk - Lk // 3:] = True
        mask[:, 0] = False
    else:
        mask = _kpm(B, Lk, full_row=0 if masked == "full_row" else None)
    fp32 = dtype == torch.float32
    out, got = _matches_fp64_reference(q, k, v, mask, "cpp", torch.randn(B, H, Lq, Dh, dtype=dtype),
                                       (1e-5, 1e-5) if fp32 else (2e-2, 2e-2), (1e-4, 1e-5) if fp32 else (5e-2, 5e-2))
    assert out.dtype == dtype
    if mask is not None:  # a masked key gets exactly zero gradient
        dead = mask[:, None, :, None].expand_as(got[1])
        assert torch.equal(got[1][dead], torch.zeros_like(got[1][dead]))
        assert torch.equal(got[2][dead], torch.zeros_like(got[2][dead]))
    if masked == "full_row":
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        for g in got:
            assert torch.equal(g[0], torch.zeros_like(g[0]))


@needs_cpp_attention
def test_cpp_attention_fd_cmdie_shape_strided_inputs_and_stride0_gradient():
    """FD-CMDIE's unaligned shape (875 keys, the last 75 padded, one sequence empty) with a
    (B, L, H, Dh) view as q and the expanded cotangent of ``out.sum()``: equal to the
    reference, nothing NaN."""
    torch.manual_seed(3)
    q = torch.randn(2, 875, 4, 16).transpose(1, 2).requires_grad_()
    k, v = (_rand(2, 4, 875, 16, requires_grad=True) for _ in range(2))
    kpm = torch.zeros(2, 875, dtype=torch.bool)
    kpm[0, 800:] = True
    kpm[1] = True
    out = ops.attention(q, k, v, kpm, backend="cpp")
    want = R.attention(q, k, v, kpm)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    cot = torch.ones(()).expand_as(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), cot), torch.autograd.grad(want, (q, k, v), cot)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_cpp_attention
def test_cpp_attention_opcheck_compile_and_limits():
    q, k, v = (_rand(2, 2, n, 16, requires_grad=True) for n in (3, 5, 5))
    kpm = _kpm(2, 5, full_row=1)
    strided = torch.randn(2, 3, 2, 16).transpose(1, 2).requires_grad_()  # (B, H, L, Dh) view
    for mask in (kpm, None):
        torch.library.opcheck(torch.ops.msa_fast.attention.default, (q, k, v, mask, 0.3))
        torch.library.opcheck(torch.ops.msa_fast.attention.default, (strided, k, v, mask, 0.3))
    fn = torch.compile(lambda a, b, c, m: ops.attention(a, b, c, m, backend="cpp"), fullgraph=True)
    out = fn(q, k, v, kpm)
    torch.testing.assert_close(out, R.attention(q, k, v, kpm), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1])) and torch.isfinite(k.grad).all()
    # empty batch / heads / queries: empty outputs, zero key gradients
    for shape in ((0, 2, 3, 16), (2, 0, 3, 16), (2, 2, 0, 16)):
        qe = torch.zeros(shape, requires_grad=True)
        ke = torch.randn(shape[0], shape[1], 4, 16, requires_grad=True)
        oe = ops.attention(qe, ke, ke, backend="cpp")
        assert oe.shape == shape
        oe.sum().backward()
        assert torch.equal(ke.grad, torch.zeros_like(ke.grad))
    with pytest.raises(RuntimeError, match="head dims up to 128"):
        ops.attention(_rand(1, 1, 2, 129), _rand(1, 1, 2, 129), _rand(1, 1, 2, 129), backend="cpp")


@needs_cpp_attention
def test_cpp_attention_declines_inside_msa_fast_exports_and_torch_export():
    """An exported graph is run where msa_fast may not be installed: inside msa_fast's own
    exports (and, on torch >= 2.14, any torch.export) auto takes sdpa, and a plain
    torch.compile still takes the kernel."""
    from msa_fast import _backend

    q = _rand(1, 2, 3, 16)
    spec = _backend.SPECS["attention"]
    assert _backend.choose(spec, (q, q, q, None, None), "auto").backend == "cpp"
    with _backend.exporting():
        assert _backend.choose(spec, (q, q, q, None, None), "auto").backend == "sdpa"
    assert not _backend.is_exporting()

    class M(torch.nn.Module):
        def forward(self, a):
            return ops.attention(a, a, a)

    graph = str(torch.export.export(M(), (q,)).graph)
    assert "msa_fast.attention" not in graph and "scaled_dot_product" in graph
    seen = []

    def record(gm, _inputs):
        seen.append(str(gm.graph))
        return gm

    compiled = torch.compile(lambda a: ops.attention(a, a, a), fullgraph=True, backend=record)
    torch.testing.assert_close(compiled(q), R.attention(q, q, q), rtol=1e-5, atol=1e-6)
    assert "msa_fast.attention" in seen[0]
