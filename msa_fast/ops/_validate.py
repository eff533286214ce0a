"""Input checks shared by the ops (contract §10).

Every failure is a ``ValueError`` that names the argument, what was expected and
what was received, e.g. ``dual_gate: h: expected a floating tensor of rank >= 2
(..., M, D), got shape (5,) dtype torch.float32``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _desc(t: object) -> str:
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__}"
    return f"shape {tuple(t.shape)} dtype {t.dtype} device {t.device}"


def fail(op: str, name: str, expected: str, got: object) -> None:
    raise ValueError(f"{op}: {name}: expected {expected}, got {_desc(got) if isinstance(got, torch.Tensor) else got}")


def tensor(op: str, name: str, t: object, *, ndim: int | Sequence[int] | None = None,
           min_ndim: int | None = None, shape: Sequence[int | None] | None = None,
           dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES, like: torch.Tensor | None = None,
           layout: str = "") -> torch.Tensor:
    """Check one tensor argument.

    ``shape`` entries that are ``None`` are free; ``like`` requires the same device
    (and, for floating tensors, the same dtype) as another argument.
    ``layout`` is a human description such as ``"(B, L, d)"`` used in the message.
    """
    what = f"a tensor {layout}".rstrip()
    if not isinstance(t, torch.Tensor):
        fail(op, name, what, type(t).__name__)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            fail(op, name, f"rank {' or '.join(map(str, allowed))} {layout}".rstrip(), t)
    if min_ndim is not None and t.dim() < min_ndim:
        fail(op, name, f"rank >= {min_ndim} {layout}".rstrip(), t)
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != ts for s, ts in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            fail(op, name, f"shape {want} {layout}".rstrip(), t)
    if dtypes is not None and t.dtype not in dtypes:
        fail(op, name, f"dtype in {[str(d) for d in dtypes]}", t)
    if like is not None:
        if t.device != like.device:
            fail(op, name, f"device {like.device} (same as the first input)", t)
        if t.is_floating_point() and like.is_floating_point() and t.dtype != like.dtype:
            fail(op, name, f"dtype {like.dtype} (same as the first input)", t)
    return t


def mask(op: str, name: str, m: object, shape: Sequence[int], device: torch.device) -> torch.Tensor | None:
    """An optional boolean padding mask of exactly ``shape`` (True = padding / ignore)."""
    if m is None:
        return None
    if not isinstance(m, torch.Tensor):
        fail(op, name, f"a bool tensor of shape {tuple(shape)} or None", type(m).__name__)
    if m.dtype != torch.bool:
        fail(op, name, f"dtype torch.bool of shape {tuple(shape)} (True = padding)", m)
    if tuple(m.shape) != tuple(shape):
        fail(op, name, f"shape {tuple(shape)}", m)
    if m.device != device:
        fail(op, name, f"device {device}", m)
    return m


def positive_int(op: str, name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        fail(op, name, "an int >= 1", repr(v))
    return v


def positive_float(op: str, name: str, v: object) -> float:
    """A finite float > 0 (a scale, temperature or epsilon): NaN, inf and bools are refused."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        fail(op, name, "a finite float > 0", repr(v))
    return float(v)


def min_size(op: str, name: str, t: torch.Tensor, dim: int, what: str, layout: str, minimum: int = 1) -> None:
    """``t.shape[dim] >= minimum``: ``what`` names the dimension (``"Lk"``)."""
    if t.shape[dim] < minimum:
        fail(op, name, f"{what} >= {minimum} in {layout}", t)


def choice(op: str, name: str, v: object, options: Sequence[str]) -> str:
    if v not in options:
        fail(op, name, f"one of {tuple(options)}", repr(v))
    return v  # type: ignore[return-value]


def config_int(op: str, name: str, v: object, minimum: int) -> int:
    """A model / module hyper-parameter that must be an int >= ``minimum`` (bools refused)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        fail(op, name, f"an int >= {minimum}", repr(v))
    return v


def config_float(op: str, name: str, v: object, low: float, high: float | None = None, *,
                 low_open: bool = False) -> float:
    """A hyper-parameter float in ``[low, high)`` (``(low, high)`` with ``low_open``)."""
    ok = not isinstance(v, bool) and isinstance(v, (int, float))
    if ok:
        ok = (v > low if low_open else v >= low) and (high is None or v < high)
    if not ok:
        rng = f"{'>' if low_open else '>='} {low}" + ("" if high is None else f" and < {high}")
        fail(op, name, f"a float {rng}", repr(v))
    return float(v)
