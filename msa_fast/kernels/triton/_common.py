"""Shared pieces of the Triton kernels: 64-bit program ids and the launch device guard.

``pid64(axis)``: ``tl.program_id(axis)`` widened to int64. A program id is int32, and so
is every product built from it and an int32 shape argument (``row * D``, ``r * M * D``,
``m * R * D``, ``bh * Lq * Dh``): past 2**31 elements such an offset wraps and the kernel
reads or writes the wrong memory. Starting every offset from an int64 id keeps the whole
product in int64 (Triton promotes ``int64 * int32`` to int64). Every kernel takes its ids
from here, so the behaviour is tested once (``tests/test_triton_interpreter.py``).

``on_tensor_device``: the host wrappers launch on the current CUDA device, which is not
necessarily the device of their tensors (a model on ``cuda:1`` called from a thread whose
current device is ``cuda:0``); the decorator runs the wrapper under
``torch.cuda.device(t.device)`` of its first tensor argument. On CPU tensors (the
interpreter) it is a no-op.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl


@triton.jit
def pid64(axis: tl.constexpr):
    """``tl.program_id(axis)`` as int64, so offsets computed from it do not wrap at 2**31."""
    return tl.program_id(axis).to(tl.int64)


def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor, else a null context."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_tensor_device(fn):
    """Run ``fn`` (a host wrapper that launches kernels) on the device of its first tensor argument."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)

    return wrapper
