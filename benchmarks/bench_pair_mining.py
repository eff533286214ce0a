"""Benchmark of ``mine_pairs`` on the CPU (SPEC 3.4, 8): eager reference vs the C++ kernel.

Shape: MOSEI train, N = 16,326 rows of D = 877 (the FD-CMDIE fused feature
width), ``k`` in {10, 50}, labels ``sentiment_classes(y, "7")`` of uniform
regression labels ``y`` in [-3, 3]. Every (shape, provider) runs in a fresh
subprocess so that its peak memory is its own: ``peak_extra_mb`` is the peak RSS
(``VmHWM``, the address space's part of ``getrusage(RUSAGE_SELF).ru_maxrss``) after one call minus the RSS just before
it, with the high-water mark reset before each call, the minimum over the calls
(pages reclaimed by the OS in between count again when faulted back), measured
after the inputs exist and after a small warm-up call has loaded the BLAS /
OpenMP runtimes. Time is the median of ``--repeats`` calls (``time.perf_counter``).
The C++ result is checked against the reference: indices equal except at
similarity ties (within 1e-6), similarities within 1e-5.

A large shape, N = 100,000, D = 256, k = 50, is run for the C++ kernel only (the
eager reference would hold a 40 GB similarity matrix).

    python benchmarks/bench_pair_mining.py              # full run, ~5 min on 2 cores
    python benchmarks/bench_pair_mining.py --quick      # CI smoke, seconds
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

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, environment  # noqa: E402

SEED = 0
TIE_TOL = 1e-6
SIM_TOL = 1e-5


def make_inputs(n: int, d: int, seed: int = SEED):
    from msa_fast.ops import sentiment_classes

    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g)
    y = torch.rand(n, generator=g) * 6 - 3
    return features, sentiment_classes(y, "7")


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


def worker(args) -> None:
    import msa_fast
    from msa_fast.ops import reference

    features, labels = make_inputs(args.n, args.d)
    if args.provider == "eager":
        def call():
            return reference.mine_pairs(features, labels, args.k)
    else:
        def call():
            return msa_fast.ops.mine_pairs(features, labels, args.k, backend=args.provider)
    # Warm-up on a small slice: loads MKL / OpenMP pools, which are not the op's memory.
    wf, wl = features[:256].clone(), labels[:256].clone()
    if args.provider == "eager":
        reference.mine_pairs(wf, wl, args.k)
    else:
        msa_fast.ops.mine_pairs(wf, wl, args.k, backend=args.provider)
    # Peak per call, each from a reset high-water mark; the minimum over the calls
    # is reported, since pages of the process reclaimed by the OS between calls
    # (other tenants' memory pressure) count again when faulted back in.
    times, peaks, reset, out = [], [], False, None
    for _ in range(args.repeats):
        reset = _reset_rss_peak()
        base = _rss_now_mb() if reset else _rss_peak_mb()
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
        peaks.append(max(0.0, _rss_peak_mb() - base))
    if args.save:
        torch.save(tuple(out), args.save)
    print(json.dumps({"times_s": times, "peak_extra_mb": min(peaks), "peak_extra_mb_per_call": peaks,
                      "baseline_rss_mb": base, "peak_reset": reset}))


def run_worker(provider: str, n: int, d: int, k: int, repeats: int, save: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--provider", provider,
           "--n", str(n), "--d", str(d), "--k", str(k), "--repeats", str(repeats)]
    if save:
        cmd += ["--save", save]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {provider} N={n} D={d} k={k} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["median_s"] = statistics.median(res["times_s"])
    return res


# --------------------------------------------------------------------------- #
# Result check (the tie-aware comparison of tests/test_pair_mining.py)
# --------------------------------------------------------------------------- #


def compare(got, want, features) -> dict:
    """Index mismatches outside ties, and the largest similarity difference."""
    from msa_fast.ops.reference import normalize_rows

    fn = normalize_rows(features.double())
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
        for lo in range(0, gi.shape[0], 4096):
            qs = fn[lo:lo + 4096, None, :]
            sg = (qs * fn[gi[lo:lo + 4096].clamp(min=0)]).sum(-1)
            sw = (qs * fn[wi[lo:lo + 4096].clamp(min=0)]).sum(-1)
            tie[lo:lo + 4096] |= (sg - sw).abs() <= TIE_TOL
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = payload["results"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(providers)
    for ax, metric, label in ((axes[0], "median_s", "median time (s)"),
                              (axes[1], "peak_extra_mb", "peak extra RSS (MB)")):
        for i, prov in enumerate(providers):
            xs, vals = [], []
            for j, s in enumerate(shapes):
                r = next((r for r in rows if r["shape"] == s and r["provider"] == prov), None)
                if r is not None:
                    xs.append(j + i * width)
                    vals.append(max(r[metric], 1e-3))
            bars = ax.bar(xs, vals, width, label=prov)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=8)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    env = payload["env"]
    fig.suptitle(f"mine_pairs on {env['device']} ({env['threads']} threads)", fontsize=9)
    fig.tight_layout()
    png = os.path.splitext(path_json)[0] + ".png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small N for a CI smoke run")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pair_mining_cpu.json)")
    p.add_argument("--no-large", action="store_true", help="skip the N=100,000 cpp-only shape")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of the cpp provider")
    p.add_argument("--eager-repeats", type=int, default=2, help="timed calls of the eager provider")
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--provider", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import msa_fast

    info = msa_fast.build_info()
    if "mine_pairs" not in info.get("cpu_ops", []):
        print(f"msa_fast._C has no CPU mine_pairs ({info.get('reason')}): build the extension first")
        return 1
    if args.quick:
        shapes = [(2000, 64, 10)]
        large = None
    else:
        shapes = [(16326, 877, 10), (16326, 877, 50)]
        large = None if args.no_large else (100_000, 256, 50)

    results, ratios, checks = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, d, k in shapes:
            shape = f"N={n} D={d} k={k}"
            rows = {}
            for prov, reps in (("eager", args.eager_repeats), ("cpp", args.repeats)):
                save = os.path.join(tmp, f"{prov}.pt")
                r = run_worker(prov, n, d, k, reps, save)
                rows[prov] = r
                results.append({"shape": shape, "N": n, "D": d, "k": k, "provider": prov,
                                 "median_s": r["median_s"], "times_s": r["times_s"],
                                 "peak_extra_mb": r["peak_extra_mb"],
                                 "peak_extra_mb_per_call": r["peak_extra_mb_per_call"]})
                print(f"{shape:24s} {prov:6s} median {r['median_s']:.3f} s  "
                      f"peak extra {r['peak_extra_mb']:.1f} MB", flush=True)
            features, _ = make_inputs(n, d)
            check = compare(torch.load(os.path.join(tmp, "cpp.pt")),
                            torch.load(os.path.join(tmp, "eager.pt")), features)
            checks[shape] = check
            e, c = rows["eager"], rows["cpp"]
            ratios[shape] = {
                "speedup_cpp_vs_eager": e["median_s"] / c["median_s"],
                "memory_fraction_cpp_over_eager": c["peak_extra_mb"] / max(e["peak_extra_mb"], 1e-9),
            }
            print(f"{shape:24s} cpp == eager: {check['equal']}  speedup {ratios[shape]['speedup_cpp_vs_eager']:.2f}x  "
                  f"memory fraction {ratios[shape]['memory_fraction_cpp_over_eager']:.4f}", flush=True)
        if large is not None:
            n, d, k = large
            shape = f"N={n} D={d} k={k}"
            r = run_worker("cpp", n, d, k, 2, None)
            results.append({"shape": shape, "N": n, "D": d, "k": k, "provider": "cpp",
                            "median_s": r["median_s"], "times_s": r["times_s"],
                            "peak_extra_mb": r["peak_extra_mb"],
                            "peak_extra_mb_per_call": r["peak_extra_mb_per_call"],
                            "note": "cpp only: the eager reference would need a 40 GB Q x N matrix"})
            print(f"{shape:24s} cpp    median {r['median_s']:.3f} s  peak extra {r['peak_extra_mb']:.1f} MB "
                  f"(< 1 GB: {r['peak_extra_mb'] < 1024})", flush=True)

    payload = {
        "op": "mine_pairs",
        "env": environment(torch.device("cpu")),
        "build": {k: info.get(k) for k in ("openmp", "cpu_ops")},
        "method": ("median wall time (time.perf_counter) of repeated calls; peak_extra_mb = min over "
                   "the calls of (peak RSS VmHWM after the call - RSS just before it), the high-water mark "
                   "reset before each call (/proc/self/clear_refs 5), in a fresh subprocess per "
                   "provider and shape, after the inputs exist and a small warm-up call"),
        "command": "python benchmarks/bench_pair_mining.py" + (" --quick" if args.quick else ""),
        "results": results,
        "ratios": ratios,
        "checks": checks,
    }
    path = args.out or os.path.join(RESULTS, "pair_mining_cpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
    print(f"wrote {path}")
    png = plot(payload, path)
    if png:
        print(f"wrote {png}")
    return 0 if all(c["equal"] for c in checks.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
