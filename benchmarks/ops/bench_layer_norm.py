"""Benchmark of ``add_layer_norm`` (``LayerNorm(x + residual)``, contract §3.3).

Shapes ``(B, L, d)``: DIPU activations for MOSI / MOSEI aligned (L = 50) and
unaligned (L = 500) and a large-batch training shape. Memory bound: forward reads
``x`` and ``residual`` and writes ``y``; backward reads ``x``, ``residual``, ``dy``
and writes ``dx`` (= ``dresidual``).

    python benchmarks/ops/bench_layer_norm.py [--device cuda] [--dtype bfloat16] [--quick]
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

import torch

import msa_fast
from benchmarks._common import cli, run_op

SHAPES = {
    "mosi_aligned": (32, 50, 128),
    "mosei_aligned": (64, 50, 256),
    "mosei_unaligned": (32, 500, 256),
    "train_large": (256, 500, 768),
}


def build(shape, device, dtype):
    B, L, d = shape
    x = torch.randn(B, L, d, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn(B, L, d, device=device, dtype=dtype, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(d, device=device, dtype=dtype)).requires_grad_()
    bias = (0.1 * torch.randn(d, device=device, dtype=dtype)).requires_grad_()
    inputs = [x, residual, weight, bias]

    def call(backend):
        return lambda: msa_fast.ops.add_layer_norm(x, residual, weight, bias, 1e-5, backend=backend)

    return inputs, call


def traffic(shape, dtype):
    B, L, d = shape
    n = B * L * d * (torch.finfo(dtype).bits // 8)
    return 3 * n, 4 * n


if __name__ == "__main__":
    run_op("add_layer_norm", SHAPES, build, cli(__doc__).parse_args(), traffic=traffic)
