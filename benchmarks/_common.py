"""Shared helpers of the benchmarks (contract §8): timing, memory, environment, JSON, plots.

GPU timing uses CUDA events through ``triton.testing.do_bench`` (median, ms); CPU
timing uses ``torch.utils.benchmark.Timer.blocked_autorange`` (median, ms). Peak
memory is ``torch.cuda.max_memory_allocated`` above the inputs on a GPU; on the CPU
it is not measured per call (``None``) -- see ``ops/bench_pair_mining.py`` for RSS.
Files are written through :mod:`msa_fast._io` (``save_json``: atomic; ``figure``: one PNG);
``RESULTS`` is ``benchmarks/results/`` wherever the script runs from.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Callable

import torch
import torch._functorch.config as functorch_config

from msa_fast._io import figure, have_matplotlib, save_json

# The backward timing replays one saved graph (``retain_graph=True``); torch.compile's
# donated buffers free the saved activations after the first backward, which makes a
# replay fail once the graph is recompiled for a new shape. Timing is unaffected.
functorch_config.donated_buffer = False

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def environment(device: torch.device) -> dict:
    """Device name, versions and git commit recorded with every result file."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), check=False).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {"device": name, "device_type": device.type, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version, "python": sys.version.split()[0],
            "commit": commit or None}


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils import benchmark

    fn()  # warm-up (and torch.compile's first call)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=0.5).median * 1e3)


def peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated by one call of ``fn`` above what was live before (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 28) -> float | None:
    """Measured device-to-device copy bandwidth (read + write), the roofline of memory-bound ops."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def fwd_bwd_callables(forward: Callable[[], torch.Tensor | tuple], inputs: list[torch.Tensor]):
    """``(fwd, bwd, fwd_bwd)`` callables; ``bwd`` replays the backward of one saved forward."""

    def as_tuple(out):
        return out if isinstance(out, tuple) else (out,)

    def grads_for(outs):
        return [torch.ones_like(o) if o.is_floating_point() and o.requires_grad else None for o in outs]

    def fwd():
        with torch.no_grad():
            return forward()

    def fwd_bwd():
        outs = [o for o in as_tuple(forward()) if o.requires_grad]
        torch.autograd.backward(outs, grads_for(outs))
        for t in inputs:
            t.grad = None

    state = {}

    def bwd():
        if "outs" not in state:
            state["outs"] = [o for o in as_tuple(forward()) if o.requires_grad]
        outs = state["outs"]
        torch.autograd.backward(outs, grads_for(outs), retain_graph=True)
        for t in inputs:
            t.grad = None

    return fwd, bwd, fwd_bwd


def measure(provider_fn: Callable[[], torch.Tensor | tuple], inputs: list[torch.Tensor],
            device: torch.device) -> dict:
    """Median ms of forward, backward and forward+backward, and peak MB of forward+backward."""
    fwd, bwd, fwd_bwd = fwd_bwd_callables(provider_fn, inputs)
    return {"fwd_ms": time_ms(fwd, device), "bwd_ms": time_ms(bwd, device),
            "fwd_bwd_ms": time_ms(fwd_bwd, device), "peak_mb": peak_mb(fwd_bwd, device)}


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def providers_for(device: torch.device, fused: tuple[str, ...] = ("triton",)) -> tuple[list[str], str | None]:
    """Providers runnable on ``device``, and a note on those that are not."""
    names = ["eager", "torch.compile"]
    if device.type == "cuda":
        return names + list(fused), None
    return names, f"{'/'.join(fused)} needs a CUDA GPU: only the CPU providers were run"


def write(name: str, payload: dict, out: str | None) -> str:
    """Write ``payload`` as JSON (to ``out`` or ``benchmarks/results/<name>_<device>.json``)."""
    path = out or os.path.join(RESULTS, f"{name}_{payload['env']['device_type']}.json")
    save_json(path, payload)
    print(f"wrote {path}")
    return path


def plot(payload: dict, path_json: str, metric: str = "fwd_bwd_ms") -> str | None:
    """One grouped bar chart per op: ``metric`` per shape and provider, next to the JSON."""
    if not have_matplotlib():
        return None
    rows = payload["results"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    png = os.path.splitext(path_json)[0] + ".png"
    with figure(png, figsize=(max(6, 1.6 * len(shapes)), 4)) as (_, ax):
        width = 0.8 / max(1, len(providers))
        for i, prov in enumerate(providers):
            # a row that recorded an error has no timing: its bar is left empty
            vals = [next((r.get(metric) for r in rows if r["shape"] == s and r["provider"] == prov), 0) or 0
                    for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=15, fontsize=8)
        ax.set_ylabel(f"{metric} (median)")
        ax.set_title(f"{payload['op']} on {payload['env']['device']}", fontsize=9)
        ax.legend(fontsize=8)
    return png


def cli(description: str):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--quick", action="store_true", help="smallest shape only (CI smoke)")
    parser.add_argument("--shapes", default=None, help="comma-separated shape labels to run (default: all)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<op>_<device>.json)")
    parser.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                        help="run only these providers (e.g. eager triton sdpa: no torch.compile "
                             "warm-up on a lent GPU's minutes); default: every runnable one")
    return parser


def select_providers(runnable: list[str], extra: list[str], wanted: list[str] | None) -> set[str]:
    """The providers ``--providers`` keeps: a name neither runnable here nor an extra provider
    is an error; a known one this device cannot run (triton on a CPU) is dropped with the rest."""
    # every provider name some benchmark has: gpu_check passes one list to all of them
    known = {"eager", "torch.compile", "triton", "cuda", "cpp", "compile", "sdpa", *runnable, *extra}
    if wanted is None:
        return set(runnable) | set(extra)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; known: {sorted(known)}")
    return set(wanted)


def run_op(op: str, shapes: dict[str, tuple], build: Callable, args, *,
           traffic: Callable | None = None, flops: Callable | None = None,
           extra_providers: dict[str, Callable] | None = None, skip: tuple[str, ...] = ()) -> dict:
    """Benchmark one op over ``shapes`` for every runnable provider and write JSON + PNG.

    ``build(shape, device, dtype) -> (inputs, call)`` where ``call(backend)`` returns a
    zero-argument function running the op on ``inputs`` with that backend.
    ``traffic(shape, dtype) -> (fwd_bytes, bwd_bytes)`` adds GB/s and the fraction of
    the measured copy bandwidth; ``flops(shape) -> (fwd, bwd)`` adds TFLOP/s.
    ``extra_providers`` maps a name to ``(inputs, call) -> fn`` (e.g. SDPA).
    ``skip`` names providers not to run (said in the JSON's note).
    """
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    providers, note = providers_for(device)
    keep = select_providers(providers, list(extra_providers or {}), getattr(args, "providers", None))
    skip = tuple(skip) + tuple(p for p in [*providers, *(extra_providers or {})] if p not in keep)
    if skip:
        providers = [p for p in providers if p not in skip]
        extra_providers = {k: v for k, v in (extra_providers or {}).items() if k not in skip}
        note = "; ".join(filter(None, [note, f"not run on request: {', '.join(skip)}"]))
    copy_bw = copy_bandwidth_gbs(device)
    env = environment(device)
    results = []
    items = list(shapes.items())[:1] if args.quick else list(shapes.items())
    if getattr(args, "shapes", None):
        wanted = args.shapes.split(",")
        unknown = [w for w in wanted if w not in shapes]
        if unknown:
            raise SystemExit(f"--shapes: unknown labels {unknown}; known: {list(shapes)}")
        items = [(label, shape) for label, shape in items if label in wanted]
    payload = {"op": op, "env": env, "copy_bandwidth_gbs": copy_bw, "note": note, "results": results}
    for label, shape in items:
        inputs, call = build(shape, device, dtype)
        runners = {}
        for prov in providers:
            if prov == "torch.compile":
                runners[prov] = torch.compile(call("eager"), fullgraph=True)
            else:
                runners[prov] = call(prov)
        for name, make in (extra_providers or {}).items():
            runners[name] = make(inputs, call)
        for prov, fn in runners.items():
            row = {"shape": label, "dims": list(shape), "provider": prov, "dtype": str(dtype).replace("torch.", "")}
            try:
                row.update(measure(fn, inputs, device))
            except Exception as exc:  # a provider that cannot run this shape is recorded, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                results.append(row)
                print(f"{op} {label} {prov}: {row['error']}")
                continue
            if traffic is not None:
                fb, bb = traffic(shape, dtype)
                row["fwd_gbs"] = fb / (row["fwd_ms"] * 1e-3) / 1e9
                row["bwd_gbs"] = bb / (row["bwd_ms"] * 1e-3) / 1e9
                if copy_bw:
                    row["fwd_frac_copy_bw"] = row["fwd_gbs"] / copy_bw
                    row["bwd_frac_copy_bw"] = row["bwd_gbs"] / copy_bw
            if flops is not None:
                ff, bf = flops(shape)
                row["fwd_tflops"] = ff / (row["fwd_ms"] * 1e-3) / 1e12
                row["bwd_tflops"] = bf / (row["bwd_ms"] * 1e-3) / 1e12
            results.append(row)
            print(f"{op:>22} {label:>14} {prov:>14}: fwd {row['fwd_ms']:.3f} ms  bwd {row['bwd_ms']:.3f} ms"
                  f"  fwd+bwd {row['fwd_bwd_ms']:.3f} ms", flush=True)
        write(op, payload, args.out)  # after every shape: an interrupted run keeps what it measured
    for label, _ in items:
        base = next((r for r in results if r["shape"] == label and r["provider"] == "eager" and "error" not in r), None)
        for r in results:
            if base and r["shape"] == label and "error" not in r:
                r["speedup_vs_eager_fwd_bwd"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    if note:
        print(note)
    path = write(op, payload, args.out)
    plot(payload, path)
    return payload
