"""Triton kernels of ``add_layer_norm`` (contract §3.3): ``y = LayerNorm(x + residual)``.

Shapes (rows flattened): ``x, residual: (R, d)``, ``weight, bias: (d,)``. Per row::

    s    = x + residual
    mu   = s[0] + mean(s - s[0]),  rstd = 1 / sqrt(mean((s - mu)^2) + eps)
    y    = (s - mu) * rstd * weight + bias

Numerics: statistics in fp32 whatever the storage dtype (biased variance, as
``torch.nn.LayerNorm``); ``mean`` and ``rstd`` are saved (``(R,)`` fp32 each); the backward
re-reads ``x`` and ``residual`` rather than storing their sum (one less write of
``(R, d)`` in the forward) but does not recompute the reductions. The backward::

    xhat = (s - mu) * rstd,  gy = dy * weight
    ds   = rstd * (gy - mean(gy) - xhat * mean(gy * xhat))      (= dx = dresidual)
    dweight = sum_rows dy * xhat,  dbias = sum_rows dy

with the weight/bias sums accumulated over ``ROWS`` rows per program in fp32 and
written as one partial per program (no atomics, deterministic), summed after.
``dy`` is read through its strides (stride-0 from ``out.sum().backward()``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa_fast.kernels.triton._common import on_tensor_device, pid64


@triton.jit
def add_layer_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    R, D, eps,
    ROWS: tl.constexpr, D_P: tl.constexpr,
):
    pid = pid64(0)
    offs = tl.arange(0, D_P)
    ok = offs < D
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < R:
            s = tl.load(x_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
            s += tl.load(r_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
            # shifted by the row's first entry: a constant row gets mu exactly (diff 0, y = bias
            # as in torch), where sum / D would leave an ulp that rstd ~ 1/sqrt(eps) amplifies
            shift = tl.sum(tl.where(offs == 0, s, 0.0), axis=0)
            mu = shift + tl.sum(tl.where(ok, s - shift, 0.0), axis=0) / D
            diff = tl.where(ok, s - mu, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / D + eps)
            y = diff * rstd * w + b
            tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
            tl.store(mean_ptr + row, mu)
            tl.store(rstd_ptr + row, rstd)


@triton.jit
def add_layer_norm_bwd_kernel(
    x_ptr, r_ptr, w_ptr, mean_ptr, rstd_ptr,
    dy_ptr, s_dy_r, s_dy_d,
    ds_ptr, dw_part_ptr, db_part_ptr,
    R, D,
    ROWS: tl.constexpr, D_P: tl.constexpr,
):
    pid = pid64(0)
    offs = tl.arange(0, D_P)
    ok = offs < D
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros((D_P,), dtype=tl.float32)
    db = tl.zeros((D_P,), dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < R:
            s = tl.load(x_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
            s += tl.load(r_ptr + row * D + offs, mask=ok, other=0.0).to(tl.float32)
            mu = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(ok, (s - mu) * rstd, 0.0)
            dy = tl.load(dy_ptr + row * s_dy_r + offs * s_dy_d, mask=ok, other=0.0).to(tl.float32)
            gy = dy * w
            c1 = tl.sum(gy, axis=0) / D
            c2 = tl.sum(gy * xhat, axis=0) / D
            ds = rstd * (gy - c1 - xhat * c2)
            tl.store(ds_ptr + row * D + offs, ds.to(ds_ptr.dtype.element_ty), mask=ok)
            dw += dy * xhat
            db += dy
    tl.store(dw_part_ptr + pid * D + offs, dw, mask=ok)
    tl.store(db_part_ptr + pid * D + offs, db, mask=ok)


def _launch_shape(R: int, D: int) -> tuple[int, int, int]:
    rows = 1 if R <= 4096 else 8 if R <= 65536 else 32
    return rows, triton.next_power_of_2(D), triton.cdiv(R, rows)


@on_tensor_device
def add_layer_norm_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor, eps: float):
    """Returns ``(y, mean, rstd)``; ``y`` has the shape and dtype of ``x``."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    r2 = residual.reshape(-1, D).contiguous()
    R = x2.shape[0]
    y = torch.empty_like(x2)
    mean = torch.empty(R, dtype=torch.float32, device=x.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    if R:
        rows, d_p, grid = _launch_shape(R, D)
        add_layer_norm_fwd_kernel[(grid,)](
            x2, r2, weight.contiguous(), bias.contiguous(), y, mean, rstd, R, D, float(eps),
            ROWS=rows, D_P=d_p)
    return y.view(x.shape), mean, rstd


@on_tensor_device
def add_layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor,
                            weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    """Returns ``(dx, dweight, dbias)``; ``dresidual`` equals ``dx``."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    r2 = residual.reshape(-1, D).contiguous()
    R = x2.shape[0]
    dy2 = dy.reshape(R, D)
    ds = torch.empty_like(x2)
    rows, d_p, grid = _launch_shape(R, D)
    dw_part = torch.zeros((max(grid, 1), D), dtype=torch.float32, device=x.device)
    db_part = torch.zeros((max(grid, 1), D), dtype=torch.float32, device=x.device)
    if R:
        add_layer_norm_bwd_kernel[(grid,)](
            x2, r2, weight.contiguous(), mean, rstd, dy2, dy2.stride(0), dy2.stride(1),
            ds, dw_part, db_part, R, D, ROWS=rows, D_P=d_p)
    return ds.view(x.shape), dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)
