"""Benchmark of ``attention`` with a key padding mask (contract §3.3) vs eager, torch.compile,
Triton, ``F.scaled_dot_product_attention`` called directly with the same mask (``sdpa``) and
our op with ``backend="auto"`` (``auto``), interleaved.

Shapes ``(B, H, Lq, Lk, Dh)``: DIPU self/cross attention for MOSI / MOSEI aligned
(L = 50) and unaligned (G of 50 attending to 500 frames, 500 x 500 self-attention)
and a large-batch training shape; up to 30 % of the keys of each sequence are padding (a
length drawn per sequence). A sixth entry fixes the padding instead: the last ``n`` keys of
every sequence, as FD-CMDIE's unaligned batches padded to 875 frames come (issue 23's shape).
TFLOP/s counts ``4 B H Lq Lk Dh`` forward and ``10 B H Lq Lk Dh`` backward (FA2's
convention: the backward recomputes ``q k^T``).

    python benchmarks/ops/bench_attention.py [--device cuda] [--dtype bfloat16] [--quick]
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

import torch
import torch.nn.functional as F

import msa_fast
from benchmarks._common import cli, run_op

SHAPES = {
    "mosi_aligned": (32, 8, 50, 50, 16),
    "fd_cmdie_unaligned": (8, 4, 875, 875, 16, 75),
    "mosei_cross_unaligned": (32, 8, 50, 500, 32),
    "mosei_self_unaligned": (32, 8, 500, 500, 32),
    "train_large": (128, 8, 500, 500, 64),
    "mosei_self_dh128": (32, 4, 500, 500, 128),  # the widest head the triton backend takes
}


def build(shape, device, dtype):
    B, H, Lq, Lk, Dh = shape[:5]
    q = torch.randn(B, H, Lq, Dh, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, Lk, Dh, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, H, Lk, Dh, device=device, dtype=dtype, requires_grad=True)
    if len(shape) == 6:
        lengths = torch.full((B,), Lk - shape[5], device=device)
    else:
        lengths = torch.randint(int(0.7 * Lk), Lk + 1, (B,), device=device)
    mask = torch.arange(Lk, device=device)[None, :] >= lengths[:, None]
    inputs = [q, k, v]

    # SDPA takes "True = attend", the opposite of key_padding_mask, broadcast over heads and queries.
    attend = (~mask)[:, None, None, :]

    def call(backend):
        if backend == "sdpa":
            return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        return lambda: msa_fast.ops.attention(q, k, v, mask, backend=backend)

    return inputs, call


def flops(shape):
    B, H, Lq, Lk, Dh = shape[:5]
    base = B * H * Lq * Lk * Dh
    return 4 * base, 10 * base


if __name__ == "__main__":
    run_op("attention", SHAPES, build, cli(__doc__).parse_args(), flops=flops,
           extra_providers={"sdpa": lambda inputs, call: call("sdpa"),  # F.sdpa, called as a user would
                            "auto": lambda inputs, call: call("auto")})  # our op, as shipped
