"""Benchmark of ``mine_pairs`` (contract §3.4, 8): eager (one call and chunked), torch.compile, cpp, triton, cuda.

Shapes: ``N`` in {1,284 (MOSI train); 16,326 (MOSEI train); 100,000}, ``D`` in
{256, 877 (the FD-CMDIE fused feature width)}, ``k`` in {10, 50}; every row of
the data set is a query (``Q = N``). Labels are ``sentiment_classes(y, "7")`` of
uniform regression labels ``y`` in [-3, 3]; features standard normal fp32.

Providers (each skipped, with the reason recorded, where it cannot or should not run):

* ``eager``: the reference in one call; it materialises the ``Q x N`` matrix, so it
  runs only where that matrix is <= 256 MiB (N = 1,284; at N = 16,326 it is
  1 GiB and the call peaks at 5.3 GB, 40 s on one core);
* ``eager-chunked``: :func:`msa_fast.ops.mine_pairs_chunked` with the eager
  backend, ``--chunk`` queries per call (``chunk x N`` similarities at a time);
* ``torch.compile``: the same chunked loop over ``torch.compile(reference.mine_pairs)``
  (compiled once per process before timing; the compile time is recorded);
* ``cpp``: the C++ kernel (CPU only; on a CPU with AVX512-BF16 and a MOSEI-sized call its
  bf16 screen with exact fp32 rescoring); ``cpp-fp32``: the same kernel with the screen
  off (``MSA_FAST_MINING_SCREEN=never``: the fp32 pass); ``triton``, ``cuda``: the fused GPU kernels
  (GPU only: on a CPU-only machine they are listed as skipped).

Every (provider, shape) runs in a fresh subprocess so that its memory is its own.
Time: median of ``--repeats`` calls (``time.perf_counter``, synchronised on a
GPU), after a warm-up call; at least 7 calls when one takes < 0.2 s, a single
one when it takes > 10 s on a CPU. ``TFLOP/s`` = ``2 Q N D / t`` (the nominal similarity
GEMM; ``cpp`` multiplies only half of it when the queries are the rows).
Peak memory: on the CPU, the peak RSS (``VmHWM``, high-water mark reset before
each call) minus the RSS just before the call, the minimum over the calls, with
glibc's mmap threshold fixed at 64 KiB so that freed buffers leave the RSS; on
a GPU, ``torch.cuda.max_memory_allocated`` above the live memory before the call.
Correctness: 256 query rows spread over the data set are checked against the
reference run on just those rows (``queries`` / ``query_index`` sharding):
indices equal except at similarity ties (within 1e-6), similarities within 1e-5.

On a CPU, the grid is cut to what is affordable: at N = 100,000 only ``cpp`` at
D = 256, k = 50 runs by default (``--all-large`` for the rest); an eager pass
there is ~5 TFLOP plus a top-k over 10^10 entries.

    python benchmarks/ops/bench_pair_mining.py --threads 1      # CPU run, ~13 min on 1 core
    python benchmarks/ops/bench_pair_mining.py --device cuda    # GPU run
    python benchmarks/ops/bench_pair_mining.py --quick          # CI smoke, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

import torch

from benchmarks._common import RESULTS, environment
from msa_fast._io import figure, have_matplotlib, save_json

SEED = 0
TIE_TOL = 1e-6
SIM_TOL = 1e-5
CHECK_ROWS = 256
NS = (1284, 16326, 100_000)
DS = (256, 877)
KS = (10, 50)
PROVIDERS = ("eager", "eager-chunked", "torch.compile", "cpp", "cpp-fp32", "triton", "cuda")


def make_inputs(n: int, d: int, device: str = "cpu", seed: int = SEED, dtype: str = "float32"):
    from msa_fast.ops import sentiment_classes

    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g)
    y = torch.rand(n, generator=g) * 6 - 3
    return features.to(device=device, dtype=getattr(torch, dtype)), sentiment_classes(y, "7").to(device)


def build(shape, device, dtype):
    """``(inputs, call)`` in the op benchmarks' protocol (``bench_auto.py``, the compile gate):
    ``shape = (N, D, k)``, features standard normal, 7 classes; ``call(backend)`` mines every row."""
    import msa_fast

    n, d, k = shape
    g = torch.Generator().manual_seed(SEED)
    features = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, 7, (n,), generator=g).to(device)

    def call(backend):
        return lambda: msa_fast.ops.mine_pairs(features, labels, k, backend=backend)

    return [], call


def check_rows(n: int) -> torch.Tensor:
    """The query rows checked against the reference: spread evenly, first and last included."""
    return torch.linspace(0, n - 1, min(CHECK_ROWS, n)).round().long().unique()


def skip_reason(provider: str, n: int, d: int, k: int, device: str, all_large: bool) -> str | None:
    """Why ``provider`` is not run on this shape and device; ``None`` when it is."""
    import msa_fast
    from msa_fast import _backend

    if provider in ("triton", "cuda") and device != "cuda":
        return f"{provider} needs a CUDA GPU (none on this machine)"
    if provider in ("cpp", "cpp-fp32") and device != "cpu":
        return "cpp runs on CPU tensors only"
    if provider in ("cpp", "cpp-fp32", "triton", "cuda"):
        why = _backend.unavailable_reason("mine_pairs", provider.removesuffix("-fp32"), torch.device(device))
        if why:
            return why
        if provider.startswith("cpp") and "mine_pairs" not in msa_fast.build_info().get("cpu_ops", []):
            return "msa_fast._C has no CPU mine_pairs"
    if provider == "eager" and n * n * 4 > 2**28:
        return (f"the reference's Q x N fp32 matrix alone is {n * n * 4 / 2**30:.1f} GiB (run where "
                "<= 256 MiB; eager-chunked is the eager baseline)")
    if device == "cpu" and n >= 100_000 and not all_large:
        if provider in ("eager-chunked", "torch.compile"):
            return (f"CPU time: ~{2 * n * n * d / 1e12:.1f} TFLOP of GEMM plus a top-k over "
                    f"{n * n:.1e} entries per call (--all-large runs it)")
        if provider.startswith("cpp") and (d, k) != (256, 50):
            return "CPU time: only D=256, k=50 at N=100,000 by default (--all-large runs it)"
    return None


def _rss_peak_mb() -> float:
    """Peak RSS of this process's address space (VmHWM), else ru_maxrss.

    ru_maxrss is not used first: on Linux it is also at least the RSS the
    process had at exec time, i.e. that of the forked parent (this benchmark's
    driver, which holds result tensors), and /proc/self/clear_refs cannot reset it.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_rss_peak() -> bool:
    """Reset the peak-RSS high-water mark (Linux >= 4.0): otherwise a transient
    peak of the imports (shared libraries mapped and touched) hides the call's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- #
# Worker: one provider on one shape, in its own process
# --------------------------------------------------------------------------- #


def make_call(provider: str, features, labels, k: int, chunk: int):
    """A zero-argument function running ``provider`` on the whole data set."""
    import msa_fast
    from msa_fast.ops import reference

    if provider == "eager":
        return lambda: reference.mine_pairs(features, labels, k)
    if provider == "eager-chunked":
        return lambda: msa_fast.ops.mine_pairs_chunked(features, labels, k, chunk, backend="eager",
                                                       progress=False)
    if provider == "torch.compile":
        compiled = torch.compile(reference.mine_pairs)
        n = features.shape[0]

        def call():
            outs = [[], [], [], []]
            for a in range(0, n, chunk):
                b = min(a + chunk, n)
                rows = torch.arange(a, b, device=features.device)
                part = compiled(features, labels, k, features[a:b], labels[a:b], rows)
                for lst, t in zip(outs, part):
                    lst.append(t)
            return reference.MinedPairs(*(torch.cat(lst) for lst in outs))

        return call
    if provider == "cpp-fp32":  # the fp32 pass alone: the bf16 screen switched off
        os.environ["MSA_FAST_MINING_SCREEN"] = "never"
        return lambda: msa_fast.ops.mine_pairs(features, labels, k, backend="cpp")
    return lambda: msa_fast.ops.mine_pairs(features, labels, k, backend=provider)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    device = args.device
    features, labels = make_inputs(args.n, args.d, device, dtype=args.dtype)
    call = make_call(args.provider, features, labels, args.k, args.chunk)
    gpu = device == "cuda"

    def sync():
        if gpu:
            torch.cuda.synchronize()

    # Warm-up: torch.compile needs the timed shapes (its compile time is reported
    # separately); the others a small slice, which loads the BLAS / OpenMP pools
    # and compiles Triton kernels without a full extra pass.
    t0 = time.perf_counter()
    if args.provider == "torch.compile" or gpu:
        call()
    else:
        wf, wl = features[:256].clone(), labels[:256].clone()
        make_call(args.provider, wf, wl, args.k, args.chunk)()
    sync()
    warmup_s = time.perf_counter() - t0
    times, peaks, reset, out = [], [], False, None
    repeats = args.repeats
    while len(times) < repeats:
        out = None
        sync()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset = _reset_rss_peak()
            base = _rss_now_mb() if reset else _rss_peak_mb()
        t0 = time.perf_counter()
        out = call()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) == 1 and times[0] < 0.2:
            repeats = max(repeats, 7)  # short calls: more samples for a stable median
        elif len(times) == 1 and times[0] > 10 and not gpu:
            repeats = 1  # calls of many seconds on a shared CPU: one is enough (and affordable)
        if gpu:
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            peaks.append(max(0.0, _rss_peak_mb() - base))
    rows = check_rows(args.n).to(device)
    torch.save(tuple(t[rows].cpu() for t in out), args.save)
    print(json.dumps({"times_s": times, "peak_extra_mb": min(peaks), "peak_extra_mb_per_call": peaks,
                      "warmup_s": warmup_s, "peak_reset": reset}))


def run_worker(provider: str, n: int, d: int, k: int, args, save: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--provider", provider,
           "--n", str(n), "--d", str(d), "--k", str(k), "--repeats", str(args.repeats),
           "--chunk", str(args.chunk), "--threads", str(args.threads), "--device", args.device,
           "--save", save, "--dtype", args.dtype]
    env = dict(os.environ)
    if args.device == "cpu":
        # A fixed mmap threshold: glibc then maps every buffer >= 64 KiB afresh and
        # unmaps it on free, so a call's peak RSS counts its buffers even when an
        # earlier (warm-up) call of the same shapes freed identical ones; with the
        # default dynamic threshold (up to 32 MiB) they would be recycled from the
        # heap unseen. Buffers above 32 MiB are mapped this way anyway.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {provider} N={n} D={d} k={k} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["median_s"] = statistics.median(res["times_s"])
    return res


# --------------------------------------------------------------------------- #
# Result check (the tie-aware comparison of tests/test_pair_mining.py)
# --------------------------------------------------------------------------- #


def compare(got, want, features, queries) -> dict:
    """Index mismatches outside ties, and the largest similarity difference."""
    from msa_fast.ops.reference import normalize_rows

    fn = normalize_rows(features.double())
    qn = normalize_rows(queries.double())[:, None, :]
    report = {}
    for j, name in ((0, "pos"), (2, "neg")):
        gi, gs, wi, ws = got[j], got[j + 1], want[j], want[j + 1]
        same_missing = bool(torch.equal(gi < 0, wi < 0))
        w = ws.double()
        tie = torch.zeros_like(wi, dtype=torch.bool)
        step = (w[:, 1:] - w[:, :-1]).abs() <= TIE_TOL
        tie[:, 1:] |= step
        tie[:, :-1] |= step
        # Exact fp64 similarity of the two picks: a swap with an equally similar
        # row just outside the top-k is a tie too.
        sg = (qn * fn[gi.clamp(min=0)]).sum(-1)
        sw = (qn * fn[wi.clamp(min=0)]).sum(-1)
        tie |= (sg - sw).abs() <= TIE_TOL
        mism = int(((gi != wi) & ~tie).sum())
        valid = wi >= 0
        max_diff = float((gs.double() - w).abs()[valid].max()) if valid.any() else 0.0
        report[name] = {"index_mismatches_outside_ties": mism, "tied_slots_differing": int(((gi != wi) & tie).sum()),
                        "max_sim_abs_diff": max_diff, "same_missing_slots": same_missing}
    report["equal"] = all(report[n]["index_mismatches_outside_ties"] == 0 and report[n]["same_missing_slots"]
                          and report[n]["max_sim_abs_diff"] <= SIM_TOL for n in ("pos", "neg"))
    return report


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #


def plot(payload: dict, path_json: str) -> str | None:
    if not have_matplotlib():
        return None
    rows = [r for r in payload["results"] if "median_ms" in r]
    if not rows:
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    png = os.path.splitext(path_json)[0] + ".png"
    with figure(png, 2, 1, figsize=(max(8, 1.3 * len(shapes) + 2), 8)) as (fig, axes):
        width = 0.8 / len(providers)
        for ax, metric, label in ((axes[0], "median_ms", "median time (ms)"),
                                  (axes[1], "peak_extra_mb", "peak extra memory (MB)")):
            for i, prov in enumerate(providers):
                xs, vals = [], []
                for j, s in enumerate(shapes):
                    r = next((r for r in rows if r["shape"] == s and r["provider"] == prov), None)
                    if r is not None:
                        xs.append(j + i * width)
                        vals.append(max(r[metric], 1e-3))
                bars = ax.bar(xs, vals, width, label=prov)
                ax.bar_label(bars, fmt="%.3g", fontsize=6, rotation=90)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))],
                          [s.replace(" ", "\n") for s in shapes], fontsize=7)
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.legend(fontsize=7, ncol=len(providers))
        env = payload["env"]
        mem = "peak extra RSS" if env["device_type"] == "cpu" else "max_memory_allocated"
        fig.suptitle(f"mine_pairs (Q = N) on {env['device']}, {env['threads']} thread(s); memory = {mem}",
                     fontsize=9)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one small shape, no torch.compile (CI smoke)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pair_mining_<device>.json)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"),
                   help="feature dtype (default float32)")
    p.add_argument("--n", type=int, nargs="+", default=None, help=f"data set sizes (default {NS})")
    p.add_argument("--d", type=int, nargs="+", default=None, help=f"feature widths (default {DS})")
    p.add_argument("--k", type=int, nargs="+", default=None, help=f"k values (default {KS})")
    p.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS, help="subset of providers")
    p.add_argument("--all-large", action="store_true", help="on a CPU, run every provider at N >= 100,000")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per provider and shape")
    p.add_argument("--chunk", type=int, default=1024, help="queries per call of the chunked providers")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--provider", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        args.n, args.d, args.k = args.n[0], args.d[0], args.k[0]
        worker(args)
        return 0
    torch.set_num_threads(args.threads)

    import msa_fast
    from msa_fast.ops import reference

    info = msa_fast.build_info()
    if args.quick:
        grid = [(2000, 64, 10)]
        providers = args.providers or ["eager-chunked", "cpp", "triton", "cuda"]
    else:
        grid = [(n, d, k) for n in (args.n or NS) for d in (args.d or DS) for k in (args.k or KS)]
        providers = args.providers or list(PROVIDERS)

    results, skipped, checks = [], [], {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n, d, k in grid:
            shape = f"N={n} D={d} k={k}"
            features, labels = None, None
            for prov in providers:
                why = skip_reason(prov, n, d, k, args.device, args.all_large)
                if why:
                    skipped.append({"shape": shape, "provider": prov, "reason": why})
                    print(f"{shape:24s} {prov:14s} skipped: {why}", flush=True)
                    continue
                save = os.path.join(tmp, "out.pt")
                r = run_worker(prov, n, d, k, args, save)
                med = r["median_s"]
                row = {"shape": shape, "N": n, "D": d, "k": k, "Q": n, "provider": prov,
                       "median_ms": med * 1e3, "times_ms": [t * 1e3 for t in r["times_s"]],
                       "tflops": 2 * n * n * d / med / 1e12, "peak_extra_mb": r["peak_extra_mb"],
                       "peak_extra_mb_per_call": r["peak_extra_mb_per_call"], "warmup_s": r["warmup_s"]}
                if features is None:
                    features, labels = make_inputs(n, d, args.device, dtype=args.dtype)
                    rows = check_rows(n).to(args.device)
                    want = tuple(t.cpu() for t in reference.mine_pairs(
                        features, labels, k, features[rows], labels[rows], rows))
                    qf = features[rows].cpu()
                row["check"] = compare(torch.load(save), want, features.cpu(), qf)
                checks[f"{shape} {prov}"] = row["check"]["equal"]
                results.append(row)
                print(f"{shape:24s} {prov:14s} median {med * 1e3:10.1f} ms  {row['tflops']:.3f} TFLOP/s  "
                      f"peak extra {r['peak_extra_mb']:8.1f} MB  == reference: {row['check']['equal']}",
                      flush=True)
    for r in results:  # speedups over the chunked eager run of the same shape
        base = next((b for b in results if b["shape"] == r["shape"] and b["provider"] == "eager-chunked"), None)
        if base is not None:
            r["speedup_vs_eager_chunked"] = base["median_ms"] / r["median_ms"]

    dev = torch.device(args.device)
    payload = {
        "op": "mine_pairs",
        "dtype": args.dtype,
        "env": environment(dev) | {"threads": args.threads},
        "build": {k: info.get(k) for k in ("extension", "openmp", "cpu_ops", "cuda_ops")},
        "method": ("median wall time (time.perf_counter, synchronised on a GPU) of --repeats calls after a "
                   "warm-up, one fresh subprocess per provider and shape; tflops = 2 Q N D / t; "
                   "peak_extra_mb: CPU = min over the calls of (peak RSS VmHWM after the call - RSS just "
                   "before it, high-water mark reset before each call via /proc/self/clear_refs 5, "
                   "MALLOC_MMAP_THRESHOLD_=65536); GPU = "
                   "torch.cuda.max_memory_allocated - memory_allocated before the call; check = "
                   f"{CHECK_ROWS} query rows vs the reference on those rows (indices equal outside "
                   f"{TIE_TOL} ties, sims within {SIM_TOL})"),
        "command": "python benchmarks/ops/bench_pair_mining.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "chunk": args.chunk,
        "wall_s": time.perf_counter() - t_start,
        "results": results,
        "skipped": skipped,
    }
    path = args.out or os.path.join(RESULTS, f"pair_mining_{dev.type}.json")
    save_json(path, payload)
    print(f"wrote {path}")
    png = plot(payload, path)
    if png:
        print(f"wrote {png}")
    bad = [key for key, ok in checks.items() if not ok]
    if bad:
        print(f"results differ from the reference: {bad}")
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
