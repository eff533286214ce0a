"""Backend selection and the one dispatch every op uses (contract §2).

Backends: ``eager`` (``ops/reference.py``, any device, the ground truth),
``triton`` (CUDA GPUs; CPU tensors too when ``TRITON_INTERPRET=1``), ``cuda``
(C++/CUDA extension), ``cpp`` (C++ CPU extension), ``sdpa`` (PyTorch's own fused
implementation, where the op has one: ``scaled_dot_product_attention`` for attention, on
every device) and ``compile`` (``torch.compile`` of the reference, for the ops whose
descriptor says ``compile=True``: the alternative a user would reach for, so ``auto``
takes it where it measures fastest; see :func:`compiled_reference`).

Each op declares itself once, as an :class:`OpSpec`: its reference, its argument
checks, its dtype policy under autocast, and each fused backend (:class:`Fused`)
with the dtypes and shapes it takes and where ``auto`` may pick it. :func:`dispatch`
then does for every op: autocast -> checks -> backend choice -> run. ``"auto"`` takes,
per device type, the first fused backend of :data:`AUTO_ORDER` (the order measured by
``benchmarks/ops/bench_auto.py`` and stored in ``msa_fast/_auto_order.py``; the specs'
declared order for an (op, device) the measurement does not cover) that is available
and accepts the input's dtype and shape, else the
reference -- it never fails, and it never hands fp64 (or any dtype a kernel does
not declare) to a kernel. An explicitly requested backend that cannot run raises
``RuntimeError`` with the reason; one that does not take the dtype raises
``ValueError`` naming it; one whose shape limit is exceeded raises ``RuntimeError``
naming the limit. :func:`backend_table` renders the README's backend table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import os
import shutil
import types
from collections.abc import Callable
from typing import Any

import torch

from msa_fast import _ext

BACKENDS = ("eager", "triton", "cuda", "cpp", "sdpa", "compile")
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


@functools.cache
def _compile_reason(device_type: str) -> str | None:
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this platform / Python"
    if device_type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++ / clang++), none found"
    if device_type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton"
    return None


# torch 2.11's CPU inductor miscompiles the vectorised C++ of fd_cmdie_contrastive_loss's
# backward (the heap is corrupted: "double free or corruption", the process dies; found by
# tools/gpu_rehearsal.sh, gone by torch 2.14, 2.12 / 2.13 untested): before 2.14 the
# compile backend's CPU kernels are scalar C++ (``cpp.simdlen = 0``, per compile, not global)
_TORCH_214 = torch.torch_version.TorchVersion(torch.__version__) >= (2, 14)
_COMPILE_OPTIONS = None if _TORCH_214 else {"cpp.simdlen": 0}


_EXPORTING = 0


@contextlib.contextmanager
def exporting():
    """Marks a ``torch.export`` / ``torch.onnx.export`` of msa_fast's own
    (:mod:`msa_fast.inference.export`): a backend whose op a plain ONNX Runtime or
    AOTInductor consumer lacks (the ``cpp`` attention kernel) declines inside it."""
    global _EXPORTING
    _EXPORTING += 1
    try:
        yield
    finally:
        _EXPORTING -= 1


def is_exporting() -> bool:
    """Inside :func:`exporting`, or (torch >= 2.14) any ``torch.export``. Before 2.14,
    ``torch.compiler.is_exporting()`` reads True while Dynamo traces a plain ``torch.compile``
    (seen on 2.11), so only msa_fast's own exports are known there."""
    return _EXPORTING > 0 or (_TORCH_214 and torch.compiler.is_exporting())


