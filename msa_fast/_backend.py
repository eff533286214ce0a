"""Backend selection shared by every op (SPEC section 2).

Backends: ``eager`` (``ops/reference.py``, any device, the ground truth),
``triton`` (CUDA GPUs; CPU tensors too when ``TRITON_INTERPRET=1``), ``cuda``
(C++/CUDA extension) and ``cpp`` (C++ CPU extension). ``"auto"`` picks, per op and
device, the first available backend of :data:`AUTO_ORDER` -- an order measured by
the benchmarks and tabulated in the README. An explicitly requested backend that
cannot run raises ``RuntimeError`` with the reason; ``auto`` falls back to eager.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from msa_fast import _ext

BACKENDS = ("eager", "triton", "cuda", "cpp")
_CHOICES = ("auto", *BACKENDS)

# Which fused implementations exist, per op: filled by each ops/<op>.py module.
_IMPLEMENTED: dict[str, set[str]] = {}
# Preference of "auto" per (op, device type); ops absent here use _DEFAULT_ORDER.
AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {}
_DEFAULT_ORDER = {"cpu": ("cpp", "eager"), "cuda": ("cuda", "triton", "eager")}

_default = "auto"


def _check_name(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"backend: expected one of {_CHOICES}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the global default backend used when an op or module gets ``backend=None``."""
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    return _default


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily set the global default backend: ``with msa_fast.use_backend("eager"): ...``."""
    global _default
    previous, _default = _default, _check_name(name)
    try:
        yield
    finally:
        _default = previous


def register(op: str, *backends: str) -> None:
    """Declare that ``op`` has fused implementations for ``backends``."""
    _IMPLEMENTED.setdefault(op, set()).update(backends)


def _triton_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to interpret on the CPU)"


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device``; ``None`` when it can."""
    if backend == "eager":
        return None
    if backend not in _IMPLEMENTED.get(op, ()):
        return f"msa_fast has no {backend} implementation of {op}"
    if backend == "triton":
        return _triton_reason(device)
    mod, why = _ext.load()
    if mod is None:
        return why
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device.type}"
        if not _ext.has_kernel(op, "CPU"):
            return f"msa_fast._C was built without a CPU kernel for {op}"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type}"
        if not _ext.has_kernel(op, "CUDA"):
            return f"msa_fast._C was built without CUDA (no CUDA kernel for {op})"
        return None
    return f"unknown backend {backend!r}"


def available(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run ``op`` on ``device`` right now."""
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(op, b, device) is None]


def is_explicit(backend: str | None) -> bool:
    """True when the caller (or the global default) named a backend rather than ``auto``.

    Ops whose fused kernel has a shape limit use it to decide between raising
    (explicit request) and falling back to eager (``auto`` never fails).
    """
    return (backend if backend is not None else _default) != "auto"


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The concrete backend to run ``op`` with (``None`` means the global default)."""
    name = _check_name(backend if backend is not None else _default)
    if name == "auto":
        order = AUTO_ORDER.get((op, device.type), _DEFAULT_ORDER.get(device.type, ("eager",)))
        for candidate in order:
            if unavailable_reason(op, candidate, device) is None:
                return candidate
        return "eager"
    reason = unavailable_reason(op, name, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {name!r} is unavailable: {reason}")
    return name
