"""Benchmark of the FD-CMDIE contrastive losses (contract §3.4): eager vs torch.compile vs Triton.

Three ops, one JSON + PNG each (``benchmarks/results/contrastive_<op>_<device>``):

* ``fd_cmdie_contrastive_loss`` ``(B, Kp = Kn = k_cl, D)``: the whole L_cl of a
  batch. MOSI (B = 32, k_cl = 10, Table 2 of the paper), MOSEI-like (B = 64,
  k_cl = 50, D = 256), a large batch (B = 1024), and the MOSEI shape with the
  partners from a detached memory bank (``partner_source="bank"``: no partner
  gradients). ~10% of the partner slots are masked (classes too small).
* ``nt_xent`` ``(P = B anchors, K = k_cl negatives, D)``, ~10% negatives masked.
* ``triplet`` ``(P = 6 B triplets, D)`` (six triplets per sample, eq. 10-11).

Memory bound: GB/s counts the bytes that must move -- the forward reads every
feature row (and the masks) once and writes the per-row losses (+ the saved lse);
the backward reads them again with the row gradients and writes every input
gradient. Peak memory (above the inputs) is measured on a GPU only. Triton needs
a CUDA GPU: on a CPU only eager and torch.compile run (fp32, median ms of
``torch.utils.benchmark``), and the JSON says so. ``--quick``: the first shape,
without torch.compile (whose compilation would dominate a CI smoke run).

    python benchmarks/ops/bench_contrastive.py [--device cuda] [--dtype bfloat16] [--quick] [--ops nt_xent,...]
"""

from __future__ import annotations

import copy
import os
import sys

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

import torch

import msa_fast
from benchmarks._common import RESULTS, cli, run_op

# label -> (B, k_cl, D[, "bank"])
BATCHES = {
    "mosi_b32_k10_d128": (32, 10, 128),
    "mosei_b64_k50_d256": (64, 50, 256),
    "mosei_b64_k50_d256_bank": (64, 50, 256, "bank"),
    "large_b1024_k50_d256": (1024, 50, 256),
}
MISSING = 0.1  # fraction of masked partner / negative slots


def _mask(shape, device):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(shape, generator=g) >= MISSING).to(device)


def _feats(shape, device, dtype, grad=True):
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_(grad)


# --------------------------------------------------------------------------- fd_cmdie


def build_fd(shape, device, dtype):
    B, K, D, *bank = shape
    s, d = _feats((B, 3, D), device, dtype), _feats((B, 3, D), device, dtype)
    ps = _feats((B, K, 2, 3, D), device, dtype, grad=not bank)
    ns = _feats((B, K, 3, D), device, dtype, grad=not bank)
    pm, nm = _mask((B, K), device), _mask((B, K), device)
    inputs = [s, d] if bank else [s, d, ps, ns]

    def call(backend):
        return lambda: msa_fast.ops.fd_cmdie_contrastive_loss(s, d, ps, ns, 0.5, 0.5, 0.1, pm, nm, backend=backend)

    return inputs, call


def traffic_fd(shape, dtype):
    B, K, D, *bank = shape
    el = torch.finfo(dtype).bits // 8
    feats = el * B * (6 + 6 * K + 3 * K) * D
    masks = 2 * B * K
    fwd = feats + masks + 4 * B * 5  # + loss and aux rows
    written = el * B * 6 * D if bank else feats
    bwd = feats + masks + 4 * B * 5 + written
    return fwd, bwd


# --------------------------------------------------------------------------- nt_xent


def build_nt(shape, device, dtype):
    B, K, D, *bank = shape
    a, p = _feats((B, D), device, dtype), _feats((B, D), device, dtype)
    n = _feats((B, K, D), device, dtype, grad=not bank)
    m = _mask((B, K), device)
    inputs = [a, p] if bank else [a, p, n]

    def call(backend):
        return lambda: msa_fast.ops.nt_xent(a, p, n, m, 0.5, backend=backend)

    return inputs, call


def traffic_nt(shape, dtype):
    B, K, D, *bank = shape
    el = torch.finfo(dtype).bits // 8
    feats = el * B * (2 + K) * D
    fwd = feats + B * K + 8 * B
    bwd = feats + B * K + 8 * B + (el * B * 2 * D if bank else feats)
    return fwd, bwd


# --------------------------------------------------------------------------- triplet


def build_tri(shape, device, dtype):
    B, _, D, *_ = shape
    a, p, n = (_feats((6 * B, D), device, dtype) for _ in range(3))

    def call(backend):
        return lambda: msa_fast.ops.triplet(a, p, n, 0.5, backend=backend)

    return [a, p, n], call


def traffic_tri(shape, dtype):
    B, _, D, *_ = shape
    el = torch.finfo(dtype).bits // 8
    feats = el * 6 * B * 3 * D
    return feats + 4 * 6 * B, 2 * feats + 4 * 6 * B


OPS = {
    "fd_cmdie_contrastive_loss": (build_fd, traffic_fd, BATCHES),
    "nt_xent": (build_nt, traffic_nt, BATCHES),
    # The bank variant is an fd / nt_xent matter; triplets have no partner features.
    "triplet": (build_tri, traffic_tri, {k: v for k, v in BATCHES.items() if "bank" not in k}),
}


def main():
    parser = cli(__doc__)
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # CI smoke: torch.compile's first call (about a minute per op on a CPU) would
    # dominate; its correctness is covered by the tests, so --quick skips it.
    skip = ("torch.compile",) if args.quick else ()
    device = "cuda" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") else "cpu"
    for op in args.ops.split(","):
        build, traffic, shapes = OPS[op]
        op_args = copy.copy(args)
        if args.out:
            stem, ext = os.path.splitext(args.out)
            op_args.out = f"{stem}_{op}{ext or '.json'}"
        else:
            op_args.out = os.path.join(RESULTS, f"contrastive_{op}_{device}.json")
        run_op(op, shapes, build, op_args, traffic=traffic, skip=skip)


if __name__ == "__main__":
    main()
