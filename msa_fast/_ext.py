"""Loading of the optional C++/CUDA extension ``msa_fast._C`` and build facts.

The package works without the extension (eager and Triton paths); the ``cpp``
and ``cuda`` backends then report why they are unavailable.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def load() -> tuple[object | None, str | None]:
    """Import ``msa_fast._C`` once. Returns ``(module, None)`` or ``(None, why)``."""
    try:
        from msa_fast import _C  # noqa: PLC0415  (registers torch.ops.msa_fast.*)
    except ImportError as exc:
        return None, f"the C++ extension msa_fast._C is not built ({exc}); reinstall with `pip install --no-build-isolation -e .`"
    return _C, None


# a constant to torch.compile: the dispatcher query is not traceable, and a backend chain
# checked inside a compiled model (auto trying ``cpp``) would otherwise break its graph
@torch.compiler.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``torch.ops.msa_fast.<op>`` has a kernel for ``dispatch_key`` (CPU, CUDA)."""
    if load()[0] is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"msa_fast::{op}", dispatch_key)


def _archs() -> list[str]:
    mod = load()[0]
    return [a for a in getattr(mod, "cuda_archs", "").replace(",", ";").split(";") if a]


def arch_runs(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` (``TORCH_CUDA_ARCH_LIST`` entries such as
    ``"9.0"``, ``"9.0a"``, ``"12.0+PTX"``) runs on a GPU of ``capability``.

    A cubin for ``X.Y`` runs on ``X.Z`` with ``Z >= Y`` (an ``a`` variant only on
    ``X.Y`` itself); PTX for ``X.Y`` is JIT-compiled by the driver on any GPU of at
    least ``X.Y``.
    """
    major, minor = capability
    for arch in archs:
        ptx = arch.endswith("+PTX")
        base = arch.removesuffix("+PTX")
        specific = base.endswith("a")
        a_major, a_minor = (int(p) for p in base.rstrip("a").split("."))
        if ptx and (major, minor) >= (a_major, a_minor):
            return True
        if specific and (major, minor) == (a_major, a_minor):
            return True
        if not specific and major == a_major and minor >= a_minor:
            return True
    return False


def arch_reason(device: torch.device) -> str | None:
    """Why the CUDA kernels of this build cannot run on ``device``; ``None`` when they can."""
    cap = torch.cuda.get_device_capability(device)
    archs = _archs()
    if archs and not arch_runs(archs, cap):
        return (f"msa_fast._C was built for archs {';'.join(archs)}, which cannot run on this "
                f"sm_{cap[0]}{cap[1]} GPU; rebuild with TORCH_CUDA_ARCH_LIST=\"{cap[0]}.{cap[1]}\"")
    return None


def build_info() -> dict:
    """What was compiled: the extension, its CPU and CUDA ops, the CUDA archs, Triton."""
    mod, why = load()
    info: dict = {
        "extension": mod is not None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if mod is None:
        info.update(reason=why, cpu_ops=[], cuda_ops=[], cuda_archs=[], openmp=False)
        return info
    # every registered msa_fast op (dir(torch.ops.msa_fast) lists only those already
    # looked up); the Python custom ops of the Triton backend have no CPU/CUDA kernel
    ops = sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                 if name.startswith("msa_fast::"))
    info["cpu_ops"] = [op for op in ops if has_kernel(op, "CPU")]
    info["cuda_ops"] = [op for op in ops if has_kernel(op, "CUDA")]
    info["with_cuda"] = bool(mod.with_cuda)
    info["cuda_archs"] = _archs()
    info["openmp"] = bool(mod.with_openmp)
    return info
