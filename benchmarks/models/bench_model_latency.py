"""Batch-1 eager inference latency of the attention models (CPU, one thread).

``model.eval()`` under ``torch.inference_mode()``, one sample of synthetic MOSI aligned
(every modality 50 steps) and unaligned (50 / 375 / 500), ``torch.set_num_threads(1)``;
p50 over ``--reps`` calls after warm-up (``time.perf_counter``). FD-CMDIE is timed with
its CMDIE ``batched="auto"`` (the default), ``True`` (one attention launch per step for
the three DIPUs, X's padded to the longest) and ``False`` (the per-DIPU loop), where the
installed library has the switch (run with ``PYTHONPATH`` at another checkout to compare).

    python benchmarks/models/bench_model_latency.py [--reps 200] [--models agfn fd_cmdie promma]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

import torch

from msa_fast.data import load_data
from msa_fast.data.loader import gather_batch
from msa_fast.models import build_model

SPECS = {"mosi_aligned": "synthetic:mosi:aligned:limit=8", "mosi_unaligned": "synthetic:mosi:unaligned:limit=8"}


def _p50(fn, reps: int) -> float:
    for _ in range(max(5, reps // 10)):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--models", nargs="+", default=["agfn", "fd_cmdie", "promma"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for label, spec in SPECS.items():
        data = load_data(spec)
        batch = gather_batch(data["test"], torch.arange(1))
        for name in args.models:
            torch.manual_seed(0)
            model = build_model(name, data.dims).eval()
            variants = [("", None)]
            cmdie = getattr(model, "cmdie", None)
            if cmdie is not None and hasattr(cmdie, "batched"):
                variants = [(" auto", "auto"), (" batched", True), (" loop", False)]
            for suffix, batched in variants:
                if batched is not None:
                    cmdie.batched = batched
                with torch.inference_mode():
                    ms = _p50(functools.partial(model, batch), args.reps)
                print(f"{label:15s} {name + suffix:18s} p50 {ms:8.3f} ms", flush=True)


if __name__ == "__main__":
    main()
