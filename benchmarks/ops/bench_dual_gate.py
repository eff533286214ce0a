"""Benchmark of ``dual_gate`` (AGFN dual gate, contract §3.1): eager vs torch.compile vs Triton.

Shapes ``(rows, M, D, C)``: one utterance vector per modality and sample and its
``C`` entropy logits -- ``C = 7`` (``entropy_source="classes"``, the default) at MOSI /
MOSEI batches (the batch is the row count) and a large-batch training shape, and
``C = D`` (``"features"``) at MOSEI size. Memory bound: GB/s counts the bytes that must
move (read ``h``, ``u``, ``g_logits``; write ``h_ent``, ``h_imp_in``, ``e``, ``g``, ``H``;
the backward also reads the five incoming gradients and writes ``dh``, ``du`` and
``dg_logits``).

    python benchmarks/ops/bench_dual_gate.py [--device cuda] [--dtype bfloat16] [--quick]
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
    "mosi_b32": (32, 3, 128, 7),
    "mosei_b64": (64, 3, 256, 7),
    "mosei_b1024": (1024, 3, 768, 7),
    "train_b16384": (16384, 3, 768, 7),
    "mosei_b1024_features": (1024, 3, 768, 768),
}


def build(shape, device, dtype):
    R, M, D, C = shape
    h = torch.randn(R, M, D, device=device, dtype=dtype, requires_grad=True)
    u = torch.randn(R, M, C, device=device, dtype=dtype, requires_grad=True)
    w_z = (0.1 * torch.randn(M, D, device=device, dtype=dtype)).requires_grad_()
    b_z = torch.randn(M, device=device, dtype=dtype, requires_grad=True)
    g_logits = torch.randn(R, M, device=device, dtype=dtype, requires_grad=True)
    inputs = [h, u, w_z, b_z, g_logits]

    def call(backend):
        return lambda: msa_fast.ops.dual_gate(h, u, w_z, b_z, g_logits, 0.5, backend=backend)

    return inputs, call


def traffic(shape, dtype):
    R, M, D, C = shape
    el = torch.finfo(dtype).bits // 8
    fwd = el * (R * M * D + R * M * C + R * M + R * D + R * M * D + 3 * R * M)
    bwd = el * (R * M * D + R * M * C + R * M + (R * D + R * M * D + 3 * R * M) + R * M * D + R * M * C + R * M)
    return fwd, bwd


if __name__ == "__main__":
    run_op("dual_gate", SHAPES, build, cli(__doc__).parse_args(), traffic=traffic)