def compiled_reference(reference: Callable[..., Any],
                       check: Callable[..., None] | None = None) -> Callable[..., Any]:
    """``reference`` under ``torch.compile``, compiled on its first call (2-25 s on a CPU: once
    per process and input signature -- dtype, which inputs need grad, which optionals are
    given). PyTorch's default ``dynamic=None``: the first sizes are static (the fastest
    kernels and guards: 30 vs 70 us a call for the dual gate at MOSI's batch), a second size
    recompiles once with symbolic sizes, which then serve every size. Not ``fullgraph``:
    past dynamo's recompile limit (8 signatures) the reference then runs as it is, same
    values, where ``fullgraph`` would raise. Inside a graph that is being compiled (a user's
    ``torch.compile(model)``, the Predictor) it is the plain reference, which that compile
    inlines and fuses with its neighbours.

    ``check``: the op's argument check, compiled with it. Dynamo runs it while tracing and
    keeps no trace of it in the graph: the guards it leaves (shapes, dtypes, devices, the
    float arguments) are the ones the graph has anyway, so a call the compiled graph serves
    is checked for free (the Python check costs 10-30 us, 10 % of a dual-gate step); a bad
    input fails a guard, is traced again and raises the check's ``ValueError``."""
    def checked(*args):
        if check is not None:
            check(*args)
        return reference(*args)

    # Dynamo caches compiled graphs per code object, with a recompile limit per code object:
    # every op's ``checked`` would share one code object and so one limit (8 signatures for
    # all ops together; past it, silently the reference). A copy of the code per op keeps
    # each op's cache its own.
    name = f"{getattr(reference, '__name__', 'op')}_checked"
    checked = types.FunctionType(checked.__code__.replace(co_name=name, co_qualname=name),
                                 checked.__globals__, name, None, checked.__closure__)
    compiled = None

    def run(*args):
        nonlocal compiled
        if torch.compiler.is_compiling():
            return checked(*args)
        if compiled is None:
            compiled = torch.compile(checked, options=_COMPILE_OPTIONS)
        return compiled(*args)

    run.checked = checked  # what is compiled (tests: one code object per op)
    return run


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device``; ``None`` when it can."""
    if backend == "eager":
        return None
    if backend not in _IMPLEMENTED.get(op, ()):
        return f"msa_fast has no {backend} implementation of {op}"
    if backend == "triton":
        return _triton_reason(device)
    if backend == "sdpa":  # PyTorch's own kernels: every device torch runs on
        return None
    if backend == "compile":
        return _compile_reason(device.type)
    mod, why = _ext.load()
    if mod is None:
        return why
    if backend not in _EXTENSION_BACKENDS:
        return f"unknown backend {backend!r}"
    dev, key, wrong_device, no_kernel = _EXTENSION_BACKENDS[backend]
    if device.type != dev:
        return f"{wrong_device}, got {device.type}"
    if not _ext.has_kernel(op, key):
        return no_kernel.format(op=op)
    return _ext.arch_reason(device) if dev == "cuda" else None


# the C++ extension's backends: device type, dispatch key, and what is said when they cannot run
_EXTENSION_BACKENDS = {
    "cpp": ("cpu", "CPU", "the cpp backend runs on CPU tensors", "msa_fast._C was built without a CPU kernel for {op}"),
    "cuda": ("cuda", "CUDA", "the cuda backend needs CUDA tensors",
             "msa_fast._C was built without CUDA (no CUDA kernel for {op})"),
}


def available(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run ``op`` on ``device`` right now."""
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(op, b, device) is None]


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The backend ``op`` would run with on ``device`` (``None``: the global default),
    before the input's dtype and shape are known; :func:`dispatch` also applies those."""
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


# --------------------------------------------------------------------------- #
# One descriptor per op, one dispatch for all
# --------------------------------------------------------------------------- #

