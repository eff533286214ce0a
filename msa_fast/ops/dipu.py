"""``dipu``: one FD-CMDIE deep interaction promotion unit, eq. 13-24 (SPEC 3.3), functional.

Backends: ``eager`` (:func:`msa_fast.ops.reference.dipu`). A fused DIPU would
register itself when it lands; until then an explicit ``triton`` / ``cpp`` /
``cuda`` request raises ``RuntimeError`` and ``auto`` runs eager. The module
:class:`msa_fast.nn.DIPU` is built from :func:`msa_fast.ops.attention` and
:func:`msa_fast.ops.add_layer_norm`, so their fast paths speed it up already.
"""

from __future__ import annotations

import torch

from msa_fast import _backend
from msa_fast.ops import _validate as V
from msa_fast.ops import reference

__all__ = ["dipu", "dipu_param_shapes"]


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


def _check(G, X, params, heads, g_mask, x_mask, eps, cross2) -> None:
    op = "dipu"
    V.tensor(op, "G", G, ndim=3, layout="(B, Lg, d)")
    b, lg, d = G.shape
    V.tensor(op, "X", X, shape=(b, None, d), like=G, layout="(B, Lx, d)")
    # each sequence is the other's keys: an empty one leaves the cross-attention without keys
    V.min_size(op, "G", G, 1, "Lg", "(B, Lg, d)")
    V.min_size(op, "X", X, 1, "Lx", "(B, Lx, d)")
    V.min_size(op, "G", G, 2, "d", "(B, Lg, d)")
    V.positive_int(op, "heads", heads)
    if d % heads:
        V.fail(op, "heads", f"a divisor of d = {d}", heads)
    V.mask(op, "g_mask", g_mask, (b, lg), G.device)
    V.mask(op, "x_mask", x_mask, (b, X.shape[1]), G.device)
    V.positive_float(op, "eps", eps)
    if not isinstance(params, dict):
        V.fail(op, "params", "a dict of tensors (dict(DIPU.named_parameters()))", type(params).__name__)
    fc1 = params.get("ffn_g.fc1.weight")
    if not isinstance(fc1, torch.Tensor) or fc1.dim() != 2:
        V.fail(op, "params['ffn_g.fc1.weight']", "a tensor of shape (ffn_dim, d)", fc1)
    _check_params(params, G.shape[-1], bool(cross2), G)


def _check_params(params, d: int, cross2: bool, G: torch.Tensor) -> None:
    op = "dipu"
    expected = dipu_param_shapes(d, params["ffn_g.fc1.weight"].shape[0], cross2)
    # a cross2=True parameter set also serves the "w/o CrossAtt-2" ablation
    optional = set(dipu_param_shapes(d, 1, True)) - set(dipu_param_shapes(d, 1, False))
    for key in params:
        if key not in expected and not (not cross2 and key in optional):
            V.fail(op, "params", f"only the keys {sorted(expected)}", f"unexpected key {key!r}")
    for key, shape in expected.items():
        if key not in params:
            V.fail(op, "params", f"a tensor under key {key!r} of shape {shape}", "no such key")
        V.tensor(op, f"params[{key!r}]", params[key], shape=shape, like=G, layout=str(shape))


# No fused DIPU: the module msa_fast.nn.DIPU runs on the fused attention, add+LN and GAP.
_SPEC = _backend.declare(_backend.OpSpec("dipu", reference.dipu, _check, autocast=None))


def dipu(
    G: torch.Tensor,
    X: torch.Tensor,
    params: dict[str, torch.Tensor],
    heads: int,
    g_mask: torch.Tensor | None = None,
    x_mask: torch.Tensor | None = None,
    eps: float = 1e-5,
    cross2: bool = True,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DIPU, dropout-free: ``(G (B, Lg, d), X (B, Lx, d)) -> (G_next, X_next)``.

    ``params`` = ``dict(msa_fast.nn.DIPU(d, heads, ffn_dim, cross2=cross2).named_parameters())``
    (shapes: :func:`dipu_param_shapes`). ``Lg, Lx, d >= 1`` (each sequence is the
    other's keys; an empty one is a ``ValueError``; ``B`` may be 0; a fully padded
    sequence is fine). Formulas, weight sharing and mask rules:
    :func:`msa_fast.ops.reference.dipu`.
    """
    return _backend.dispatch(_SPEC, (G, X, params, heads, g_mask, x_mask, eps, bool(cross2)), backend)
