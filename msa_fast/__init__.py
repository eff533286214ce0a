"""msa_fast: fused PyTorch kernels and reference models for multimodal sentiment analysis.

Public surface: :mod:`msa_fast.ops` (functional ops), :mod:`msa_fast.nn` (drop-in
modules), :func:`set_backend` / :func:`use_backend` / :func:`get_backend`,
:func:`build_info`.
"""

from msa_fast import _ext
from msa_fast._backend import BACKENDS, available, get_backend, set_backend, use_backend
from msa_fast._ext import build_info

_ext.load()  # register torch.ops.msa_fast.* before any Python op adds to the namespace

from msa_fast import nn, ops  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "available",
    "build_info",
    "get_backend",
    "nn",
    "ops",
    "set_backend",
    "use_backend",
]
