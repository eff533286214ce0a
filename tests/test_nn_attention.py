"""msa_fast.nn.attention (MultiheadAttention, AddNorm, StackedLinear) against torch.nn, and the
attention blocks of AGFN and ProMMA against straightforward references."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import msa_fast
from msa_fast.models.agfn import CrossModalBlock
from msa_fast.models.promma import _SOURCES, _TARGETS, _Layer
from msa_fast.nn import AddNorm, MultiheadAttention, StackedLinear

F64 = torch.float64


def _torch_mha(d, heads, w_in, b_in, w_out, b_out):
    m = nn.MultiheadAttention(d, heads, batch_first=True).to(w_in.dtype).eval()
    with torch.no_grad():
        m.in_proj_weight.copy_(w_in)
        m.in_proj_bias.copy_(b_in)
        m.out_proj.weight.copy_(w_out)
        m.out_proj.bias.copy_(b_out)
    return lambda q, kv, mask: m(q, kv, kv, key_padding_mask=mask, need_weights=False)[0]


@pytest.mark.parametrize("lq,lk,d,heads", [(1, 37, 12, 3), (7, 1, 10, 5), (5, 5, 6, 1)])
def test_multihead_attention_equals_torch(lq, lk, d, heads):
    torch.manual_seed(lq + lk)
    mha = MultiheadAttention(d, heads).double()
    ref = _torch_mha(d, heads, mha.in_proj.weight, mha.in_proj.bias, mha.out_proj.weight, mha.out_proj.bias)
    q, kv = torch.randn(3, lq, d, dtype=F64), torch.randn(3, lk, d, dtype=F64)
    mask = torch.rand(3, lk) < 0.3
    mask[:, 0] = False
    torch.testing.assert_close(mha(q, kv, mask), ref(q, kv, mask))
    torch.testing.assert_close(mha(kv, key_padding_mask=mask), ref(kv, kv, mask))
    # a query without keys: zero attention, so the output projection's bias alone
    mask[1] = True
    out = mha(q, kv, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], mha.out_proj.bias.expand(lq, d))


def test_multihead_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="MultiheadAttention: heads: expected a divisor of d = 10, got 3"):
        MultiheadAttention(10, 3)


def test_stacked_modules_equal_their_per_group_loop_forward_and_backward():
    torch.manual_seed(0)
    n, B, L, Lk, d = 3, 2, 6, 9, 8
    mha, norm = MultiheadAttention(d, 2, groups=n).double(), AddNorm(d, groups=n).double()
    lin = StackedLinear(n, d, 5).double()
    with torch.no_grad():
        norm.weight.add_(torch.randn_like(norm.weight))
        norm.bias.add_(torch.randn_like(norm.bias))
    x = torch.randn(n, B, L, d, dtype=F64, requires_grad=True)
    kv = torch.randn(n, B, Lk, d, dtype=F64, requires_grad=True)
    mask = torch.rand(n, B, Lk) < 0.3
    mask[..., 0] = False
    mask[1, 0] = True
    params = [x, kv, *mha.parameters(), *norm.parameters(), *lin.parameters()]
    got = lin(norm(mha(x, kv, mask), x))
    want = []
    for i in range(n):
        w_in, b_in = mha.in_proj.weight[i], mha.in_proj.bias[i]
        q = F.linear(x[i], w_in[:d], b_in[:d])
        k, v = F.linear(kv[i], w_in[d:], b_in[d:]).chunk(2, -1)
        split = lambda t: t.unflatten(-1, (2, -1)).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=~mask[i][:, None, None, :])
        att = torch.where(mask[i].all(-1)[:, None, None, None], 0.0, att).transpose(1, 2).flatten(2)
        y = F.layer_norm(F.linear(att, mha.out_proj.weight[i], mha.out_proj.bias[i]) + x[i], (d,),
                         norm.weight[i], norm.bias[i])
        want.append(F.linear(y, lin.weight[i], lin.bias[i]))
    want = torch.stack(want)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.pow(2).sum(), params)
    g_want = torch.autograd.grad(want.pow(2).sum(), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_multihead_attention_under_cpu_autocast_mixes_dtypes():
    """Keys from an fp32 tensor meet bf16 queries under autocast: cast, not a dtype error."""
    mha = MultiheadAttention(8, 2)
    norm = AddNorm(8)
    x, kv = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = mha.q(x)
        k, v = kv, kv  # unprojected fp32 keys
        out = norm(mha.output(mha.attend(q, k, v)), x)
    assert q.dtype == torch.bfloat16 and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_agfn_cross_modal_block_equals_torch_reference():
    torch.manual_seed(2)
    d, heads = 12, 3
    blk = CrossModalBlock(d, heads, ffn_dim=10, dropout=0.2).double().eval()
    with torch.no_grad():
        for norm in (blk.norm1, blk.norm2):
            norm.weight.add_(torch.randn_like(norm.weight))
    x, kv = torch.randn(2, 5, d, dtype=F64), torch.randn(2, 37, d, dtype=F64)
    mask = torch.rand(2, 37) < 0.4
    mask[:, 0] = False
    a = blk.attn
    mha = _torch_mha(d, heads, a.in_proj.weight, a.in_proj.bias, a.out_proj.weight, a.out_proj.bias)
    ln1 = nn.LayerNorm(d).double()
    ln2 = nn.LayerNorm(d).double()
    ln1.load_state_dict(blk.norm1.state_dict())
    ln2.load_state_dict(blk.norm2.state_dict())
    y = ln1(mha(x, kv, mask) + x)
    want = ln2(blk.ffn(y) + y)
    torch.testing.assert_close(blk(x, kv, mask), want)


def test_promma_layer_equals_per_stream_reference():
    """ProMMA's backbone layer (no DPW, with MPDC): cross-attention of each target to each
    source (mean of the two), self-attention + prompt read-out, FFN, each with add+LN,
    written per stream with torch.nn.MultiheadAttention."""
    torch.manual_seed(3)
    d, heads, B, L, Lp = 8, 2, 2, 6, 3
    layer = _Layer(d, heads, 12, 0.0, dpw=False, connect=True, backend=None).double().eval()
    with torch.no_grad():
        for norm in (layer.norm1, layer.norm2, layer.norm3):
            norm.weight.add_(torch.randn_like(norm.weight))
    x = torch.randn(3, B, L, d, dtype=F64)
    mask = torch.rand(3, B, L) < 0.3
    mask[..., 0] = False
    shared = torch.randn(B, Lp, d, dtype=F64)
    got, _, _ = layer(x, mask, shared)

    def ln(norm, i, t):
        return F.layer_norm(t, (d,), norm.weight[i], norm.bias[i])

    c, s = layer.cross, layer.self_attn
    conn = _torch_mha(d, heads, layer.conn.in_proj.weight, layer.conn.in_proj.bias,
                      layer.conn.out_proj.weight, layer.conn.out_proj.bias)
    want = []
    for i in range(3):
        srcs = [j for t, j in zip(_TARGETS, _SOURCES) if t == i]
        outs = []
        for j in srcs:
            # target i's W_Q, source j's W_K / W_V: an in_proj made of the two
            w = torch.cat([c.in_proj.weight[i][:d], c.in_proj.weight[j][d:]])
            b = torch.cat([c.in_proj.bias[i][:d], c.in_proj.bias[j][d:]])
            m = _torch_mha(d, heads, w, b, torch.eye(d, dtype=F64), torch.zeros(d, dtype=F64))
            outs.append(m(x[i], x[j], mask[j]))
        y = ln(layer.norm1, i, F.linear((outs[0] + outs[1]) / 2, c.out_proj.weight[i], c.out_proj.bias[i]) + x[i])
        sa = _torch_mha(d, heads, s.in_proj.weight[i], s.in_proj.bias[i], s.out_proj.weight[i], s.out_proj.bias[i])
        h = sa(y, y, mask[i])
        h = h + conn(h, shared, None)
        y = ln(layer.norm2, i, h + y)
        f = F.linear(F.gelu(F.linear(y, layer.ffn1.weight[i], layer.ffn1.bias[i])), layer.ffn2.weight[i],
                     layer.ffn2.bias[i])
        want.append(ln(layer.norm3, i, f + y).masked_fill(mask[i][..., None], 0.0))
    torch.testing.assert_close(got, torch.stack(want))


def test_nn_exports():
    assert msa_fast.nn.MultiheadAttention is MultiheadAttention
    assert {"AddNorm", "MultiheadAttention", "StackedLinear"} <= set(msa_fast.nn.__all__)