FP_16_32 = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Fused:
    """One fused implementation of an op.

    ``run`` takes the op's (checked) positional arguments, like the reference.
    ``dtypes``: the floating dtypes of the first argument it takes. ``limit(*args)``
    says why these arguments are beyond the kernel (``None``: within), and
    ``limit_doc`` says the limit for the README. ``auto``: the device types on which
    ``auto`` may pick it; ``rank`` orders fused backends there (lower first). ``checks``:
    ``run`` checks its own arguments (the ``compile`` backend), so :func:`dispatch` may skip
    the Python check when it picks this one.
    """

    backend: str
    run: Callable[..., Any]
    dtypes: tuple[torch.dtype, ...] = FP_16_32
    limit: Callable[..., str | None] | None = None
    limit_doc: str = ""
    auto: tuple[str, ...] = ("cuda",)
    rank: int = 0
    checks: bool = False


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """An op: its reference (the ground truth), its checks, its dtype policy, its fused backends.

    ``autocast``: under ``torch.autocast`` the floating inputs are cast to one dtype --
    ``"autocast"`` (the autocast dtype), a fixed dtype (fp32 for the losses) or ``None``
    (no cast). ``check(*args)`` raises ``ValueError`` on bad input (contract §10).
    ``compile``: the op also gets a ``compile`` backend, :func:`compiled_reference`.
    ``composite``: an op with no kernel of its own (the DIPU): :func:`dispatch` checks the
    arguments and runs ``composite(*args, backend)``, which calls the dispatched ops it is
    built of with ``backend``; an explicit ``backend`` must be one op ``composite_of``
    can run (the error names this op).
    """

    name: str
    reference: Callable[..., Any]
    check: Callable[..., None]
    fused: tuple[Fused, ...] = ()
    autocast: str | torch.dtype | None = "autocast"
    compile: bool = False
    composite: Callable[..., Any] | None = None
    composite_of: str | None = None

    def __post_init__(self):
        if self.compile:  # frozen: the derived backend is set once, here
            compiled = Fused("compile", compiled_reference(self.reference, self.check), auto=(), checks=True)
            fused = (*self.fused, compiled)
            object.__setattr__(self, "fused", fused)

    @property
    def compiled(self) -> Fused | None:
        """The ``compile`` backend, when the op has one."""
        return self.fused[-1] if self.compile else None

    def implementation(self, backend: str) -> Fused | None:
        return next((f for f in self.fused if f.backend == backend), None)


def width_limit(maximum: int, name: str, why: str) -> dict:
    """``Fused(limit=..., limit_doc=...)`` for a kernel that keeps the first argument's last
    dim (``name``) in registers: at most ``maximum`` (``why`` says what is held)."""

    def limit(x, *_rest) -> str | None:
        d = x.shape[-1]
        return f"takes {name} <= {maximum} ({why}), got {name}={d}" if d > maximum else None

    return {"limit": limit, "limit_doc": f"{name} <= {maximum}"}


SPECS: dict[str, OpSpec] = {}


def declare(spec: OpSpec) -> OpSpec:
    """Register an op's descriptor: its fused backends and its ``auto`` order per device.

    The order is the measured one of ``msa_fast/_auto_order.py`` where it covers (op,
    device), else the declared one (``Fused.auto`` and ``rank``). ``eager`` always ends it:
    ``auto`` never fails. A backend the measurement ranked below ``eager`` is left out
    (``auto`` would never reach it: ``eager`` takes every input).
    """
    from msa_fast._auto_order import MEASURED

    SPECS[spec.name] = spec
    register(spec.name, *(f.backend for f in spec.fused))
    for device_type in ("cpu", "cuda"):
        measured = MEASURED.get(device_type, {}).get(spec.name)
        if measured is not None:
            known = [b for b in measured if b == "eager" or spec.implementation(b) is not None]
            order = tuple(known[:known.index("eager")]) if "eager" in known else tuple(known)
        else:
            picks = sorted((f for f in spec.fused if device_type in f.auto), key=lambda f: f.rank)
            order = tuple(f.backend for f in picks)
        AUTO_ORDER[(spec.name, device_type)] = (*order, "eager")
    return spec


@torch.compiler.assume_constant_result
def _reason(op: str, backend: str, device: torch.device) -> str | None:
    # asks the dispatcher and the environment, which Dynamo cannot trace; fixed for a process
    return unavailable_reason(op, backend, device)


def _first_tensor(args) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


