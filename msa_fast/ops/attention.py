"""``attention``: scaled dot-product attention with a key padding mask (contract §3.3).

Backends: ``eager`` (:func:`msa_fast.ops.reference.attention`), ``sdpa`` (PyTorch's
``scaled_dot_product_attention``: on the CPU its flash kernel, on CUDA FlashAttention-2 /
memory-efficient / cuDNN as PyTorch picks; see :func:`_run_sdpa`), ``cpp``
(``csrc/cpu/attention.cpp``: AVX-512, one register a 16-wide head row, query blocks that
read each key row once for 8 queries, fp32; ``torch.ops.msa_fast.attention`` and
``attention_backward`` with fake kernels and autograd) and ``triton``
(``msa_fast/kernels/triton/attention.py``: flash attention, online softmax, LSE saved,
recomputing backward), registered as ``torch.ops.msa_fast.attention_triton`` with a
fake kernel and autograd.

``auto`` on the CPU follows the measured order in ``msa_fast/_auto_order.py``
(``benchmarks/ops/bench_auto.py --write-order``). Forward + backward, 1 thread, measured
with ``benchmarks/ops/bench_attention.py``: at FD-CMDIE's unaligned shape (8, 4, 875, 875,
16), last 75 keys padded, ``cpp`` 45-50 ms, ``sdpa`` 80 ms, SDPA called directly with the
mask 93-96 ms, the eager reference ~800 ms; at MOSI's aligned (32, 8, 50, 50, 16) 2.4 ms
against SDPA's 4.9 ms. ``sdpa`` drops a padded tail every batch row shares before calling
SDPA (:func:`_trim_padding`). On CUDA: ``sdpa`` before ``triton`` until
``tools/gpu_check.sh`` measures our kernel faster on a GPU (none has run it yet: PyTorch's
kernels are the safe default, contract §2's rule).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from msa_fast import _backend, _ext
from msa_fast.ops import _validate as V
from msa_fast.ops import reference


@torch.library.custom_op("msa_fast::attention_triton", mutates_args=())
def _attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from msa_fast.kernels.triton.attention import attention_forward

    return attention_forward(q, k, v, key_padding_mask, scale)


@_attention_triton.register_fake
def _(q, k, v, key_padding_mask, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("msa_fast::attention_triton_backward", mutates_args=())
def _attention_triton_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, key_padding_mask: torch.Tensor | None,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from msa_fast.kernels.triton.attention import attention_backward

    return attention_backward(do, q, k, v, out, lse, key_padding_mask, scale)


@_attention_triton_backward.register_fake
def _(do, q, k, v, out, lse, key_padding_mask, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# Autograd of both kernels that return (out, lse), the Triton and the C++ one: the same
# saved tensors, each through its own backward op.
def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.scale = scale


def _backward_through(backward_op):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = backward_op()(dout, q, k, v, out, lse, key_padding_mask, ctx.scale)
        return dq, dk, dv, None, None

    return backward


_attention_triton.register_autograd(_backward_through(lambda: _attention_triton_backward),
                                    setup_context=_setup_context)

if _ext.load()[0] is not None:
    # The C++ CPU kernel (csrc/cpu/attention.cpp): fake kernels for tracing, autograd
    # through its own backward. The schemas are in csrc/ops.cpp.
    # contiguous outputs whatever the inputs' strides, as the kernel allocates them
    @torch.library.register_fake("msa_fast::attention")
    def _attention_cpp_fake(q, k, v, key_padding_mask, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("msa_fast::attention_backward")
    def _attention_cpp_backward_fake(dout, q, k, v, out, lse, key_padding_mask, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    torch.library.register_autograd("msa_fast::attention",
                                    _backward_through(lambda: torch.ops.msa_fast.attention_backward),
                                    setup_context=_setup_context)

__all__ = ["attention"]


def _check(q, k, v, key_padding_mask, scale) -> None:
    op = "attention"
    V.tensor(op, "q", q, ndim=4, layout="(B, H, Lq, Dh)")
    b, h, _, dh = q.shape
    V.tensor(op, "k", k, shape=(b, h, None, dh), like=q, layout="(B, H, Lk, Dh)")
    V.tensor(op, "v", v, shape=k.shape, like=q, layout="(B, H, Lk, Dh) like k")
    V.mask(op, "key_padding_mask", key_padding_mask, (b, k.shape[2]), q.device)
    # No key at all (Lk = 0) has no softmax, and Dh = 0 no default scale Dh ** -0.5: both
    # are errors, not an all-masked row (which has keys, all ignored, and outputs 0).
    V.min_size(op, "k", k, 2, "Lk", "(B, H, Lk, Dh)")
    V.min_size(op, "q", q, 3, "Dh", "(B, H, Lq, Dh)")
    if scale is not None:
        V.positive_float(op, "scale", scale)


def _head_limit(q, *_args) -> str | None:
    if q.shape[-1] > 128:  # one (block, Dh) tile per operand
        return f"supports head dims up to 128, got Dh={q.shape[-1]}"
    return None


# read once, at import: under torch.compile the call would be a graph break
_CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()


def _cpp_limit(q, *_args) -> str | None:
    if _backend.is_exporting():
        # an exported graph (ONNX, AOTInductor) is run where msa_fast may not be installed:
        # it takes SDPA, which both formats know
        return "is not exported (an exported graph takes sdpa)"
    why = _head_limit(q)  # the same 128: at most 8 AVX-512 registers a head row
    if why is not None:
        return why
    if _CPU_CAPABILITY not in ("AVX512", "AVX512_BF16", "AMX"):
        return f"needs a CPU with AVX-512 (this one: {_CPU_CAPABILITY})"
    return None


def _default_scale(q, scale) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _in_fp32(run, q, k, v, key_padding_mask, scale):
    """``run`` on fp32 copies of fp16 / bf16 CPU inputs, as the reference computes them, the
    output cast back; autocast off for the call (SDPA is on the CPU autocast's bf16 list and
    would cast them straight back)."""
    dtype = q.dtype
    with torch.autocast("cpu", enabled=False):
        return run(q.float(), k.float(), v.float(), key_padding_mask, scale).to(dtype)


def _cpp_fp32(q, k, v, key_padding_mask, scale):
    return torch.ops.msa_fast.attention(q, k, v, key_padding_mask, _default_scale(q, scale))[0]


def _run_cpp(q, k, v, key_padding_mask, scale):
    """The C++ kernel, fp32 (fp16 / bf16 inputs through :func:`_in_fp32`, as for ``sdpa``)."""
    if q.dtype != torch.float32:
        return _in_fp32(_cpp_fp32, q, k, v, key_padding_mask, scale)
    return _cpp_fp32(q, k, v, key_padding_mask, scale)


def _run_sdpa(q, k, v, key_padding_mask, scale):
    """``torch.nn.functional.scaled_dot_product_attention`` with the key padding mask as its
    boolean ``attn_mask`` (True = attend, so the mask is inverted, ``(B, 1, 1, Lk)``).

    contract §3.3 wants a query whose keys are all masked to output 0 with zero gradient. Not
    every SDPA kernel promises that (the CPU one of torch 2.14 returns 0; older CUDA ones
    gave NaN), so such batch rows are unmasked -- their softmax is then finite -- and their
    output is replaced by 0 with ``torch.where``, whose gradient to the discarded branch is
    exactly 0. The guard costs one ``(B,)`` reduction and one pass over the output; it needs
    no host sync, so the op stays one graph and CUDA-graph capturable. Autograd is SDPA's own.

    dtypes: on CUDA in the input dtype (its fp16/bf16 kernels accumulate in fp32). On the
    CPU fp16/bf16 inputs are computed in fp32, as the reference does, and the output cast
    back: torch 2.14's CPU flash kernel in bf16 is 6.7x slower than in fp32 forward +
    backward at MOSI's aligned shape (96, 4, 50, 16) and no faster at 875 keys (measured),
    and it made ``--amp bf16`` training steps 2-4x slower. Autocast is off for the fp32 call
    (SDPA is on the CPU autocast's bf16 list: it would cast the inputs straight back).

    Inputs with no elements (``B``, ``H`` or ``Lq`` zero) take the reference's eager math,
    which has nothing to compute: torch 2.11's CPU SDPA dies of SIGFPE (a division by the
    zero head count) at ``H = 0`` -- the whole process, not an exception -- and the supported
    range starts at 2.11. Checked on the shape, not on the version, so a torch that still
    crashes elsewhere is covered and one that does not loses nothing.
    """
    if q.numel() == 0:
        return reference.attention(q, k, v, key_padding_mask, scale)
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        return _in_fp32(_sdpa_masked, q, k, v, key_padding_mask, scale)
    return _sdpa_masked(q, k, v, key_padding_mask, scale)


def _trim_padding(k, v, key_padding_mask):
    """Drop the trailing key columns that every batch row masks, and the mask if nothing is
    left masked -> ``(k, v, key_padding_mask or None)``.

    Why: a batch padded to a fixed length (FD-CMDIE's 875 unaligned frames) has a common
    padded tail, and SDPA spends as much on a masked key as on a live one. Dropping the
    tail is exact: those keys get softmax weight 0 and gradient 0 either way (the sliced
    views' gradients land in the full ``k``/``v`` grads as zeros), and with no key masked
    SDPA takes its unmasked path. Measured at ``(8, 4, 875, 875, 16)`` with the last 75 keys
    padded, forward + backward, 1 thread: 96 ms through the masked call, 82 ms trimmed.
    One pass over the ``(B, Lk)`` mask and a host read: CPU eager only (on CUDA the read
    would sync, and under ``torch.compile`` the length is data-dependent).
    At least one key is kept, so an all-masked batch still has a softmax to replace by 0.
    """
    live = ~key_padding_mask.all(dim=0)  # (Lk,)
    lk = live.numel()
    n = lk - int(live.flip(0).int().argmax()) if bool(live.any()) else 1
    if n < lk:
        k, v, key_padding_mask = k[:, :, :n], v[:, :, :n], key_padding_mask[:, :n]
    return k, v, (key_padding_mask if bool(key_padding_mask.any()) else None)


def _sdpa_masked(q, k, v, key_padding_mask, scale):
    if key_padding_mask is not None and q.device.type == "cpu" and not torch.compiler.is_compiling():
        k, v, key_padding_mask = _trim_padding(k, v, key_padding_mask)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    empty = key_padding_mask.all(dim=-1)  # (B,)
    keep = ~(key_padding_mask & ~empty[:, None])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], scale=scale)
    return torch.where(empty[:, None, None, None], out.new_zeros(()), out)


def _run_triton(q, k, v, key_padding_mask, scale):
    return _attention_triton(q, k, v, key_padding_mask, _default_scale(q, scale))[0]


_SPEC = _backend.declare(_backend.OpSpec(
    "attention", reference.attention, _check,
    fused=(_backend.Fused("sdpa", _run_sdpa, auto=("cpu", "cuda"), rank=0),
           _backend.Fused("cpp", _run_cpp, limit=_cpp_limit, limit_doc="Dh <= 128, AVX-512", auto=("cpu",),
                          rank=0),
           _backend.Fused("triton", _run_triton, limit=_head_limit, limit_doc="Dh <= 128", rank=1)),
))


attention = _backend.public_op(_SPEC, __name__, """``softmax(q k^T * scale) v`` over unmasked keys -> ``(B, H, Lq, Dh)``.

    ``q: (B, H, Lq, Dh)``, ``k, v: (B, H, Lk, Dh)``, ``key_padding_mask: (B, Lk)`` bool
    (True = ignore), ``scale`` (a finite float > 0) defaults to ``Dh ** -0.5``;
    ``Lk >= 1`` and ``Dh >= 1`` (``ValueError`` otherwise; ``B``, ``H``, ``Lq`` may be 0). A query with every key
    masked outputs zeros (zero gradient, never NaN); elsewhere equal to
    ``torch.nn.functional.scaled_dot_product_attention``.
    """)
