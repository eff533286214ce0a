"""Compile gate (contract §9): every Triton kernel the public ops launch, compiled for real GPUs.

The interpreter (``TRITON_INTERPRET=1``, how the tests run Triton on the CPU) accepts
what a GPU compile rejects -- non-constexpr globals, loop-carried type changes -- and
cannot show register spills or shared memory. This script closes that gap with no GPU:

1. **Capture** (a child process with ``TRITON_INTERPRET=1``): the public ops
   (``msa_fast.ops.*``, ``backend="triton"``) run forward and backward at the shapes of
   the benchmarks (``benchmarks/ops/bench_*.py`` ``SHAPES``, plus mining at MOSI / MOSEI
   size and attention at Dh = 128, 96 and 48) in fp32 / fp16 / bf16, with the interpreter's launch
   intercepted: each launch is recorded (kernel, arguments, constexprs, grid, warps)
   and skipped, so that no kernel is interpreted and the large shapes cost nothing.
2. **Compile** (this process, no interpreter): each distinct launch goes through
   Triton's own argument specialisation and ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", cap, 32))`` for ``sm_90a`` and ``sm_80``; the PTX is fed to
   the ``ptxas`` inside the Triton wheel with ``-v`` for registers, spills and shared
   memory; ``wgmma`` and TF32 MMA instructions are looked up in the PTX.
3. **CUDA sources**: ``csrc/cuda/*.cu`` with ``nvcc -Xptxas -v`` for every arch of
   ``setup.py``'s ``DEFAULT_CUDA_ARCHS`` -- read from the extension's build log
   (``--cuda-log build.log``: setup.py passes ``-Xptxas=-v``, so CI compiles once), or
   compiled here (skipped with a note when nvcc or a CUDA build of torch is missing;
   ``--no-cuda`` skips it).

It fails (exit 1) on a compile error, a spill in a 16-bit kernel, more than 1 KiB of
spill per thread in an fp32 kernel, shared memory over the arch's limit, an fp32
kernel using TF32, or a grid axis over its hardware limit (y and z: 65,535), and
writes ``benchmarks/results/compile_gate.{json,md}``: one row per kernel x dtype x
shape x arch with registers, spills, shared memory and wgmma.

    python tools/compile_gate.py [--quick] [--archs 90,80] [--jobs 2] [--out DIR] [--no-cuda | --cuda-log LOG]

``--quick``: the first shape of each op and sm_90a only (the test suite's smoke).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# Per-block shared memory a kernel may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}
FP32_SPILL_LIMIT = 1024  # bytes per thread
GRID_LIMIT = (2**31 - 1, 65_535, 65_535)
DTYPES = ("float32", "float16", "bfloat16")


# --------------------------------------------------------------------------- #
# 1. capture (child process, TRITON_INTERPRET=1)
# --------------------------------------------------------------------------- #


def _cases(quick: bool, ops: set[str] | None = None):
    """``(op, case label, build, shape)``: the benchmark builders at their shapes."""
    from benchmarks.ops import (
        bench_attention,
        bench_contrastive,
        bench_dual_gate,
        bench_gap,
        bench_layer_norm,
        bench_pair_mining,
    )

    groups = [
        # "limit_*": the widest input each op's triton descriptor takes (its Fused.limit), so
        # that every width auto can hand the kernels is compiled here
        ("dual_gate", {**bench_dual_gate.SHAPES, "limit_m4_d1024": (64, 4, 1024, 7),
                       "limit_m4_c1024": (64, 4, 8, 1024)}, bench_dual_gate.build),
        ("gated_attention_pool", bench_gap.SHAPES, bench_gap.build),
        ("add_layer_norm", {**bench_layer_norm.SHAPES, "limit_d2048": (8, 16, 2048)}, bench_layer_norm.build),
        # head dims between the benchmarks' powers of two: DP pads 48 -> 64 and 96 -> 128, so
        # they must compile as the Dh = 64 / 128 kernels do (their masked lanes included)
        ("attention", {**bench_attention.SHAPES, "mosei_self_dh96": (32, 4, 500, 500, 96),
                       "mosei_self_dh48": (32, 8, 500, 500, 48)}, bench_attention.build),
        ("mine_pairs", {"mosi_n1284_d256_k10": (1284, 256, 10), "mosei_n16326_d877_k10": (16326, 877, 10),
                        "mosei_n16326_d877_k50": (16326, 877, 50)}, bench_pair_mining.build),
    ]
    for op, (build, _traffic, shapes) in bench_contrastive.OPS.items():
        groups.append((op, {**shapes, "limit_d1024": (32, 10, 1024)}, build))
    for op, shapes, build in groups:
        if ops and op not in ops:
            continue
        items = list(shapes.items())[:1] if quick else list(shapes.items())
        for label, shape in items:
            yield op, label, build, shape


def _encode(v):
    import torch

    if isinstance(v, torch.Tensor):
        return {"tensor": str(v.dtype).replace("torch.", ""), "align16": v.data_ptr() % 16 == 0}
    if v is None or isinstance(v, (bool, int, float, str)):
        return {"value": v}
    if hasattr(v, "value") and type(v).__name__ == "constexpr":
        return {"value": v.value}
    raise TypeError(f"cannot record a kernel argument of type {type(v).__name__}")


def capture(quick: bool, path: str, ops: set[str] | None = None) -> None:
    """Run the public ops with every interpreted launch recorded and skipped; write JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "capture needs TRITON_INTERPRET=1"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    state = {"op": None, "case": None, "dtype": None, "pass": None}

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        g = grid(kwargs) if callable(grid) else grid
        params = list(inspect.signature(self.fn).parameters.values())
        launches.append({**state, "kernel": f"{self.fn.__module__}:{self.fn.__qualname__}",
                         "args": [_encode(a) for a in args],
                         "constexpr": ["constexpr" in str(p.annotation) for p in params[:len(args)]],
                         "kwargs": {k: _encode(v) for k, v in kwargs.items()},
                         "grid": [int(x) for x in (tuple(g) + (1, 1))[:3]]})
        return None

    InterpretedFunction.run = run
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for op, label, build, shape in _cases(quick, ops):
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            state.update(op=op, case=label, dtype=dtype_name, **{"pass": "forward"})
            inputs, call = build(shape, torch.device("cpu"), dtype)
            out = call("triton")()
            outs = [o for o in (out if isinstance(out, tuple) else (out,))
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            if outs:
                state["pass"] = "backward"
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            del inputs, out, outs

    from msa_fast._io import save_json

    save_json(path, launches, indent=None)


# --------------------------------------------------------------------------- #
# 2. compile (no interpreter)
# --------------------------------------------------------------------------- #


def _canonical_int(v: int) -> int:
    """An int with the same Triton specialisation as ``v`` (1, multiple of 16, i32 / i64)."""
    if v == 1 or v == 0:
        return v
    big = not (-(2**31) <= v < 2**31)
    if v % 16 == 0:
        return 2**36 if big else 16
    return 2**36 + 1 if big else 17


def _key(launch: dict) -> str:
    def canon(e):
        if "value" in e and isinstance(e["value"], int) and not isinstance(e["value"], bool):
            return {"value": _canonical_int(e["value"])}
        if "value" in e and isinstance(e["value"], float):
            return {"value": 0.5}
        return e

    # constexprs (keyword or positional) are kept as they are: they shape the kernel
    args = [a if const else canon(a) for a, const in zip(launch["args"], launch["constexpr"])]
    return json.dumps([launch["kernel"], args, sorted(launch["kwargs"].items())])


def _decode(e, fn_param_is_constexpr: bool):
    import torch

    if "tensor" in e:
        t = torch.empty(64, dtype=getattr(torch, e["tensor"]))
        return t if e["align16"] else t[1:]
    v = e["value"]
    if isinstance(v, int) and not isinstance(v, bool) and not fn_param_is_constexpr:
        return _canonical_int(v)
    return v


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def _ptxas_stats(ptx: str, arch: str, ptxas: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {log[-2000:]}")
    out = {}
    for name, rx in _PTXAS_RE.items():
        m = rx.search(log)
        out[name] = int(m.group(1)) if m else 0
    return out


def compile_one(launch: dict, cap: int) -> dict:
    """Compile one recorded launch for compute capability ``cap``; stats or an error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    module, name = launch["kernel"].split(":")
    fn = getattr(importlib.import_module(module), name)
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    params = fn.params
    args = [_decode(e, p.is_constexpr) for e, p in zip(launch["args"], params)]
    kwargs = {k: _decode(v, True) for k, v in launch["kwargs"].items()}
    arch = f"sm_{cap}a" if cap in (90, 100) else f"sm_{cap}"
    row = {"arch": arch}
    t0 = time.time()
    try:
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(fn.signature, params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        src = ASTSource(fn, signature, constexprs, attrs)
        kernel = triton.compile(src, target=target, options=options.__dict__)
        ptx = kernel.asm["ptx"]
        from triton.backends.nvidia.compiler import get_ptxas

        stats = _ptxas_stats(ptx, arch, get_ptxas(cap).path)
        mma_lines = [ln for ln in ptx.splitlines() if "mma" in ln]
        row.update(stats, shared=int(kernel.metadata.shared), num_warps=int(kernel.metadata.num_warps),
                   num_stages=int(kernel.metadata.num_stages),
                   wgmma=any("wgmma" in ln for ln in mma_lines),
                   tf32=any(".tf32" in ln for ln in mma_lines), error=None)
    except Exception as exc:  # a compile error is a gate failure, reported with the row
        # Triton chains the error of an inlined @jit helper as the cause of the caller's:
        # the innermost message is the one that names the failing line.
        inner = exc
        while inner.__cause__ is not None or inner.__context__ is not None:
            inner = inner.__cause__ or inner.__context__
        msg = f"{type(exc).__name__}: {exc}"
        if inner is not exc:
            msg = f"{msg[:700]}\n... caused by {type(inner).__name__}: {str(inner)[-800:]}"
        row["error"] = msg[:1500]
    row["compile_s"] = round(time.time() - t0, 2)
    return row


def _compile_job(launch: dict, caps: list[int]) -> list[dict]:
    return [compile_one(launch, cap) for cap in caps]


def _failures(row: dict, dtype: str, grid: list[int]) -> list[str]:
    why = []
    if row.get("error"):
        return [row["error"].splitlines()[0][:300]]
    spill = max(row["spill_stores"], row["spill_loads"])
    if dtype in ("float16", "bfloat16") and spill:
        why.append(f"{spill} B spill in a 16-bit kernel")
    if dtype == "float32" and spill > FP32_SPILL_LIMIT:
        why.append(f"{spill} B spill > {FP32_SPILL_LIMIT} B in an fp32 kernel")
    cap = int(re.sub(r"\D", "", row["arch"]))
    smem = row["shared"] + row["static_smem"]
    if smem > SMEM_LIMIT[cap]:
        why.append(f"shared memory {smem} B > {SMEM_LIMIT[cap]} B")
    if dtype == "float32" and row["tf32"]:
        why.append("TF32 MMA in an fp32 kernel (tl.dot must be IEEE for fp32)")
    for axis, (g, lim) in enumerate(zip(grid, GRID_LIMIT)):
        if g > lim:
            why.append(f"grid axis {axis} = {g} > {lim}")
    return why


# --------------------------------------------------------------------------- #
# 3. CUDA sources
# --------------------------------------------------------------------------- #


def _default_cuda_archs() -> list[str]:
    with open(os.path.join(ROOT, "setup.py")) as fh:
        m = re.search(r'DEFAULT_CUDA_ARCHS = "([^"]+)"', fh.read())
    return m.group(1).split(";")


def parse_ptxas_log(text: str) -> list[dict]:
    """``ptxas -v`` output (nvcc ``-Xptxas -v``, e.g. the extension's build log) -> one row
    per (source, arch): kernels, max registers, max spill bytes."""
    rows: dict[tuple[str, str], dict] = {}
    source, cur = "csrc/cuda/?.cu", None
    for line in text.splitlines():
        m = re.search(r"(csrc/cuda/[A-Za-z0-9_]+\.cu)", line)
        if m and not line.lstrip().startswith("ptxas"):  # the nvcc command line names the source
            source = m.group(1)
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = rows.setdefault((source, m.group(2)), {"source": source, "arch": m.group(2), "functions": 0,
                                                         "max_registers": 0, "max_spill": 0, "error": None})
            cur["functions"] += 1
            continue
        if cur is None:
            continue
        for rx in (r"(\d+) bytes spill stores", r"(\d+) bytes spill loads"):
            m = re.search(rx, line)
            if m:
                cur["max_spill"] = max(cur["max_spill"], int(m.group(1)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["max_registers"] = max(cur["max_registers"], int(m.group(1)))
    for row in rows.values():
        if row["max_spill"]:
            row["error"] = f"{row['max_spill']} B register spill"
    return list(rows.values())


def cuda_sources_check(log: str | None = None) -> tuple[list[dict], str | None]:
    """Registers and spills of every ``csrc/cuda/*.cu`` kernel for every default arch:
    read from ``log`` (a build log of ``setup.py``, whose nvcc flags include
    ``-Xptxas=-v``), else from one ``nvcc -Xptxas -v`` run per source."""
    archs = [f"sm_{a.replace('+PTX', '').replace('.', '')}" for a in _default_cuda_archs()]
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if log is not None:
        with open(log, errors="replace") as fh:
            rows = parse_ptxas_log(fh.read())
    else:
        nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        if not os.path.exists(nvcc):
            return [], "nvcc not found: CUDA sources not checked"
        import torch
        from torch.utils import cpp_extension

        if torch.version.cuda is None:
            return [], f"torch {torch.__version__} is not a CUDA build: CUDA sources not checked"
        includes = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
        includes.append(f"-I{os.path.join(ROOT, 'csrc')}")
        for site in sys.path:
            p = os.path.join(site, "nvidia", "cu13", "include")
            if os.path.isdir(p):
                includes.append(f"-I{p}")
        gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
        rows = []
        for src in sources:
            cmd = [nvcc, "-c", os.path.join(ROOT, src), "-o", os.devnull, "-O3", "-std=c++20",
                   *gencode, "-Xptxas", "-v", "-DMSA_FAST_WITH_CUDA=1", *includes]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            got = parse_ptxas_log(f"{src}\n" + proc.stdout + proc.stderr)
            if proc.returncode:
                got.append({"source": src, "arch": "all", "functions": 0, "max_registers": 0, "max_spill": 0,
                            "error": (proc.stdout + proc.stderr)[-1500:]})
            rows += got
    for src in sources:  # every source, every default arch, must have been compiled
        for arch in archs:
            if not any(r["source"] == src and r["arch"] == arch for r in rows):
                rows.append({"source": src, "arch": arch, "functions": 0, "max_registers": 0, "max_spill": 0,
                             "error": "not compiled for this arch (missing from the ptxas output)"})
    for row in rows:
        print(f"  {row['source']} {row['arch']}: {row['functions']} kernels, <= {row['max_registers']} registers, "
              f"spill {row['max_spill']} B" + (f"  FAIL {row['error'][:200]}" if row["error"] else ""), flush=True)
    return rows, None


# --------------------------------------------------------------------------- #
# driver
# --------------------------------------------------------------------------- #


def _markdown(rows: list[dict], cuda_rows: list[dict], env: dict) -> str:
    lines = [f"# Compile gate ({env['triton']} Triton, {env['when']})", "",
             "Every Triton kernel launched by the public ops, compiled with no GPU "
             "(`python tools/compile_gate.py`). Spills and registers are per thread "
             "(`ptxas -v`), shared memory per block (Triton's allocation + static).", "",
             "| op | case | dtype | pass | kernel | arch | regs | spill B | smem B | wgmma | warps | stages | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = "ok" if not r["failures"] else "FAIL: " + "; ".join(r["failures"])
        if r.get("error"):
            lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['pass']} | {r['kernel']} | {r['arch']} "
                         f"| - | - | - | - | - | - | {status} |")
            continue
        lines.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['pass']} | {r['kernel']} | {r['arch']} "
                     f"| {r['registers']} | {max(r['spill_stores'], r['spill_loads'])} | "
                     f"{r['shared'] + r['static_smem']} | {'yes' if r['wgmma'] else 'no'} | {r['num_warps']} "
                     f"| {r['num_stages']} | {status} |")
    if cuda_rows:
        lines += ["", "CUDA sources (`nvcc -Xptxas -v`):", "",
                  "| source | arch | functions | max regs | max spill B | status |", "|---|---|---|---|---|---|"]
        for r in cuda_rows:
            lines.append(f"| {r['source']} | {r['arch']} | {r['functions']} | {r['max_registers']} "
                         f"| {r['max_spill']} | {'ok' if not r['error'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="first shape per op, sm_90a only")
    parser.add_argument("--archs", default=None, help="compute capabilities, default 90,80 (quick: 90)")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--out", default=RESULTS, help="folder of compile_gate.{json,md}")
    parser.add_argument("--no-cuda", action="store_true", help="skip the check of csrc/cuda")
    parser.add_argument("--cuda-log", default=None,
                        help="read the CUDA kernels' ptxas -v output from this build log instead of running nvcc")
    parser.add_argument("--ops", default=None, help="comma-separated public ops (default: all)")
    parser.add_argument("--capture", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.capture:
        capture(args.quick, args.capture, set(args.ops.split(",")) if args.ops else None)
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        # the kernels must be decorated as real JIT functions in this process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, *sys.argv], env=env, check=False).returncode
    caps = [int(c) for c in (args.archs or ("90" if args.quick else "90,80")).split(",")]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--capture", path] + (["--quick"] if args.quick else [])
        cmd += ["--ops", args.ops] if args.ops else []
        subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, check=True)
        with open(path) as fh:
            launches = json.load(fh)
    unique: dict[str, dict] = {}
    for launch in launches:
        unique.setdefault(_key(launch), launch)
    print(f"captured {len(launches)} launches in {time.time() - t0:.0f} s, {len(unique)} distinct; "
          f"compiling for {', '.join(f'sm_{c}' for c in caps)} with {args.jobs} jobs", flush=True)
    compiled: dict[str, list[dict]] = {}
    with cf.ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(_compile_job, launch, caps): key for key, launch in unique.items()}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            compiled[futures[fut]] = fut.result()
            if i % 10 == 0 or i == len(futures):
                print(f"  compiled {i}/{len(futures)} ({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for launch in launches:
        for stats in compiled[_key(launch)]:
            row = {k: launch[k] for k in ("op", "case", "dtype", "pass", "grid")}
            row["kernel"] = launch["kernel"].split(":")[1]
            row.update(stats)
            row["failures"] = _failures(stats, launch["dtype"], launch["grid"])
            rows.append(row)
    # one row per distinct (op, case, dtype, pass, kernel, arch): a kernel launched twice
    # with the same specialisation (e.g. per layer) is one row
    dedup = {}
    for r in rows:
        dedup.setdefault((r["op"], r["case"], r["dtype"], r["pass"], r["kernel"], r["arch"],
                          json.dumps(r["grid"])), r)
    rows = list(dedup.values())
    cuda_rows, cuda_note = ([], "skipped (--no-cuda)") if args.no_cuda else cuda_sources_check(args.cuda_log)
    import triton

    env = {"triton": triton.__version__, "when": time.strftime("%Y-%m-%d"), "archs": [f"sm_{c}" for c in caps],
           "quick": args.quick, "seconds": round(time.time() - t0, 1), "cuda_note": cuda_note}
    bad = [r for r in rows if r["failures"]] + [r for r in cuda_rows if r["error"]]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "compile_gate" + ("_quick" if args.quick else ""))
    from msa_fast._io import save_json  # here, not at import: the gate's import loads no msa_fast

    save_json(stem + ".json", {"env": env, "triton_kernels": rows, "cuda_sources": cuda_rows, "failures": len(bad)},
              indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(_markdown(rows, cuda_rows, env))
    for r in bad:
        where = r.get("source") or f"{r['op']} {r['case']} {r['dtype']} {r['pass']} {r['kernel']}"
        print(f"FAIL {where} {r['arch']}: {'; '.join(r.get('failures') or [str(r.get('error'))[:300]])}")
    print(f"{len(rows)} kernel rows, {len(cuda_rows)} CUDA rows, {len(bad)} failing; "
          f"{time.time() - t0:.0f} s; wrote {stem}.json and .md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