def autocast_inputs(*ts, dtype: torch.dtype | None = None):
    """Mixed precision: inside ``torch.autocast`` for the first tensor's device type, cast
    every fp32/fp16/bf16 tensor among ``ts`` to ``dtype`` (default: the autocast dtype);
    outside autocast return ``ts`` unchanged.

    Why: under autocast a module hands an op activations in bf16 (from Linear layers) and
    its own parameters in fp32, while every fused op needs one dtype. GEMM-like and
    normalisation ops take the autocast dtype (their kernels accumulate in fp32 anyway);
    losses pass ``dtype=torch.float32``, as autocast does for softmax / cosine losses.
    fp64 and non-floating tensors, and non-tensors (left for validation to reject), pass
    through. Outside autocast, mismatched dtypes stay a ValueError (contract §10).
    """
    first = next((t for t in ts if isinstance(t, torch.Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return ts
    dt = dtype or torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dt) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_FROM else t
                 for t in ts)


def _autocast(spec: OpSpec, args: tuple) -> tuple:
    if spec.autocast is None:
        return args
    return autocast_inputs(*args, dtype=None if spec.autocast == "autocast" else spec.autocast)


def choose(spec: OpSpec, args: tuple, backend: str | None) -> Fused | None:
    """The fused implementation to run on (checked) ``args``, or ``None`` for the reference."""
    name = _check_name(backend if backend is not None else _default)
    x = _first_tensor(args)
    if name == "eager":
        return None
    if name == "auto":
        for candidate in AUTO_ORDER.get((spec.name, x.device.type), ("eager",)):
            f = spec.implementation(candidate)
            if f is None or x.dtype not in f.dtypes or _reason(spec.name, candidate, x.device) is not None:
                continue
            if f.limit is None or f.limit(*args) is None:
                return f
        return None
    f = spec.implementation(name)
    if f is None:
        raise RuntimeError(f"{spec.name}: backend {name!r} is unavailable: msa_fast has no {name} "
                           f"implementation of {spec.name}")
    reason = _reason(spec.name, name, x.device)
    if reason is not None:
        raise RuntimeError(f"{spec.name}: backend {name!r} is unavailable: {reason}")
    if x.dtype not in f.dtypes:
        raise ValueError(f"{spec.name}: backend {name!r} takes dtypes {[str(d) for d in f.dtypes]}, got "
                         f"{x.dtype}; use backend='eager' or 'auto' (which runs {x.dtype} on the reference)")
    why = f.limit(*args) if f.limit is not None else None
    if why is not None:
        raise RuntimeError(f"{spec.name}: backend {name!r} {why}; use backend='eager'")
    return f


def _self_checking(spec: OpSpec, x: torch.Tensor, name: str) -> Fused | None:
    """The backend to run on a first argument ``x`` (a tensor) when it is one that checks
    its own arguments and the choice needs nothing the check would vouch for: the
    ``compile`` backend, asked for or first in the ``auto`` order, and ``x`` of a dtype it
    takes. Else ``None``."""
    if name == "auto":
        if AUTO_ORDER.get((spec.name, x.device.type), ("eager",))[0] != "compile":
            return None
    elif name != "compile":
        return None
    f = spec.compiled
    if f is None or x.dtype not in f.dtypes or _reason(spec.name, "compile", x.device) is not None:
        return None
    return f


# (op, backend name, dtype, device type, auto order) -> _self_checking's answer: that
# answer is fixed for a process given these (availability does not change), and the
# lookup costs a third of computing it
_SELF_CHECKING: dict[tuple, Fused | None] = {}


def dispatch(spec: OpSpec, args: tuple, backend: str | None):
    """Run op ``spec`` on positional ``args``: autocast, check, choose the backend, run.

    The ``compile`` backend checks inside its graph (:func:`compiled_reference`): outside
    autocast, when it is the pick, it is called straight away, as the user's own
    ``torch.compile`` of the reference would be. Each microsecond counts there: these ops
    take 50-250 us, and the checks and choice cost 15-25 us in Python."""
    x = args[0] if args else None
    if spec.composite is not None:
        spec.check(*args)
        try:
            resolve(spec.composite_of, backend, x.device)
        except RuntimeError as err:  # named after this op, not the one it is built of
            raise RuntimeError(f"{spec.name}: {str(err).split(': ', 1)[1]}") from None
        return spec.composite(*args, backend)
    if isinstance(x, torch.Tensor) and not torch._C._is_any_autocast_enabled():
        name = backend if backend is not None else _default
        dev = x.device.type
        key = (spec.name, name, x.dtype, dev, AUTO_ORDER.get((spec.name, dev)))
        f = _SELF_CHECKING.get(key, False)
        if f is False:
            f = _SELF_CHECKING[key] = _self_checking(spec, x, name)
        if f is not None:
            return f.run(*args)
    args = _autocast(spec, tuple(args))
    spec.check(*args)
    f = choose(spec, args, backend)
    return spec.reference(*args) if f is None else f.run(*args)


def public_op(spec: OpSpec, module: str, doc: str,
              extra: dict[str, tuple[Any, str]] | None = None) -> Callable[..., Any]:
    """The public function of op ``spec`` (defined in ``module``, docstring ``doc``): the
    reference's parameters, then the keyword-only ``extra`` ones (name -> ``(default,
    annotation)``, passed after the reference's arguments) and
    ``backend=None``, running :func:`dispatch`. The parameter list is written once, in the
    reference (the executable spec); this function is generated from it, as ``dataclasses``
    generates ``__init__``, so that a call costs nothing over calling :func:`dispatch`
    directly (a ``Signature.bind`` would cost ~5 us a call), and ``help()`` / ``inspect``
    show the reference's parameters, defaults and annotations."""
    P = inspect.Parameter
    ref = inspect.signature(spec.reference)
    params = list(ref.parameters.values())
    if any(p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD, P.POSITIONAL_ONLY) for p in params):
        raise TypeError(f"{spec.name}: the reference must take plain named parameters")
    params += [P(name, P.KEYWORD_ONLY, default=default, annotation=ann)
               for name, (default, ann) in (extra or {}).items()]
    params.append(P("backend", P.KEYWORD_ONLY, default=None, annotation="str | None"))
    text, defaults, star = [], {}, False
    for prm in params:
        if prm.kind is P.KEYWORD_ONLY and not star:
            text.append("*")
            star = True
        if prm.default is P.empty:
            text.append(prm.name)
        else:
            defaults[f"_default_{prm.name}"] = prm.default
            text.append(f"{prm.name}=_default_{prm.name}")
    names = ", ".join(prm.name for prm in params[:-1])
    source = (f"def {spec.name}({', '.join(text)}):\n"
              f"    return _dispatch(_spec, ({names},), backend)\n")
    namespace = {"_dispatch": dispatch, "_spec": spec, **defaults}
    exec(compile(source, f"<msa_fast.ops.{spec.name}>", "exec"), namespace)  # noqa: S102 - our own text
    fn = namespace[spec.name]
    fn.__signature__ = ref.replace(parameters=params)
    fn.__annotations__ = {**spec.reference.__annotations__, **{prm.name: prm.annotation for prm in params
                                                                if prm.annotation is not P.empty}}
    fn.__doc__, fn.__module__, fn.__qualname__ = doc, module, spec.name
    return fn


