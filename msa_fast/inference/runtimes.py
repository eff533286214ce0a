"""Which runtime the Predictor runs a model with: ``Predictor(runtime=...)``.

- ``eager``: the model's own forward (the Predictor's copy: eval, unpacked LSTMs);
- ``compiled``: ``torch.compile(dynamic=False)``, one graph per bucket (CPU);
- ``onnxruntime``: the model exported to ONNX (:mod:`msa_fast.inference.export`: one graph with
  dynamic batch and lengths per layout, aligned / unaligned) in an ONNX Runtime session
  (``ORT_ENABLE_ALL``, torch's thread count); needs the ``[onnx]`` extra;
- ``aoti``: the model as an AOTInductor package (compiled once per layout, minutes for the
  larger models; then loaded like a C++ library);
- ``auto``: on the CPU, per model and batch bucket, the runtime :data:`AUTO_CPU` says measured
  fastest (``benchmarks/models/bench_inference.py``,
  ``benchmarks/results/inference_cpu_mosi.json``); ``onnxruntime`` only where it is
  installed, else the fastest torch runtime of the same table. On CUDA: CUDA graphs
  (eager where capture fails), as before.

The exported and compiled runtimes build on first use (seconds: export + check against eager)
and fall back -- logged, counted in ``Predictor.fallbacks`` -- to the best torch runtime of
that layout when they cannot be built.
"""

from __future__ import annotations

import functools
import importlib.util

RUNTIMES = ("auto", "eager", "compiled", "onnxruntime", "aoti")

# model -> ((largest batch bucket, runtime), ...) on the CPU: the fastest of the Predictor's
# runtimes (p50, MOSI aligned, 1 thread, providers interleaved) at batch 1, 8 and 64 in
# benchmarks/results/inference_cpu_mosi.json, where bench_inference.py writes this table as
# "auto_cpu" (a test keeps the two equal); a bucket takes the first entry at least as large,
# and the last entry beyond it. "aoti" is not offered: its package compiles for minutes on the
# first request of a layout. Without the [onnx] extra, "onnxruntime" becomes the model's torch
# default (predictor.COMPILE_DEFAULT).
AUTO_CPU: dict[str, tuple[tuple[int, str], ...]] = {
    "agfn": ((1, "onnxruntime"), (8, "onnxruntime"), (64, "compiled")),
    "fd_cmdie": ((1, "onnxruntime"), (8, "compiled"), (64, "compiled")),
    "lf_dnn": ((1, "onnxruntime"), (8, "onnxruntime"), (64, "onnxruntime")),
    "promma": ((1, "onnxruntime"), (8, "compiled"), (64, "compiled")),
    "text_only": ((1, "onnxruntime"), (8, "onnxruntime"), (64, "onnxruntime")),
}


@functools.cache
def onnxruntime_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript", "onnx"))


def auto_runtime(model_name: str | None, batch: int, torch_default: str) -> str:
    """The runtime ``auto`` runs a batch bucket of ``batch`` rows of ``model_name`` with on the CPU."""
    entries = AUTO_CPU.get(model_name or "", ())
    for top, runtime in entries:
        if batch <= top or top == entries[-1][0]:
            if runtime == "onnxruntime" and not onnxruntime_available():
                return torch_default
            return runtime
    return torch_default


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: expected one of {RUNTIMES}, got {runtime!r}")
    if runtime == "onnxruntime" and not onnxruntime_available():
        raise ValueError("runtime: 'onnxruntime' needs onnx, onnxscript and onnxruntime: "
                         "pip install 'msa_fast[onnx]' (or runtime='auto', which falls back to torch)")
    return runtime


__all__ = ["AUTO_CPU", "RUNTIMES", "auto_runtime", "check_runtime", "onnxruntime_available"]
