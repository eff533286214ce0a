"""``dipu``: one FD-CMDIE deep interaction promotion unit, eq. 13-24 (contract §3.3), functional.

One implementation: :func:`dipu_composite` runs the unit on :func:`msa_fast.ops.attention`
and :func:`msa_fast.ops.add_layer_norm` with the requested ``backend`` (so their fused
kernels speed it up; the GEMMs stay in cuBLAS / MKL). :func:`dipu` reaches it through the
one dispatch (a composite op: ``_backend.OpSpec.composite``), and the modules
:class:`msa_fast.nn.DIPU` / :class:`msa_fast.nn.CMDIE` call :func:`dipu`, one unit or --
CMDIE's three DIPUs of a layer -- ``n`` units with stacked weights in one call.
:func:`msa_fast.ops.reference.dipu` stays the executable spec the tests compare against.
There is no fused DIPU kernel: ``backend`` names the backend of the attention /
add+LayerNorm ops, and an explicit request that ``attention`` cannot serve raises
``RuntimeError`` naming ``dipu``.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from msa_fast import _backend
from msa_fast.ops import _validate as V
from msa_fast.ops import multihead as A
from msa_fast.ops import reference
from msa_fast.ops._common import sinusoidal_position_encoding

__all__ = ["dipu", "dipu_composite", "dipu_param_shapes"]


def dipu_param_shapes(d: int, ffn_dim: int, cross2: bool = True) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every DIPU parameter (the keys of ``msa_fast.nn.DIPU.named_parameters()``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    norms = ["norm_g_in", "norm_x_in", "norm_g1", "norm_x1", "norm_g2", "norm_x2"]
    if cross2:
        norms += ["norm_g3", "norm_x3"]
    for norm in norms:
        shapes[f"{norm}.weight"] = (d,)
        shapes[f"{norm}.bias"] = (d,)
    for attn in ("cross", "self_g", "self_x"):
        shapes[f"{attn}.in_proj.weight"] = (3 * d, d)
        shapes[f"{attn}.in_proj.bias"] = (3 * d,)
        shapes[f"{attn}.out_proj.weight"] = (d, d)
        shapes[f"{attn}.out_proj.bias"] = (d,)
    for ffn in ("ffn_g", "ffn_x"):
        shapes[f"{ffn}.fc1.weight"] = (ffn_dim, d)
        shapes[f"{ffn}.fc1.bias"] = (ffn_dim,)
        shapes[f"{ffn}.fc2.weight"] = (d, ffn_dim)
        shapes[f"{ffn}.fc2.bias"] = (d,)
    return shapes


def _check(G, X, params, heads, g_mask, x_mask, eps, cross2, dropout_p=0.0) -> None:
    op = "dipu"
    V.tensor(op, "G", G, ndim=(3, 4), layout="(B, Lg, d), or (n, B, Lg, d) for n stacked units")
    lead = tuple(G.shape[:-3])  # (n,) for stacked units
    b, lg, d = G.shape[-3:]
    unit = "(n, B, L, d)" if lead else "(B, L, d)"
    V.tensor(op, "X", X, shape=(*lead, b, None, d), like=G, layout=unit.replace("L", "Lx"))
    # each sequence is the other's keys: an empty one leaves the cross-attention without keys
    V.min_size(op, "G", G, -2, "Lg", unit.replace("L", "Lg"))
    V.min_size(op, "X", X, -2, "Lx", unit.replace("L", "Lx"))
    V.min_size(op, "G", G, -1, "d", unit.replace("L", "Lg"))
    V.positive_int(op, "heads", heads)
    if d % heads:
        V.fail(op, "heads", f"a divisor of d = {d}", heads)
    V.mask(op, "g_mask", g_mask, (*lead, b, lg), G.device)
    V.mask(op, "x_mask", x_mask, (*lead, b, X.shape[-2]), G.device)
    V.positive_float(op, "eps", eps)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        V.fail(op, "dropout_p", "a float in [0, 1)", repr(dropout_p))
    if not isinstance(params, dict):
        V.fail(op, "params", "a dict of tensors (dict(DIPU.named_parameters()))", type(params).__name__)
    fc1 = params.get("ffn_g.fc1.weight")
    if not isinstance(fc1, torch.Tensor) or fc1.dim() != 2 + len(lead):
        V.fail(op, "params['ffn_g.fc1.weight']", f"a tensor of shape {(*lead, 'ffn_dim', d)}", fc1)
    _check_params(params, d, bool(cross2), G, lead)


@functools.lru_cache(maxsize=64)
def _expected_params(d: int, ffn_dim: int, cross2: bool, lead: tuple) -> tuple[dict, frozenset]:
    """The checked shapes of a parameter set, and the keys a ``cross2=False`` call may also be
    given (a cross2=True set also serves the "w/o CrossAtt-2" ablation): once per layout,
    not on every forward."""
    expected = {k: (*lead, *v) for k, v in dipu_param_shapes(d, ffn_dim, cross2).items()}
    optional = frozenset(dipu_param_shapes(d, 1, True)) - frozenset(dipu_param_shapes(d, 1, False))
    return expected, optional


def _check_params(params, d: int, cross2: bool, G: torch.Tensor, lead: tuple = ()) -> None:
    op = "dipu"
    expected, optional = _expected_params(d, params["ffn_g.fc1.weight"].shape[-2], cross2, lead)
    for key in params:
        if key not in expected and not (not cross2 and key in optional):
            V.fail(op, "params", f"only the keys {sorted(expected)}", f"unexpected key {key!r}")
    # under autocast the activations are in the autocast dtype and the parameters stay fp32
    # (the GEMMs and ops cast them, as for any torch.nn module): the dtype need not match then
    autocast = torch.is_autocast_enabled(G.device.type)
    device, dtype = G.device, G.dtype
    for key, shape in expected.items():
        t = params.get(key)
        # the common case, a module's own parameters, in one comparison per tensor (the full
        # check below costs ~3 us a tensor, 80 us a call for ~26 parameters on every forward);
        # anything else takes the full check, which raises with the message or passes
        if (isinstance(t, torch.Tensor) and t.shape == shape and t.device == device
                and t.dtype in V.FLOAT_DTYPES and (autocast or t.dtype == dtype)):
            continue
        if key not in params:
            V.fail(op, "params", f"a tensor under key {key!r} of shape {shape}", "no such key")
        t = V.tensor(op, f"params[{key!r}]", t, shape=shape, like=None if autocast else G, layout=str(shape))
        if autocast and t.device != device:
            V.fail(op, f"params[{key!r}]", f"device {device} (same as the first input)", t)


def dipu_composite(G, X, params, heads, g_mask, x_mask, eps, cross2, dropout_p, backend):
    """The DIPU of :func:`msa_fast.ops.reference.dipu` on the dispatched ops, unchecked: what
    the dispatch runs for :func:`dipu`, with its arguments (the reference's, then
    ``dropout_p`` and ``backend``), all given.

    One unit: ``G (B, Lg, d)``, ``X (B, Lx, d)``, masks ``(B, L)``, ``params`` as
    :func:`dipu_param_shapes`. ``n`` units at once (CMDIE's three DIPUs of a layer):
    ``G (n, B, Lg, d)``, ``X (n, B, Lx, d)``, masks ``(n, B, L)`` and every parameter
    stacked along a new first dim (``torch.stack`` of the units' tensors); one GEMM per
    projection and one :func:`msa_fast.ops.attention` launch per attention step serve
    all ``n``. ``dropout_p > 0`` applies dropout (always, the caller passes 0 in eval
    mode) to every attention output before its residual, after the GELU of each FFN
    and to each FFN output. Computes in the input dtype (the ops take fp16 / bf16 in
    fp32 internally); under autocast the GEMMs follow autocast.
    """
    p, d = params, G.shape[-1]
    if g_mask is not None:
        G = G.masked_fill(g_mask[..., None], 0.0)
    if x_mask is not None:
        X = X.masked_fill(x_mask[..., None], 0.0)

    def drop(a: torch.Tensor) -> torch.Tensor:
        return F.dropout(a, dropout_p, True) if dropout_p > 0 else a

    def norm(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return A.add_norm(a, b, p[f"{name}.weight"], p[f"{name}.bias"], eps, backend)

    def lin(name: str, a: torch.Tensor) -> torch.Tensor:
        return A.linear(a, p[f"{name}.weight"], p[f"{name}.bias"])

    def attend(proj: str, q, k, v, key_mask) -> torch.Tensor:
        return drop(lin(f"{proj}.out_proj", A.multihead_attention(q, k, v, key_mask, heads, backend)))

    def self_attend(proj: str, a: torch.Tensor, key_mask) -> torch.Tensor:
        q, k, v = lin(f"{proj}.in_proj", a).chunk(3, dim=-1)
        return attend(proj, q, k, v, key_mask)

    def with_pe(name: str, a: torch.Tensor) -> torch.Tensor:
        pe = sinusoidal_position_encoding(a.shape[-2], d, device=a.device, dtype=a.dtype)
        return norm(name, a, pe.expand_as(a))

    G0, X0 = with_pe("norm_g_in", G), with_pe("norm_x_in", X)  # eq. 13-14
    q_g, k_g, v_g = lin("cross.in_proj", G0).chunk(3, dim=-1)
    q_x, k_x, v_x = lin("cross.in_proj", X0).chunk(3, dim=-1)
    G1 = norm("norm_g1", attend("cross", q_g, k_x, v_x, x_mask), G0)  # eq. 16
    X1 = norm("norm_x1", attend("cross", q_x, k_g, v_g, g_mask), X0)  # eq. 17
    G2 = norm("norm_g2", self_attend("self_g", G1, g_mask), G1)  # eq. 19
    X2 = norm("norm_x2", self_attend("self_x", X1, x_mask), X1)  # eq. 20
    if cross2:  # eq. 21-22: W_Q of eq. 16-17, and its keys / values reused
        w_q = p["cross.in_proj.weight"].narrow(-2, 0, d)
        b_q = p["cross.in_proj.bias"].narrow(-1, 0, d)
        G3 = norm("norm_g3", attend("cross", A.linear(G2, w_q, b_q), k_x, v_x, x_mask), G2)
        X3 = norm("norm_x3", attend("cross", A.linear(X2, w_q, b_q), k_g, v_g, g_mask), X2)
    else:
        G3, X3 = G2, X2
    G_next = G3 + drop(lin("ffn_g.fc2", drop(F.gelu(lin("ffn_g.fc1", G3)))))  # eq. 23
    X_next = X3 + drop(lin("ffn_x.fc2", drop(F.gelu(lin("ffn_x.fc1", X3)))))  # eq. 24
    if g_mask is not None:
        G_next = G_next.masked_fill(g_mask[..., None], 0.0)
    if x_mask is not None:
        X_next = X_next.masked_fill(x_mask[..., None], 0.0)
    return G_next, X_next


# No fused DIPU kernel: the composite runs on the fused attention and add+LN, whose
# backends an explicit ``backend`` must be able to serve
_SPEC = _backend.declare(_backend.OpSpec("dipu", reference.dipu, _check, autocast=None,
                                         composite=dipu_composite, composite_of="attention"))


dipu = _backend.public_op(_SPEC, __name__, """One DIPU: ``(G (B, Lg, d), X (B, Lx, d)) -> (G_next, X_next)``; ``n`` units at once
    with ``G (n, B, Lg, d)``, ``X (n, B, Lx, d)``, masks ``(n, B, L)`` and every parameter
    stacked along a new first dim.

    ``params`` = ``dict(msa_fast.nn.DIPU(d, heads, ffn_dim, cross2=cross2).named_parameters())``
    (shapes: :func:`dipu_param_shapes`). ``Lg, Lx, d >= 1`` (each sequence is the
    other's keys; an empty one is a ``ValueError``; ``B`` may be 0; a fully padded
    sequence is fine). Formulas, weight sharing and mask rules:
    :func:`msa_fast.ops.reference.dipu`; it runs :func:`dipu_composite` with ``backend``
    for the attention and add+LayerNorm ops. ``dropout_p`` (default 0: the reference's
    function) is the training dropout of :class:`msa_fast.nn.DIPU`.
    """, extra={"dropout_p": (0.0, "float")})