def backend_table() -> str:
    """The README's backend table, from the descriptors.

    Every op declares itself when :mod:`msa_fast.ops` is imported, and no one can reach this
    module without that: importing ``msa_fast._backend`` runs the package's ``__init__``,
    which imports ``msa_fast.ops`` (``_backend`` itself imports nothing above it). Rows
    follow the ops' modules in name order (``ops/attention.py``, ``ops/contrastive.py``, ...,
    the module of each op's check), then declaration order within one: not the order the
    modules happen to be imported in, which one op importing another changes."""

    def cell(spec: OpSpec, backend: str) -> str:
        f = spec.implementation(backend)
        if f is None:
            return "-"
        dts = "/".join({torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                        torch.float64: "fp64"}[d] for d in f.dtypes)
        return f"{dts}" + (f"; {f.limit_doc}" if f.limit_doc else "")

    from msa_fast._auto_order import MEASURED

    rows = ["| op | eager | cpp | cuda | triton | sdpa | compile | `auto` on CPU | `auto` on GPU |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, spec in sorted(SPECS.items(), key=lambda item: item[1].check.__module__):
        order = {dev: " > ".join(AUTO_ORDER[(name, dev)]) + ("" if name in MEASURED.get(dev, {}) else " (declared)")
                 for dev in ("cpu", "cuda")}
        cells = " | ".join(cell(spec, b) for b in ("cpp", "cuda", "triton", "sdpa", "compile"))
        rows.append(f"| `{name}` | any dtype | {cells} | {order['cpu']} | {order['cuda']} |")
    return "\n".join(rows)
