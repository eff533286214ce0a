"""DIPU (eq. 13-24) and CMDIE (contract §3.3): reference by hand, module == reference, masks, CMDIE."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msa_fast
from msa_fast import ops
from msa_fast.ops import reference as R
from msa_fast.ops.dipu import dipu_param_shapes

F64 = torch.float64


def _rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)


def _unit(d=12, heads=3, ffn=10, cross2=True, dtype=F64):
    torch.manual_seed(1)
    mod = msa_fast.nn.DIPU(d, heads, ffn, cross2=cross2).to(dtype).eval()
    with torch.no_grad():  # LayerNorm affine away from (1, 0) so that a swapped norm shows
        for name, p in mod.named_parameters():
            if name.startswith("norm"):
                p.add_(0.3 * torch.randn_like(p))
    return mod


def _mask(b, seq, p=0.3):
    m = torch.rand(b, seq) < p
    m[:, 0] = False
    return m


def test_sinusoidal_position_encoding_values():
    pe = R.sinusoidal_position_encoding(3, 5, dtype=F64)
    for pos in range(3):
        f1, f2 = 10000 ** (-2 / 5), 10000 ** (-4 / 5)
        want = [0.0, 1.0, 0.0, 1.0, 0.0] if pos == 0 else [
            math.sin(pos), math.cos(pos), math.sin(pos * f1), math.cos(pos * f1), math.sin(pos * f2)]
        torch.testing.assert_close(pe[pos], torch.tensor(want, dtype=F64))


@pytest.mark.parametrize("cross2", [True, False])
def test_dipu_hand_computed_single_tokens(cross2):
    """With one token per sequence every softmax is 1: attention returns its value row,
    so eq. 13-24 become a chain of Linear and LayerNorm written out here."""
    d = 4
    mod = _unit(d=d, heads=2, ffn=6, cross2=cross2)
    p = dict(mod.named_parameters())
    G, X = _rand(2, 1, d, dtype=F64), _rand(2, 1, d, dtype=F64)
    pe0 = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=F64)  # sin 0, cos 0, ...

    def ln(name, t):
        return F.layer_norm(t, (d,), p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)

    def lin(w, b, t):
        return t @ w.T + b

    w_in, b_in = p["cross.in_proj.weight"], p["cross.in_proj.bias"]
    w_v, b_v = w_in[2 * d:], b_in[2 * d:]  # eq. 16-17: V = input @ W_V (shared by both directions)
    out_c = lambda t: lin(p["cross.out_proj.weight"], p["cross.out_proj.bias"], t)  # noqa: E731
    G0, X0 = ln("norm_g_in", G + pe0), ln("norm_x_in", X + pe0)  # eq. 13-14
    V_X, V_G = lin(w_v, b_v, X0), lin(w_v, b_v, G0)
    G1, X1 = ln("norm_g1", out_c(V_X) + G0), ln("norm_x1", out_c(V_G) + X0)  # eq. 16-17

    def self_att(name, t):
        w, b = p[f"{name}.in_proj.weight"][2 * d:], p[f"{name}.in_proj.bias"][2 * d:]
        return lin(p[f"{name}.out_proj.weight"], p[f"{name}.out_proj.bias"], lin(w, b, t))

    G2, X2 = ln("norm_g2", self_att("self_g", G1) + G1), ln("norm_x2", self_att("self_x", X1) + X1)  # eq. 19-20
    if cross2:  # eq. 21-22: the values of eq. 16-17 (from G0 / X0), not recomputed from G2 / X2
        G3, X3 = ln("norm_g3", out_c(V_X) + G2), ln("norm_x3", out_c(V_G) + X2)
    else:
        G3, X3 = G2, X2

    def ffn(name, t):
        h = F.gelu(lin(p[f"{name}.fc1.weight"], p[f"{name}.fc1.bias"], t))
        return lin(p[f"{name}.fc2.weight"], p[f"{name}.fc2.bias"], h)

    want_g, want_x = G3 + ffn("ffn_g", G3), X3 + ffn("ffn_x", X3)  # eq. 23-24
    got_g, got_x = R.dipu(G, X, p, 2, cross2=cross2)
    torch.testing.assert_close(got_g, want_g)
    torch.testing.assert_close(got_x, want_x)


def _dipu_with_torch_mha(mod, G, X, g_mask, x_mask):
    """An independent DIPU from nn.MultiheadAttention: eq. 21-22 recompute K, V from
    G0 / X0 with the shared weights, which equals reusing those of eq. 16-17."""
    d, h = mod.d, mod.heads

    def mha(att):
        m = nn.MultiheadAttention(d, h, batch_first=True).to(G.dtype).eval()
        with torch.no_grad():
            m.in_proj_weight.copy_(att.in_proj.weight)
            m.in_proj_bias.copy_(att.in_proj.bias)
            m.out_proj.weight.copy_(att.out_proj.weight)
            m.out_proj.bias.copy_(att.out_proj.bias)
        return lambda q, kv, mask: m(q, kv, kv, key_padding_mask=mask, need_weights=False)[0]

    cross, sg, sx = mha(mod.cross), mha(mod.self_g), mha(mod.self_x)
    G = G.masked_fill(g_mask[..., None], 0)
    X = X.masked_fill(x_mask[..., None], 0)
    pe = lambda t: R.sinusoidal_position_encoding(t.shape[1], d, dtype=t.dtype)  # noqa: E731
    def ln(name, t):
        norm = getattr(mod, name)
        return nn.functional.layer_norm(t, (d,), norm.weight, norm.bias)

    def ffn(name, t):
        f = getattr(mod, name)
        return f.fc2(nn.functional.gelu(f.fc1(t)))

    G0, X0 = ln("norm_g_in", G + pe(G)), ln("norm_x_in", X + pe(X))
    G1, X1 = ln("norm_g1", cross(G0, X0, x_mask) + G0), ln("norm_x1", cross(X0, G0, g_mask) + X0)
    G2, X2 = ln("norm_g2", sg(G1, G1, g_mask) + G1), ln("norm_x2", sx(X1, X1, x_mask) + X1)
    G3, X3 = ln("norm_g3", cross(G2, X0, x_mask) + G2), ln("norm_x3", cross(X2, G0, g_mask) + X2)
    Gn, Xn = G3 + ffn("ffn_g", G3), X3 + ffn("ffn_x", X3)
    return Gn.masked_fill(g_mask[..., None], 0), Xn.masked_fill(x_mask[..., None], 0)


@pytest.mark.parametrize("lg,lx", [(5, 7), (1, 37), (6, 1)])
def test_dipu_matches_torch_multihead_attention(lg, lx):
    mod = _unit(d=12, heads=3, ffn=10)
    G, X = _rand(3, lg, 12, dtype=F64), _rand(3, lx, 12, dtype=F64)
    g_mask, x_mask = _mask(3, lg), _mask(3, lx)
    with torch.no_grad():
        want = _dipu_with_torch_mha(mod, G, X, g_mask, x_mask)
        got = R.dipu(G, X, dict(mod.named_parameters()), 3, g_mask, x_mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cross2", [True, False])
def test_dipu_module_equals_reference_and_op(cross2):
    mod = _unit(d=10, heads=2, ffn=7, cross2=cross2)
    params = dict(mod.named_parameters())
    assert {k: tuple(v.shape) for k, v in params.items()} == dipu_param_shapes(10, 7, cross2)
    assert ("norm_g3.weight" in params) == cross2
    G, X = _rand(3, 6, 10, dtype=F64), _rand(3, 9, 10, dtype=F64)
    g_mask, x_mask = _mask(3, 6), _mask(3, 9)
    x_mask[2] = True  # a missing modality: every key of X padded
    got = mod(G, X, g_mask, x_mask)
    ref = R.dipu(G, X, params, 2, g_mask, x_mask, cross2=cross2)
    op = ops.dipu(G, X, params, 2, g_mask, x_mask, cross2=cross2)
    for a, b, c in zip(got, ref, op):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(c, b)
    assert torch.equal(got[1][2], torch.zeros_like(got[1][2]))


def test_dipu_cross2_changes_the_output():
    mod = _unit(d=8, heads=2, ffn=6, cross2=True)
    params = dict(mod.named_parameters())
    G, X = _rand(2, 4, 8, dtype=F64), _rand(2, 5, 8, dtype=F64)
    with_c2 = ops.dipu(G, X, params, 2, cross2=True)
    without = ops.dipu(G, X, params, 2, cross2=False)  # a cross2=True parameter set serves the ablation
    small = msa_fast.nn.DIPU(8, 2, 6, cross2=False).double().eval()
    small.load_state_dict({k: v for k, v in mod.state_dict().items() if not k.startswith(("norm_g3", "norm_x3"))})
    for a, b, c in zip(with_c2, without, small(G, X)):
        assert (a - b).abs().max() > 1e-3
        torch.testing.assert_close(b, c)


def test_dipu_padding_never_influences_real_positions():
    mod = _unit(d=12, heads=4, ffn=9)
    G, X = _rand(2, 7, 12, dtype=F64), _rand(2, 8, 12, dtype=F64)
    g_mask, x_mask = _mask(2, 7, 0.4), _mask(2, 8, 0.4)
    g_mask[1, -2:] = True
    x_mask[0, -3:] = True
    G_n, X_n = mod(G, X, g_mask, x_mask)
    G2, X2 = G.clone(), X.clone()
    G2[g_mask] = float("nan")
    X2[x_mask] = 1e3 * torch.randn_like(X2[x_mask])
    G2_n, X2_n = mod(G2, X2, g_mask, x_mask)
    torch.testing.assert_close(G2_n, G_n)
    torch.testing.assert_close(X2_n, X_n)
    assert torch.equal(G_n[g_mask], torch.zeros_like(G_n[g_mask]))
    assert torch.equal(X_n[x_mask], torch.zeros_like(X_n[x_mask]))


def test_dipu_gradcheck():
    mod = _unit(d=4, heads=2, ffn=3)
    params = {k: v.detach() for k, v in mod.named_parameters()}
    G, X = _rand(2, 3, 4, dtype=F64, requires_grad=True), _rand(2, 2, 4, dtype=F64, requires_grad=True)
    w_in = params["cross.in_proj.weight"].clone().requires_grad_(True)
    w_ffn = params["ffn_x.fc1.weight"].clone().requires_grad_(True)
    g_mask = torch.tensor([[False, False, True], [False, False, False]])
    x_mask = torch.tensor([[False, False], [True, True]])

    def fn(g, x, a, b):
        return R.dipu(g, x, {**params, "cross.in_proj.weight": a, "ffn_x.fc1.weight": b}, 2, g_mask, x_mask)

    assert torch.autograd.gradcheck(fn, (G, X, w_in, w_ffn))


def test_dipu_bf16_close_to_fp32():
    mod = _unit(d=16, heads=2, ffn=12, dtype=torch.float32)
    params = dict(mod.named_parameters())
    G, X = _rand(2, 5, 16), _rand(2, 6, 16)
    with torch.no_grad():
        out = R.dipu(G.bfloat16(), X.bfloat16(), {k: v.bfloat16() for k, v in params.items()}, 2)
        ref = R.dipu(G, X, params, 2)
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=1e-1)


@pytest.mark.parametrize("case,arg", [
    ("G_rank", "G"), ("X_batch", "X"), ("X_width", "X"), ("X_dtype", "X"), ("X_device", "X"),
    ("heads", "heads"), ("g_mask_dtype", "g_mask"), ("x_mask_len", "x_mask"), ("missing", "params"),
    ("extra", "params"), ("param_shape", "params['self_g.in_proj.weight']"), ("not_dict", "params")])
def test_dipu_bad_input(case, arg):
    mod = _unit(d=8, heads=2, ffn=5, dtype=torch.float32)
    params = dict(mod.named_parameters())
    G, X = _rand(2, 4, 8), _rand(2, 5, 8)
    heads, g_mask, x_mask = 2, None, None
    if case == "G_rank":
        G = G[0]
    elif case == "X_batch":
        X = _rand(3, 5, 8)
    elif case == "X_width":
        X = _rand(2, 5, 6)
    elif case == "X_dtype":
        X = X.double()
    elif case == "X_device":
        X = X.to("meta")
    elif case == "heads":
        heads = 3
    elif case == "g_mask_dtype":
        g_mask = torch.zeros(2, 4, dtype=torch.uint8)
    elif case == "x_mask_len":
        x_mask = torch.zeros(2, 4, dtype=torch.bool)
    elif case == "missing":
        params.pop("norm_x2.bias")
    elif case == "extra":
        params["bogus"] = torch.zeros(8)
    elif case == "param_shape":
        params["self_g.in_proj.weight"] = _rand(24, 7)
    elif case == "not_dict":
        params = list(params.values())
    with pytest.raises(ValueError, match=f"dipu: {re.escape(arg)}: expected"):
        ops.dipu(G, X, params, heads, g_mask, x_mask)


@pytest.mark.parametrize("case,arg,what", [
    ("Lx0", "X", r"Lx >= 1 in \(B, Lx, d\), got shape \(2, 0, 8\)"),
    ("Lg0", "G", r"Lg >= 1 in \(B, Lg, d\), got shape \(2, 0, 8\)"),
    ("Lx0_masked", "X", r"Lx >= 1"),
    ("eps_inf", "eps", r"a finite float > 0, got inf"),
])
def test_dipu_empty_sequences_raise(case, arg, what):
    """contract §10: an empty sequence leaves the other's cross-attention without keys: a
    ValueError naming it (not an IndexError from the softmax)."""
    mod = _unit(d=8, heads=2, ffn=5, dtype=torch.float32)
    params = dict(mod.named_parameters())
    G, X = _rand(2, 4, 8), _rand(2, 5, 8)
    kw = {}
    if case.startswith("Lx0"):
        X = _rand(2, 0, 8)
        if case == "Lx0_masked":
            kw["x_mask"] = torch.zeros(2, 0, dtype=torch.bool)
    elif case == "Lg0":
        G = _rand(2, 0, 8)
    else:
        kw["eps"] = math.inf
    with pytest.raises(ValueError, match=f"dipu: {arg}: expected {what}"):
        ops.dipu(G, X, params, 2, **kw)


def test_dipu_fully_padded_and_empty_batch_are_fine():
    mod = _unit(d=8, heads=2, ffn=5, dtype=torch.float32)
    params = dict(mod.named_parameters())
    G, X = _rand(2, 4, 8), _rand(2, 5, 8)
    x_mask = torch.ones(2, 5, dtype=torch.bool)  # a missing modality: every position padded
    g_next, x_next = ops.dipu(G, X, params, 2, x_mask=x_mask)
    assert torch.isfinite(g_next).all() and not x_next.any()
    g0, x0 = ops.dipu(G[:0], X[:0], params, 2)
    assert g0.shape == (0, 4, 8) and x0.shape == (0, 5, 8)


def test_dipu_backend_and_compile():
    mod = _unit(d=8, heads=2, ffn=5, dtype=torch.float32)
    params = {k: v.detach() for k, v in mod.named_parameters()}
    G, X = _rand(2, 3, 8), _rand(2, 4, 8)
    x_mask = _mask(2, 4)
    with pytest.raises(RuntimeError, match="dipu: backend 'cuda' is unavailable"):
        ops.dipu(G, X, params, 2, backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        msa_fast.nn.DIPU(8, 2, 5, backend="cuda")(G, X)
    # fullgraph tracing is what this checks; inductor codegen of the ~40-op DIPU graph
    # costs 30 s on a small CPU, and each primitive op is inductor-compiled in its own test
    fn = torch.compile(lambda g, x, m: ops.dipu(g, x, params, 2, x_mask=m), fullgraph=True, backend="aot_eager")
    for a, b in zip(fn(G, X, x_mask), ops.dipu(G, X, params, 2, x_mask=x_mask)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- CMDIE


def _cmdie_inputs(b=2, lg=6, lt=5, la=9, lv=7, d=12):
    seqs = [_rand(b, n, d, dtype=F64) for n in (lg, lt, la, lv)]
    masks = [_mask(b, n) for n in (lg, lt, la, lv)]
    masks[2][1] = True  # one sample without audio
    return seqs, masks


def test_cmdie_equals_its_dipus_and_gaps():
    cm = msa_fast.nn.CMDIE(12, heads=3, layers=2, ffn_dim=16).double().eval()
    (G, T, A, Vv), (gm, tm, am, vm) = _cmdie_inputs()
    out = cm(G, T, A, Vv, gm, tm, am, vm)
    assert [o.shape for o in out] == [G.shape, T.shape, A.shape, Vv.shape]
    g, xs, ms = G, [T, A, Vv], [tm, am, vm]
    for layer in range(2):
        gs = []
        for j in range(3):
            gj, xs[j] = R.dipu(g, xs[j], cm.units[layer].unit_params(j), 3, gm, ms[j])
            gs.append(gj)
        pool = cm.pools[layer]
        g = R.gated_attention_pool(torch.stack(gs), pool.ln_w, pool.ln_b, pool.W1g, pool.b1g, pool.w2g, pool.b2g,
                                   pool.W1a, pool.b1a, pool.w2a, pool.b2a, gm)[0]
    for a, b in zip(out, [g, *xs]):
        torch.testing.assert_close(a, b)
    for o, m in zip(out, (gm, tm, am, vm)):
        assert torch.equal(o[m], torch.zeros_like(o[m]))


def test_cmdie_backward_and_switches():
    torch.manual_seed(3)
    (G, T, A, Vv), masks = _cmdie_inputs(d=8)
    G.requires_grad_(True)
    T.requires_grad_(True)
    kw = dict(heads=2, layers=2, ffn_dim=None)
    base = msa_fast.nn.CMDIE(8, **kw).double()
    assert base.units[0].ffn_dim == 32 and len(base.units) == 2 and base.units[0].groups == 3
    out = base(G, T, A, Vv, *masks)
    sum(o.sum() for o in out).backward()
    assert torch.isfinite(G.grad).all() and torch.isfinite(T.grad).all()
    for name, p in base.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        ref = base(G, T, A, Vv, *masks)[0]
        mean = msa_fast.nn.CMDIE(8, pool="mean", **kw).double()
        mean.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("pools")})
        assert (mean(G, T, A, Vv, *masks)[0] - ref).abs().max() > 1e-3
        no_c2 = msa_fast.nn.CMDIE(8, cross2=False, **kw).double()
        no_c2.load_state_dict({k: v for k, v in base.state_dict().items() if "norm_g3" not in k
                               and "norm_x3" not in k})
        assert (no_c2(G, T, A, Vv, *masks)[0] - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="CMDIE: pool: expected"):
        msa_fast.nn.CMDIE(8, 2, pool="max")
    with pytest.raises(ValueError, match="CMDIE: A_d: expected"):
        base(G, T, A[:, :, :4], Vv)


def test_cmdie_global_feature_concatenates_in_time():
    T, A, Vv = _rand(2, 3, 4), _rand(2, 5, 4), _rand(2, 2, 4)
    am = torch.tensor([[False] * 4 + [True], [False] * 5])
    G, gm = msa_fast.nn.CMDIE.global_feature(T, A, Vv, a_mask=am)
    assert torch.equal(G, torch.cat([T, A, Vv], 1))
    assert gm.dtype == torch.bool and gm.shape == (2, 10)
    assert torch.equal(gm[:, 3:8], am) and not gm[:, :3].any() and not gm[:, 8:].any()


# ----------------------------------------------------------------------------- triton fast path


@pytest.mark.interpret
def test_dipu_and_cmdie_triton_equal_eager_forward_and_backward():
    """backend="triton" swaps in the fused attention, add+LayerNorm and GAP kernels
    (interpreted here); outputs and every gradient must match the eager module."""
    torch.manual_seed(5)
    eager = msa_fast.nn.CMDIE(16, heads=2, layers=1, ffn_dim=24).eval()
    fast = msa_fast.nn.CMDIE(16, heads=2, layers=1, ffn_dim=24, backend="triton").eval()
    fast.load_state_dict(eager.state_dict())
    seqs = [_rand(2, n, 16) for n in (6, 5, 9, 7)]
    masks = [_mask(2, n) for n in (6, 5, 9, 7)]
    masks[2][1] = True  # one sample without audio: fully padded keys
    outs = []
    for mod in (eager, fast):
        inputs = [s.detach().clone().requires_grad_() for s in seqs]
        out = mod(*inputs, *masks)
        loss = sum((o * torch.linspace(-1, 1, o.shape[-1])).sum() for o in out)
        grads = torch.autograd.grad(loss, [*inputs, *mod.parameters()])
        outs.append((out, grads))
    for a, b in zip(outs[0][0], outs[1][0]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- one implementation


def _grads(fn, inputs, params):
    out = fn(*inputs, params)
    loss = sum((o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() for o in out)
    return out, torch.autograd.grad(loss, [*inputs, *params.values()], allow_unused=False)


@pytest.mark.parametrize("lg,lx,d,heads", [(1, 37, 12, 3), (37, 1, 10, 2), (6, 9, 6, 3)])
@pytest.mark.parametrize("cross2", [True, False])
def test_dipu_op_equals_reference_forward_and_every_gradient(lg, lx, d, heads, cross2):
    """ops.dipu (the composite on the dispatched ops, what nn.DIPU runs) == reference.dipu:
    odd lengths, d not a power of two, a fully padded G row and X row, fp64."""
    torch.manual_seed(lg * 100 + lx)
    mod = _unit(d=d, heads=heads, ffn=7, cross2=cross2)
    G, X = _rand(3, lg, d, dtype=F64, requires_grad=True), _rand(3, lx, d, dtype=F64, requires_grad=True)
    g_mask, x_mask = _mask(3, lg), _mask(3, lx)
    g_mask[1], x_mask[2] = True, True
    params = {k: v.detach().clone().requires_grad_() for k, v in mod.named_parameters()}
    got, g_got = _grads(lambda g, x, p: ops.dipu(g, x, p, heads, g_mask, x_mask, cross2=cross2), (G, X), params)
    want, g_want = _grads(lambda g, x, p: R.dipu(g, x, p, heads, g_mask, x_mask, cross2=cross2), (G, X), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    for name, a, b in zip(["G", "X", *params], g_got, g_want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad of {name}: {m}")
    mod_out = mod(G, X, g_mask, x_mask)
    for a, b in zip(mod_out, want):
        torch.testing.assert_close(a, b)


def test_dipu_op_gradcheck_eager():
    mod = _unit(d=6, heads=3, ffn=4)
    params = {k: v.detach() for k, v in mod.named_parameters()}
    G, X = _rand(2, 3, 6, dtype=F64, requires_grad=True), _rand(2, 1, 6, dtype=F64, requires_grad=True)
    w = params["self_x.in_proj.weight"].clone().requires_grad_(True)
    g_mask = torch.tensor([[False, True, True], [False, False, False]])
    x_mask = torch.tensor([[False], [True]])

    def fn(g, x, w_):
        return ops.dipu(g, x, {**params, "self_x.in_proj.weight": w_}, 3, g_mask, x_mask, backend="eager")

    assert torch.autograd.gradcheck(fn, (G, X, w))


def test_dipu_module_dropout_is_the_op_with_dropout_p():
    mod = msa_fast.nn.DIPU(8, 2, 6, dropout=0.4).double().train()
    G, X = _rand(2, 5, 8, dtype=F64), _rand(2, 3, 8, dtype=F64)
    torch.manual_seed(7)
    got = mod(G, X)
    torch.manual_seed(7)
    want = ops.dipu(G, X, dict(mod.named_parameters()), 2, dropout_p=0.4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert (got[0] - ops.dipu(G, X, dict(mod.named_parameters()), 2)[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="dipu: dropout_p: expected"):
        ops.dipu(G, X, dict(mod.named_parameters()), 2, dropout_p=1.5)


def test_cmdie_stacked_params_are_dipu_param_shapes():
    cm = msa_fast.nn.CMDIE(10, heads=2, layers=2, ffn_dim=7, cross2=False)
    for unit in cm.units:
        shapes = {k: tuple(v.shape) for k, v in unit.named_parameters()}
        assert shapes == {k: (3, *s) for k, s in dipu_param_shapes(10, 7, False).items()}
        one = unit.unit_params(1)
        assert {k: tuple(v.shape) for k, v in one.items()} == dipu_param_shapes(10, 7, False)
        assert one["cross.in_proj.weight"].data_ptr() == unit.cross.in_proj.weight[1].data_ptr()


@pytest.mark.parametrize("lengths,with_masks", [((5, 37, 50), True), ((9, 9, 9), False), ((1, 7, 3), False)])
@pytest.mark.parametrize("pool", ["gap", "mean"])
def test_cmdie_batched_equals_per_dipu_loop_forward_and_backward(lengths, with_masks, pool):
    """One stacked call per layer (X's padded to a common length) == the loop of
    ops.dipu per unit, fp32: outputs within 1e-5, every gradient within 1e-4."""
    torch.manual_seed(sum(lengths))
    d, B, lg = 12, 3, 11
    cm = msa_fast.nn.CMDIE(d, heads=3, layers=2, ffn_dim=20, pool=pool)
    with torch.no_grad():
        for name, p in cm.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    seqs = [_rand(B, n, d) for n in (lg, *lengths)]
    masks = [_mask(B, n) for n in (lg, *lengths)] if with_masks else [None, None, None, None]
    if with_masks:
        masks[2][1] = True  # one sample without audio
        masks[0][2, 1:] = True
    results = []
    for batched in (True, False):
        cm.batched = batched
        inputs = [s.detach().clone().requires_grad_() for s in seqs]
        out = cm(*inputs, *masks)
        loss = sum((o * torch.linspace(-1, 1, d)).sum() + o.pow(2).sum() for o in out)
        grads = torch.autograd.grad(loss, [*inputs, *cm.parameters()])
        results.append((out, grads))
    (out_b, g_b), (out_l, g_l) = results
    for a, b in zip(out_b, out_l):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    names = ["G", "T_d", "A_d", "V_d", *(n for n, _ in cm.named_parameters())]
    for name, a, b in zip(names, g_b, g_l):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"grad of {name}: {m}")
    if with_masks:
        for o, m in zip(out_b, masks):
            assert torch.equal(o[m], torch.zeros_like(o[m]))


def test_cmdie_batched_flag_and_auto_rule():
    with pytest.raises(ValueError, match="CMDIE: batched: expected True, False or 'auto'"):
        msa_fast.nn.CMDIE(8, 2, batched="yes")
    cm = msa_fast.nn.CMDIE(8, 2)
    assert cm.batched == "auto"
    assert cm.use_batched(150, [50, 50, 50])  # aligned MOSI, concatenated G
    assert cm.use_batched(50, [50, 50, 50], 8)  # up to 512 tokens per unit: batched
    assert not cm.use_batched(50, [50, 50, 50], 16)  # a large batch: the loop
    assert not cm.use_batched(925, [50, 375, 500])  # unaligned MOSI
    assert cm.use_batched(30, [9, 10, 11])
    cm.batched = True
    assert cm.use_batched(925, [50, 375, 500])
    cm.batched = False
    assert not cm.use_batched(150, [50, 50, 50])
