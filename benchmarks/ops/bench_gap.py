"""Benchmark of ``gated_attention_pool`` (GAP, FD-CMDIE eq. 25-29, contract §3.2).

Shapes ``(M, B, L, d)`` with GateMLP / attention-MLP hidden ``d // 2``: the three
enhanced global features of one CMDIE layer for MOSI / MOSEI aligned (L = 50),
unaligned (L = 500) and a large-batch training shape. Memory bound: the forward
reads ``x`` (M B L d) and writes ``out`` plus ``alpha, g``; the backward reads ``x``,
``dout``, ``dalpha``, ``dg`` and writes ``dx``.

    python benchmarks/ops/bench_gap.py [--device cuda] [--dtype bfloat16] [--quick]
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
    "mosi_aligned": (3, 32, 50, 128),
    "mosei_aligned": (3, 64, 50, 256),
    "mosei_unaligned": (3, 32, 500, 256),
    "train_large": (3, 256, 500, 256),
}


def build(shape, device, dtype):
    M, B, L, d = shape
    h = d // 2
    gen = [1 + 0.1 * torch.randn(M, d), 0.1 * torch.randn(M, d), torch.randn(M, h, d) / d**0.5,
           0.1 * torch.randn(M, h), torch.randn(M, h) / h**0.5, 0.1 * torch.randn(M),
           torch.randn(h, d) / d**0.5, 0.1 * torch.randn(h), torch.randn(h) / h**0.5, 0.1 * torch.randn(())]
    x = torch.randn(M, B, L, d)
    inputs = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, *gen)]
    lengths = torch.randint(int(0.7 * L), L + 1, (B,), device=device)
    mask = torch.arange(L, device=device)[None, :] >= lengths[:, None]

    def call(backend):
        return lambda: msa_fast.ops.gated_attention_pool(*inputs, mask=mask, backend=backend)

    return inputs, call


def traffic(shape, dtype):
    M, B, L, d = shape
    el = torch.finfo(dtype).bits // 8
    x, out, small = M * B * L * d, B * L * d, 2 * M * B * L
    return el * (x + out + small), el * (2 * x + out + small)


if __name__ == "__main__":
    run_op("gated_attention_pool", SHAPES, build, cli(__doc__).parse_args(), traffic=traffic)
