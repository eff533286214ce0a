"""Benchmark of one training step (contract §8): forward, L1 + ``loss_extra``, backward, AdamW step.

For every registered model at the synthetic MOSI and MOSEI shapes, aligned and unaligned
(the widths and sequence lengths of contract §5; the batch is a fixed, real loader batch of
``--batch`` samples), the providers:

- ``eager``: ``--backend eager``, the reference ops;
- ``auto``: ``--backend auto``, what ``auto`` picks (on this CPU: SDPA attention, the
  compiled reference where ``bench_auto.py`` measured it faster, ``cpp`` mining);
- ``torch.compile``: ``torch.compile(model)`` under ``auto`` (graph breaks allowed: the
  LSTMs pack sequences; five warm-up steps, so that the recompiles of dynamic shapes
  -- FD-CMDIE's partner batches change size every step -- are not timed);
- ``bf16``: ``auto`` under bf16 autocast (``msa-fast train --amp bf16``; on a GPU every
  provider already is, so this one runs on the CPU only).

On the CPU also data parallelism: ``ddp2`` is 2 gloo ranks (``torch.multiprocessing``, one
thread each), each stepping on half of the same global batch, against ``eager`` at one
thread. The in-process providers take turns, ``--rounds`` rounds of ``--steps / rounds``
steps each after their warm-ups (2, or 5 where something compiles); ddp2 runs after them.
Reported: the median of the rounds' median step times (ms), samples/s of the global batch, and peak memory (GPU: ``max_memory_allocated``; CPU: the
growth of the process's resident set over the steps, a coarse upper bound). FD-CMDIE's
pairs are mined once first, so that its contrastive term is part of the step. On a GPU the
step runs under bf16 autocast, as the trainer does.

    python benchmarks/models/bench_train_step.py [--device cuda] [--models fd_cmdie] [--shapes mosei_unaligned]
    python benchmarks/models/bench_train_step.py --quick      # lf_dnn at MOSI aligned, CI smoke
    python benchmarks/models/bench_train_step.py --merge A.json B.json --out results/train_step_cpu.json
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

import torch

import msa_fast
from benchmarks._common import RESULTS, environment, write
from msa_fast._io import figure, have_matplotlib
from msa_fast.data import load_data
from msa_fast.data.loader import gather_batch
from msa_fast.models import available_models, build_model

# label -> (synthetic spec, batch size): contract §5's shapes (MOSI aligned 50 tokens; unaligned
# audio 375 / vision 500 frames; MOSEI 74-d audio, 35-d vision, 500 / 500 frames).
SHAPES = {
    "mosi_aligned": ("synthetic:mosi:aligned:limit=256", 32),
    "mosi_unaligned": ("synthetic:mosi:unaligned:limit=256", 32),
    "mosei_aligned": ("synthetic:mosei:aligned:limit=256", 64),
    "mosei_unaligned": ("synthetic:mosei:unaligned:limit=256", 64),
}


def _mine(model, data, device, amp):
    if callable(getattr(model, "on_epoch_start", None)):
        from msa_fast.train.trainer import EpochContext

        model.on_epoch_start(EpochContext(1, 0, data["train"], data.aligned, 64, device, amp, False))


def _step_fn(model, batch, device, amp):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(batch)
            loss = torch.nn.functional.l1_loss(out["pred"].float(), batch["labels"])
            if "loss_extra" in out:
                loss = loss + out["loss_extra"].float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _rss() -> int:
    """Resident set size in bytes (Linux ``/proc``: no dependency on the GPU machine)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _time(step, device, steps: int, warmup: int = 2) -> tuple[float, float | None]:
    """(median ms, peak MB) of ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss0, peak_rss = _rss(), 0
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
            peak_rss = max(peak_rss, _rss())
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = max(peak_rss - rss0, 0) / 2**20
    return statistics.median(times), peak


def _setup(name, spec, batch_size, device, backend, seed=0):
    data = load_data(spec)
    torch.manual_seed(seed)
    with msa_fast.use_backend(backend):
        model = build_model(name, data.dims, dropout=0.0).to(device).train()
        _mine(model, data, device, device.type == "cuda")
    batch = gather_batch(data["train"], torch.arange(batch_size))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return model, batch


def _ddp_worker(rank, world, port, name, spec, batch_size, steps, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from msa_fast.train.distributed import shard_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, batch = _setup(name, spec, batch_size, torch.device("cpu"), "auto")
        rows = torch.tensor_split(torch.arange(batch_size), world)[rank]
        net = DistributedDataParallel(model, find_unused_parameters=True, broadcast_buffers=False)
        local = shard_batch(batch, rows)
        with msa_fast.use_backend("auto"):
            ms, peak = _time(_step_fn(net, local, torch.device("cpu"), False), torch.device("cpu"), steps)
        times = [None] * world
        dist.all_gather_object(times, ms)
        if rank == 0:
            torch.save({"ms": max(times), "peak_mb": peak}, out)
    finally:
        dist.destroy_process_group()


def _ddp_row(name, spec, batch_size, steps) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        mp.spawn(_ddp_worker, args=(2, port, name, spec, batch_size, steps, out), nprocs=2, join=True)
        return torch.load(out)


def _provider_step(prov, name, spec, batch_size, device):
    """(step function, backend) of one in-process provider."""
    backend = "eager" if prov == "eager" else "auto"
    amp = prov == "bf16" or device.type == "cuda"
    model, batch = _setup(name, spec, batch_size, device, backend)
    if prov == "torch.compile":
        model = torch.compile(model)
    return _step_fn(model, batch, device, amp), backend


def _interleaved(name, spec, shape, batch_size, providers, device, args) -> list[dict]:
    """One row per provider; the in-process providers take turns step by step, ``args.rounds``
    rounds of ``args.steps / rounds`` steps, so that the shared machine's speed changes reach
    them alike (ddp2 runs in its own processes, after them)."""
    rows, steps = {}, {}
    for prov in providers:
        rows[prov] = {"model": name, "shape": shape, "batch": batch_size, "provider": prov}
        if prov == "ddp2":
            continue
        try:
            step, backend = _provider_step(prov, name, spec, batch_size, device)
            with msa_fast.use_backend(backend):  # warm-up: compiles, allocator, mining caches
                for _ in range(5 if prov in ("torch.compile", "auto", "bf16") else 2):
                    step()
            steps[prov] = (step, backend)
        except Exception as exc:  # recorded, not fatal: a provider may not run a model
            rows[prov]["error"] = f"{type(exc).__name__}: {exc}"[:300]
    times = {prov: [] for prov in steps}
    peaks = dict.fromkeys(steps, 0.0)
    per_round = max(1, -(-args.steps // args.rounds))
    for _ in range(args.rounds):
        for prov, (step, backend) in list(steps.items()):
            try:
                with msa_fast.use_backend(backend):
                    ms, peak = _time(step, device, per_round, 0)
            except Exception as exc:
                rows[prov]["error"] = f"{type(exc).__name__}: {exc}"[:300]
                del steps[prov]
                continue
            times[prov].append(ms)
            peaks[prov] = max(peaks[prov], peak or 0.0)
    for prov, ts in times.items():
        if prov in steps and ts:
            ms = statistics.median(ts)
            rows[prov].update(step_ms=round(ms, 3), samples_per_s=round(batch_size / (ms * 1e-3), 1),
                              peak_mb=round(peaks[prov], 1))
    if "ddp2" in rows:
        try:
            r = _ddp_row(name, spec, batch_size, args.steps)
            rows["ddp2"].update(step_ms=round(r["ms"], 3), samples_per_s=round(batch_size / (r["ms"] * 1e-3), 1),
                                peak_mb=None if r["peak_mb"] is None else round(r["peak_mb"], 1))
        except Exception as exc:
            rows["ddp2"]["error"] = f"{type(exc).__name__}: {exc}"[:300]
    base = rows.get("eager", {}).get("step_ms")
    for row in rows.values():
        if base and "step_ms" in row:
            row["speedup_vs_eager"] = round(base / row["step_ms"], 2)
    return list(rows.values())


def markdown(payload: dict) -> str:
    """The README table: samples/s per (shape, model) and provider, speedups vs eager."""
    rows = payload["results"]
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    lines = ["| shape (batch) | model | " + " | ".join(providers) + " | auto / eager |",
             "|---|---|" + "---|" * len(providers) + "---|"]
    groups = list(dict.fromkeys((r["shape"], r["batch"], r["model"]) for r in rows))
    for shape, batch, model in groups:
        cells, by = [], {r["provider"]: r for r in rows if (r["shape"], r["batch"], r["model"]) == (shape, batch, model)}
        for prov in providers:
            r = by.get(prov)
            cells.append("-" if r is None else ("error" if "error" in r else f"{r['samples_per_s']:g}"))
        ratio = by.get("auto", {}).get("speedup_vs_eager")
        lines.append(f"| {shape} ({batch}) | {model} | " + " | ".join(cells) + f" | {f'{ratio:.2f}x' if ratio else '-'} |")
    return "\n".join(lines) + "\n"


def merge(paths: list[str], out: str) -> dict:
    """One payload of several runs' rows (later files win for the same model, shape and provider)."""
    import json

    payload, seen = None, {}
    for path in paths:
        with open(path) as fh:
            part = json.load(fh)
        payload = payload or dict(part, results=[], merged_from=[])
        payload["merged_from"].append({"file": os.path.basename(path), "commit": part["env"].get("commit")})
        for r in part["results"]:
            seen[(r["model"], r["shape"], r["provider"])] = r
    payload["results"] = list(seen.values())
    write("train_step", payload, out)
    with open(os.path.splitext(out)[0] + ".md", "w") as fh:
        fh.write(markdown(payload))
    _plot(payload, out)
    return payload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    p.add_argument("--shapes", default=None, help=f"comma-separated, of {list(SHAPES)}")
    p.add_argument("--providers", nargs="+", default=["eager", "auto", "torch.compile", "bf16", "ddp2"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the in-process providers")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the 1-process providers")
    p.add_argument("--quick", action="store_true", help="lf_dnn at mosi_aligned, eager and auto, 2 steps")
    p.add_argument("--out", default=None)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge these result files into --out (+ .md table, .png) and exit")
    args = p.parse_args()
    if args.merge:
        merge(args.merge, args.out or os.path.join(RESULTS, "train_step_cpu.json"))
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    models = args.models or [m for m in available_models() if not m.startswith("_")]
    shapes = args.shapes.split(",") if args.shapes else list(SHAPES)
    providers = args.providers
    if args.quick:
        models, shapes, providers, args.steps, args.rounds = ["lf_dnn"], ["mosi_aligned"], ["eager", "auto"], 2, 1
    if device.type == "cuda":
        # one GPU: no second rank to run; every GPU step is under bf16 autocast already
        providers = [q for q in providers if q not in ("ddp2", "bf16")]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"--shapes: unknown {unknown}; known: {list(SHAPES)}")
    env = environment(device)
    payload = {"op": "train_step", "env": env, "results": [],
               "note": ("CPU: 1-process providers at --threads threads; ddp2 = 2 gloo ranks x 1 "
                        "thread on half the batch each" if device.type == "cpu" else
                        "bf16 autocast; ddp2 needs a second device")}
    path = args.out or os.path.join(RESULTS, f"train_step_{device.type}.json")
    for shape in shapes:
        spec, batch_size = SHAPES[shape]
        for name in models:
            rows = _interleaved(name, spec, shape, batch_size, providers, device, args)
            for row in rows:
                print(row, flush=True)
            payload["results"] += rows
            write("train_step", payload, path)  # after every model: nothing lost on interruption
    with open(os.path.splitext(path)[0] + ".md", "w") as fh:
        fh.write(markdown(payload))
    _plot(payload, path)


def _plot(payload: dict, path: str) -> None:
    if not have_matplotlib():
        return
    rows = [r for r in payload["results"] if "samples_per_s" in r]
    if not rows:
        return
    groups = list(dict.fromkeys(f"{r['model']}\n{r['shape']}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    png = os.path.splitext(path)[0] + ".png"
    with figure(png, figsize=(max(8, 0.9 * len(groups)), 4.5)) as (fig, ax):
        width = 0.8 / len(providers)
        for i, prov in enumerate(providers):
            vals = [next((r["samples_per_s"] for r in rows if f"{r['model']}\n{r['shape']}" == g
                          and r["provider"] == prov), 0) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, rotation=60, fontsize=6)
        ax.set_ylabel("training samples/s (median step)")
        ax.set_yscale("log")
        ax.set_title(f"train step on {payload['env']['device']}", fontsize=9)
        ax.legend(fontsize=8)


if __name__ == "__main__":
    main()
