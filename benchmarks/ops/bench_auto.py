"""What ``backend="auto"`` picks on this device, measured (contract §2's rule): every op against
every alternative a user could call instead, side by side in one process, interleaved.

For each op at its model shapes (the first MOSI / MOSEI rows of ``bench_<op>.py``, and for
attention FD-CMDIE's unaligned shape, ``(8, 4, 875, 875, 16)`` with the last 75 keys padded), the
providers are: ``eager`` (the reference), ``torch.compile`` of the reference
(``fullgraph=True``; the user's alternative, not a backend), and every fused backend that
can run on the device (``sdpa``, ``cpp``, ``cuda``, ``triton``). Each round times every
provider in turn for ``--seconds`` (forward + backward, inputs' grads cleared; mining is
forward only), ``--rounds`` rounds, so that a change of the shared machine's speed reaches
all alike; the median per call is reported. Dynamo's caches are reset before each shape:
every shape is timed as a process that runs it would run it (compiled at static sizes).

Outputs:
- ``benchmarks/results/auto_<device>.json``: every timing, the environment, the order;
- ``benchmarks/results/auto_<device>.md``: the README's table (op, shape, ms per provider,
  the pick, whether it is within 5 % of the fastest);
- ``msa_fast/_auto_order.py`` (with ``--write-order``): the ``auto`` order per (op, device),
  the backends sorted by the geometric mean over shapes of their time / eager's time --
  what :mod:`msa_fast._backend` reads at import.

    python benchmarks/ops/bench_auto.py --write-order          # the full CPU table, 1 thread
    python benchmarks/ops/bench_auto.py --quick                # CI smoke: one shape per op, no compile
    python benchmarks/ops/bench_auto.py --device cuda --no-compile   # the GPU script's run
    python benchmarks/ops/bench_auto.py --order-from gpu_check/auto_cuda.json   # its order, written here
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pprint
import statistics
import sys
import time

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

import torch

from benchmarks._common import RESULTS, environment, fwd_bwd_callables, write
from msa_fast import _backend
from msa_fast._io import atomic_write_bytes

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ORDER_FILE = os.path.join(ROOT, "msa_fast", "_auto_order.py")


def _cases() -> dict[str, tuple]:
    """op -> (build, {label: shape}, forward_only)."""
    att = importlib.import_module("benchmarks.ops.bench_attention")
    dg = importlib.import_module("benchmarks.ops.bench_dual_gate")
    gap = importlib.import_module("benchmarks.ops.bench_gap")
    ln = importlib.import_module("benchmarks.ops.bench_layer_norm")
    cl = importlib.import_module("benchmarks.ops.bench_contrastive")
    mining = importlib.import_module("benchmarks.ops.bench_pair_mining")
    pick = lambda shapes, *labels: {k: shapes[k] for k in labels}
    return {
        "attention": (att.build, {"fd_cmdie_unaligned": att.SHAPES["fd_cmdie_unaligned"],
                                  "mosi_aligned": att.SHAPES["mosi_aligned"]}, False),
        "dual_gate": (dg.build, pick(dg.SHAPES, "mosi_b32", "mosei_b64"), False),
        "gated_attention_pool": (gap.build, pick(gap.SHAPES, "mosi_aligned", "mosei_aligned"), False),
        "add_layer_norm": (ln.build, pick(ln.SHAPES, "mosi_aligned", "mosei_aligned"), False),
        "nt_xent": (cl.build_nt, pick(cl.BATCHES, "mosi_b32_k10_d128", "mosei_b64_k50_d256"), False),
        "triplet": (cl.build_tri, pick(cl.BATCHES, "mosi_b32_k10_d128", "mosei_b64_k50_d256"), False),
        "fd_cmdie_contrastive_loss": (cl.build_fd, pick(cl.BATCHES, "mosi_b32_k10_d128", "mosei_b64_k50_d256"),
                                      False),
        "mine_pairs": (mining.build, {"mosi_train": (1284, 256, 10), "n4096": (4096, 256, 50)}, True),
    }


def _json_path(args) -> str:
    return args.out or os.path.join(RESULTS, f"auto_{args.tag}.json")


def _fused_backends(op: str, device: torch.device) -> list[str]:
    spec = _backend.SPECS[op]
    # Triton on a CPU is its interpreter (a test tool, ~1 ms a program): never a contender
    return [f.backend for f in spec.fused if _backend.unavailable_reason(op, f.backend, device) is None
            and not (f.backend == "triton" and device.type == "cpu")]


def _timed(fn, seconds: float, sync) -> list[float]:
    times, start = [], time.perf_counter()
    while not times or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def run(args) -> dict:
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    cases = _cases()
    ops = args.ops.split(",") if args.ops else list(cases)
    payload = {"env": environment(device), "args": vars(args), "results": [], "order": {}}
    for op in ops:
        build, shapes, fwd_only = cases[op]
        items = list(shapes.items())[:1] if args.quick else list(shapes.items())
        fused = [b for b in _fused_backends(op, device) if not (args.no_compile and b == "compile")]
        for label, shape in items:
            # every shape as a process that runs it: fresh Dynamo caches, so that the compile
            # backend (one compiled function per op, whose second size PyTorch recompiles
            # with symbolic sizes) is timed at static sizes, as the torch.compile provider,
            # built here per shape, is (measured before: 47.8 vs 36.8 ms, fd_cmdie's loss at
            # MOSEI's batch, the symbolic graph against the static one)
            torch._dynamo.reset()
            inputs, call = build(shape, device, torch.float32)
            runners = {"eager": call("eager")}
            if not args.no_compile:
                runners["torch.compile"] = torch.compile(call("eager"), fullgraph=True)
            runners.update({b: call(b) for b in fused if not (args.no_compile and b == "compile")})
            fns = {}
            for name, fn in runners.items():
                fwd, _, fwd_bwd = fwd_bwd_callables(fn, inputs)
                fns[name] = fwd if fwd_only else fwd_bwd
            for fn in fns.values():  # warm-up: compilation, allocator, first-call caches
                fn()
                fn()
            times = {name: [] for name in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    times[name] += _timed(fn, args.seconds, sync)
            row = {"op": op, "shape": label, "dims": list(shape), "pass": "fwd" if fwd_only else "fwd+bwd",
                   "ms": {name: round(statistics.median(t) * 1e3, 4) for name, t in times.items()},
                   "calls": {name: len(t) for name, t in times.items()}}
            payload["results"].append(row)
            print(f"{op:>26} {label:>20}: " + "  ".join(f"{k} {v:.3f}" for k, v in row["ms"].items()), flush=True)
        # the order auto takes: backends it may pick (fused ones and eager), by the geometric
        # mean over this op's shapes of time / eager time
        rows = [r for r in payload["results"] if r["op"] == op]
        score = {b: math.exp(statistics.fmean(math.log(r["ms"][b] / r["ms"]["eager"]) for r in rows))
                 for b in ["eager", *fused]}
        payload["order"][op] = sorted(score, key=score.get)
        for r in rows:
            r["auto"] = payload["order"][op][0]
            best = min(r["ms"], key=r["ms"].get)
            r["fastest"] = best
            r["auto_vs_fastest"] = round(r["ms"][r["auto"]] / r["ms"][best], 3)
        write("auto", payload, _json_path(args))
    return payload


def markdown(payload: dict) -> str:
    providers = list(dict.fromkeys(p for r in payload["results"] for p in r["ms"]))
    lines = [f"| op | shape | pass | {' | '.join(providers)} | `auto` picks | `auto` / fastest |",
             "|---|---|---|" + "---|" * len(providers) + "---|---|"]
    for r in payload["results"]:
        cells = [(f"**{r['ms'][p]:.3f}**" if p == r["fastest"] else f"{r['ms'][p]:.3f}") if p in r["ms"] else "-"
                 for p in providers]
        lines.append(f"| `{r['op']}` | {r['shape']} | {r['pass']} | {' | '.join(cells)} | {r['auto']} "
                     f"| {r['auto_vs_fastest']:.2f}x |")
    env = payload["env"]
    lines.append("")
    lines.append(f"Median ms per call, {env['device']}, {env['threads']} thread(s), torch {env['torch']}, "
                 f"commit {str(env['commit'])[:7]}; bold: the fastest. "
                 f"`python benchmarks/ops/bench_auto.py --write-order` ({payload['args']['rounds']} interleaved rounds).")
    return "\n".join(lines) + "\n"


def order_from(path: str) -> tuple[dict, str]:
    """``(payload, device type)`` of a saved run (e.g. ``gpu_check.sh``'s ``auto_cuda.json``), for
    ``--order-from``: the GPU's order is written from the measurement of the day the device
    was lent, on this machine, without rerunning it. A ``--quick`` run (one round, one shape)
    decides nothing and is refused; a ``--no-compile`` run (the GPU script's: compiling every
    op costs device minutes) leaves ``compile`` out of the order it writes."""
    with open(path) as fh:
        payload = json.load(fh)
    if payload.get("args", {}).get("quick"):
        raise SystemExit(f"--order-from {path}: a --quick run decides no order; give a full run's JSON")
    if not payload.get("order"):
        raise SystemExit(f"--order-from {path}: no measured order in it")
    return payload, torch.device(payload["args"]["device"]).type


def write_order(payload: dict, device_type: str) -> None:
    """Merge this device's measured order into ``msa_fast/_auto_order.py``."""
    from msa_fast._auto_order import MEASURED

    measured = {dev: dict(orders) for dev, orders in MEASURED.items()}
    measured.setdefault(device_type, {}).update({op: tuple(o) for op, o in payload["order"].items()})
    env = payload["env"]
    text = ('"""The order in which ``backend="auto"`` tries an op\'s backends, per device type, as\n'
            "measured by ``benchmarks/ops/bench_auto.py --write-order`` (generated: do not edit by hand;\n"
            "rerun the benchmark). An (op, device) missing here uses the order its descriptor\n"
            'declares (``Fused.auto`` / ``rank``, see ``msa_fast/_backend.py``).\n\n'
            f"Last written from: {env['device']}, {env['threads']} thread(s), torch {env['torch']}, "
            f"commit {str(env['commit'])[:7]}.\n"
            '"""\n\n'
            f"MEASURED: dict[str, dict[str, tuple[str, ...]]] = {pprint.pformat(measured, width=96)}\n")
    atomic_write_bytes(ORDER_FILE, text.encode())
    print(f"wrote {ORDER_FILE}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ops", default=None, help="comma-separated subset (default: every op)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3, help="per provider per round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="one shape per op, no compiling, 1 round")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out torch.compile and the compile backend (their compiles cost minutes)")
    parser.add_argument("--write-order", action="store_true", help="update msa_fast/_auto_order.py")
    parser.add_argument("--order-from", default=None, metavar="JSON",
                        help="update msa_fast/_auto_order.py from a saved full run (e.g. gpu_check's "
                             "auto_cuda.json) instead of measuring")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/auto_<device>.json)")
    parser.add_argument("--tag", default=None, help="file name tag (default: the device type)")
    args = parser.parse_args()
    if args.order_from:
        write_order(*order_from(args.order_from))
        return
    if args.quick:
        args.rounds, args.seconds, args.no_compile = 1, 0.05, True
    args.tag = args.tag or torch.device(args.device).type
    torch.set_num_threads(args.threads)
    payload = run(args)
    md = markdown(payload)
    path = _json_path(args)
    with open(os.path.splitext(path)[0] + ".md", "w") as fh:
        fh.write(md)
    print(md)
    if args.write_order:
        if args.quick or args.no_compile:
            raise SystemExit("--write-order needs a full run (not --quick / --no-compile)")
        write_order(payload, torch.device(args.device).type)


if __name__ == "__main__":
    main()
