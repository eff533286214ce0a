"""Inference latency and throughput (contract §8, issue 13): ``model.eval()`` vs the ``Predictor``
vs the HTTP server.

For every registered model (random weights from the registry at the data's widths: latency
needs no training), batch 1, 8 and 64, at synthetic MOSI and MOSEI shapes, aligned (every
modality 50 steps) and unaligned (text 50, audio / vision at the preset's full lengths; the
longest sample of a batch decides its padded length, so every row is full length), and
``mosi_mixed`` (MOSI aligned widths, every call a new batch of random lengths 8..50, as real
requests come: ``model.eval()`` and ONNX Runtime get it padded to its own longest sample, the
Predictor pads it to its bucket):

- ``eager``: ``model.eval()`` under ``torch.inference_mode()`` on the padded batch dict;
- ``eager_cmdie_loop`` (FD-CMDIE only): the same with its CMDIE run DIPU by DIPU
  (``model.cmdie.batched = False``), against ``eager``'s default (``"auto"``: the three DIPUs
  of a layer in one batched call where padding costs little, i.e. aligned data);
- ``predictor_eager``: ``Predictor(compile=False)`` (buckets, unpacked LSTMs, no compile);
- ``predictor_compiled`` (CPU): ``Predictor(compile=True)`` (torch.compile per bucket);
- ``predictor_cuda_graphs`` (GPU): ``Predictor(cuda_graphs=True)``, one graph per bucket;
- ``predictor_onnxruntime`` / ``predictor_aoti`` (CPU): ``Predictor(runtime=...)``;
- ``predictor`` : ``Predictor`` with its defaults (``runtime="auto"``: what
  ``Predictor.from_checkpoint(run)`` gives);
- ``onnxruntime`` (CPU, the ``[onnx]`` extra): the file ``msa-fast export --format onnx`` writes
  (dynamic batch and lengths, every input incl. ``present``) in a plain
  ``onnxruntime.InferenceSession`` (``ORT_ENABLE_ALL``, ``--threads`` intra-op threads), fed the
  padded batch as numpy arrays -- what a deployer who leaves our API runs;
- ``aoti`` (CPU): the AOTInductor package ``msa-fast export --format aoti`` writes, loaded with
  ``torch._inductor.aoti_load_package`` and fed the padded batch;
- ``server`` (``--clients 1 8 32``): ``msa-fast serve`` on 127.0.0.1 (a run directory with the
  same random weights), ``clients`` concurrent localhost clients each sending single-sample
  ``POST /predict`` requests for ``--server-seconds``; latency per request, throughput of all.

Timing: ``time.perf_counter`` around each call (a CUDA synchronize inside) after a first call
(the compile / capture of the bucket: ``first_call_s``) and warm-up calls, p50 and p99 over
``--iters`` calls, throughput = batch / mean. The providers of one (model, shape, batch) take
turns in ``--rounds`` rounds, so that a change of the machine's speed during the run reaches
them alike (on this shared 2-core CPU eager ``model.eval()`` of ProMMA at batch 64 ranged over
50-100 ms with the load of the other core, the compiled one over 41-53 ms). ``--row-seconds``
caps the slow rows (FD-CMDIE on unaligned MOSEI at batch 64 takes seconds a call).
``torch.set_num_threads(--threads)`` is fixed and recorded. JSON: ``benchmarks/results/inference_<device>.json``, a PNG and the README's markdown
table (``.md``) beside it; ``speedup`` in the JSON has the Predictor / eager ratios.

    python benchmarks/models/bench_inference.py                                # the full matrix
    python benchmarks/models/bench_inference.py --row-seconds 8                # the same, capped per row
    python benchmarks/models/bench_inference.py --models agfn --batches 1 64 --shapes mosi_aligned
    python benchmarks/models/bench_inference.py --quick                        # CI smoke, seconds
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

import torch

from benchmarks._common import RESULTS, environment, write
from msa_fast._io import figure, have_matplotlib
from msa_fast.data.schema import PRESET_DIMS
from msa_fast.inference import Predictor
from msa_fast.models import available_models, build_model

SHAPES = {  # name: (preset, aligned)
    "mosi_aligned": ("mosi", True), "mosi_unaligned": ("mosi", False),
    "mosei_aligned": ("mosei", True), "mosei_unaligned": ("mosei", False),
    "mosi_mixed": ("mosi", True),
}
PREDICTORS = {"predictor_eager": {"runtime": "eager", "cuda_graphs": False},
              # cuda_graphs=False: on a GPU the Predictor's CUDA graphs would run the eager model
              "predictor_compiled": {"runtime": "compiled", "cuda_graphs": False},
              "predictor_cuda_graphs": {"cuda_graphs": True}, "predictor": {},
              "predictor_onnxruntime": {"runtime": "onnxruntime"}, "predictor_aoti": {"runtime": "aoti"}}
MIXED_POOL = 16  # distinct random-length batches a mixed row cycles through
TEXT_LEN = 50


def make_batch(preset: str, aligned: bool, B: int, seed: int = 0, mixed: bool = False) -> tuple[dict, dict]:
    """A full-length batch, or (``mixed``) one of random lengths 8..50 per row, every modality
    of a row the same length (aligned), padded to the batch's longest row."""
    p = PRESET_DIMS[preset]
    dims = {"text": 768, "audio": p["audio"], "vision": p["vision"], "text_input": "features"}
    L = {"text": TEXT_LEN, "audio": TEXT_LEN if aligned else p["audio_len"],
         "vision": TEXT_LEN if aligned else p["vision_len"]}
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(8, TEXT_LEN + 1, (B,), generator=g) if mixed else None
    if mixed:
        L = dict.fromkeys(L, int(lens.max()))
    batch = {"present": torch.ones(B, 3, dtype=torch.bool)}
    for m in ("text", "audio", "vision"):
        batch[f"{m}_lengths"] = lens.clone() if mixed else torch.full((B,), L[m])
        batch[f"{m}_mask"] = torch.arange(L[m])[None] >= batch[f"{m}_lengths"][:, None]
        batch[m] = torch.randn(B, L[m], dims[m], generator=g) * (~batch[f"{m}_mask"])[..., None]
    return batch, dims


def _graph_inputs(batch: dict, dims: dict) -> tuple:
    from msa_fast.inference.export import input_names

    return tuple(batch[n] for n in input_names(dims))


def _stats(times: list[float], B: int) -> dict:
    times = sorted(times)
    p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
    return {"p50_ms": round(statistics.median(times) * 1e3, 4), "p99_ms": round(p99 * 1e3, 4),
            "samples_per_s": round(B / statistics.fmean(times), 1), "calls": len(times)}


def _calls(fn, n: int, sync, budget_s: float | None) -> list[float]:
    """Up to ``n`` timed calls of ``fn`` (at least one); with ``budget_s``, stop once that many
    seconds are used."""
    times, t_start = [], time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            break
    return times


def _time_interleaved(fns: dict, iters: int, warmup: int, rounds: int, device: torch.device,
                      budget_s: float | None = None) -> dict:
    """Per provider, the timed calls of ``fns[provider]``: after ``warmup`` calls each, the
    providers take turns in ``rounds`` rounds of ``ceil(iters / rounds)`` calls, so that a drift
    of the machine's speed (another process, frequency) reaches every provider alike and the
    ratios stay meaningful on a shared CPU. ``budget_s`` caps each provider's time per row:
    warm-up stops after a quarter of it, each round after ``budget_s / rounds`` (and at least
    one call per round)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        _calls(fn, warmup, sync, None if budget_s is None else budget_s / 4)
    per_round = -(-iters // rounds)
    out = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            out[name] += _calls(fn, per_round, sync, None if budget_s is None else budget_s / rounds)
    return out


def _write_run_dir(path: str, name: str, model, dims: dict) -> None:
    """A run directory the CLI reads (state.json + best.safetensors) with these weights."""
    from msa_fast.train.checkpoint import save_json, save_weights

    os.makedirs(path, exist_ok=True)
    save_weights(os.path.join(path, "best.safetensors"), model)
    save_json(os.path.join(path, "state.json"), {
        "epoch": 0, "weights": "best.safetensors", "optimizer": None, "history": [],
        "config": {"model": name}, "model": name, "dims": dims, "model_cfg": {}, "seed": 0,
        "data": "synthetic:random"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_rows(name, model, dims, batch, clients_list, seconds, compile_flag) -> list[dict]:
    tmp = tempfile.mkdtemp(prefix="bench_inference_")
    rows = []
    proc = None
    try:
        _write_run_dir(tmp, name, model, dims)
        port = _free_port()
        cmd = [sys.executable, "-m", "msa_fast", "serve", "--checkpoint", tmp, "--port", str(port),
               "--max-batch", "64", "--batch-timeout", "0.002",
               "--compile" if compile_flag else "--no-compile"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            raise RuntimeError("server did not come up in 180 s")
        body = json.dumps({m: batch[m][0].tolist() for m in ("text", "audio", "vision")}).encode()

        def one() -> float:
            req = urllib.request.Request(url + "/predict", data=body,
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
            return time.perf_counter() - t0

        for _ in range(20):  # warm-up: every batch bucket the server may form
            one()
        for clients in clients_list:
            def worker(_):
                out, stop = [], time.perf_counter() + seconds
                while time.perf_counter() < stop:
                    out.append(one())
                return out
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as ex:
                times = [t for part in ex.map(worker, range(clients)) for t in part]
            wall = time.perf_counter() - t0
            st = _stats(times, 1)
            st["samples_per_s"] = round(len(times) / wall, 1)
            rows.append({"provider": "server", "clients": clients, **st})
    finally:
        if proc is not None:
            import signal

            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _runner(prov: str, name: str, model, dims: dict, device, aligned: bool, max_batch: int):
    """``fn(batch)`` of one provider, or None where it does not apply."""
    if prov in PREDICTORS:
        cpu_only = prov in ("predictor_compiled", "predictor_onnxruntime", "predictor_aoti")
        if (prov == "predictor_cuda_graphs" and device.type != "cuda") or (cpu_only and device.type != "cpu"):
            return None
        pr = Predictor(model, dims, device=device, max_batch=max_batch, model_name=name, **PREDICTORS[prov])
        return pr.predict  # a bound method: the rows read its Predictor as run.__self__
    if prov in ("eager", "eager_cmdie_loop"):
        if prov == "eager_cmdie_loop":
            # on unaligned data CMDIE's batched="auto" always runs the loop (and on aligned
            # data above 512 tokens a unit, e.g. batch 64)
            if not hasattr(model, "cmdie") or not aligned:
                return None
            m = copy.deepcopy(model)
            m.cmdie.batched = False  # the per-DIPU loop, same weights
        else:
            m = model

        def run(b, m=m):
            with torch.inference_mode():
                return m(b)["pred"]
        return run
    if prov in ("onnxruntime", "aoti") and device.type == "cpu":
        from msa_fast.inference import export as E

        # the Predictor's copy (eval, unpacked LSTMs) is what `msa-fast export` exports
        copy_ = Predictor(model, dims, device="cpu", runtime="eager", model_name=name).model
        common = {"model_name": name, "aligned": aligned, "length_buckets": (50,)}
        if prov == "onnxruntime":
            data, _ = E.export_onnx(copy_, dims, **common)
            session = E.ort_session(data, torch.get_num_threads())
            names = E.input_names(dims)

            def run_ort(b):
                return session.run(None, {n: b[n].numpy() for n in names})[0]
            return run_ort
        path = os.path.join(tempfile.mkdtemp(prefix="bench_aoti_"), f"{name}.pt2")
        E.export_aoti(copy_, dims, path, **common)
        loaded = torch._inductor.aoti_load_package(path)

        def run_aoti(b):
            with torch.inference_mode():
                return loaded(*_graph_inputs(b, dims))
        return run_aoti
    return None


class _Zero(torch.nn.Module):
    """A model that returns zeros: the Predictor's own cost is all that is left."""

    def forward(self, batch):
        return {"pred": torch.zeros(batch["audio"].shape[0])}


def overhead_rows(iters: int, rounds: int) -> list[dict]:
    """The Predictor's own cost at batch 1 on MOSI aligned (validation, bucketing, padding,
    collation, conversion): p50 of ``Predictor(_Zero()).predict`` on a list of one sample dict
    (numpy arrays, as a server decodes them) and on a loader batch dict, minus the zero model's
    own call, interleaved."""
    batch, dims = make_batch("mosi", True, 1)
    sample = [{m: batch[m][0].numpy() for m in ("text", "audio", "vision")}]
    pr = Predictor(_Zero(), dims, runtime="eager")
    zero, padded = _Zero(), {k: v for k, v in batch.items()}

    def model_only():
        with torch.inference_mode():
            return zero(padded)["pred"].numpy()
    fns = {"zero_model": model_only, "sample_list": lambda: pr.predict(sample),
           "batch_dict": lambda: pr.predict(batch)}
    times = _time_interleaved(fns, iters, max(10, iters // 10), rounds, torch.device("cpu"))
    base = statistics.median(times["zero_model"])
    return [{"model": "zero", "shape": "mosi_aligned", "batch": 1, "provider": f"predictor_overhead_{k}",
             **_stats(times[k], 1), "overhead_us": round((statistics.median(times[k]) - base) * 1e6, 1)}
            for k in ("sample_list", "batch_dict")]


def auto_table(payload: dict, shape: str = "mosi_aligned", margin: float = 0.05) -> dict:
    """The Predictor's ``auto`` table (``msa_fast.inference.runtimes.AUTO_CPU``) these results
    give: per model and batch, the fastest of the Predictor's own runtimes (p50 on ``shape``),
    keeping the table's current choice unless another is ``margin`` faster (so that noise
    between two close runtimes does not flip the table from run to run)."""
    from msa_fast.inference.runtimes import AUTO_CPU, auto_runtime

    # "aoti" is not a candidate: its package compiles for minutes on a layout's first request
    cands = {"predictor_eager": "eager", "predictor_compiled": "compiled",
             "predictor_onnxruntime": "onnxruntime"}
    p50: dict = {}
    for r in payload["results"]:
        if r.get("shape") == shape and r["provider"] in cands and "p50_ms" in r:
            p50.setdefault(r["model"], {}).setdefault(r["batch"], {})[cands[r["provider"]]] = r["p50_ms"]
    out = {}
    for model, by in sorted(p50.items()):
        entries = []
        for batch, times in sorted(by.items()):
            best = min(times, key=times.get)
            cur = auto_runtime(model, batch, "eager") if model in AUTO_CPU else None
            if cur in times and times[cur] <= (1 + margin) * times[best]:
                best = cur
            entries.append((batch, best))
        out[model] = tuple(entries)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--models", nargs="+", default=None, help="default: every registered model")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--providers", nargs="+", default=None,
                   help="eager eager_cmdie_loop onnxruntime aoti predictor predictor_eager "
                        "predictor_compiled predictor_onnxruntime predictor_aoti "
                        "predictor_cuda_graphs server (eager_cmdie_loop: FD-CMDIE eager with its "
                        "CMDIE run DIPU by DIPU, batched=False, against eager's default)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--server-seconds", type=float, default=3.0)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5,
                   help="the providers of one (model, shape, batch) take turns in this many rounds")
    p.add_argument("--row-seconds", type=float, default=None,
                   help="cap of each provider's timing per row (warm-up: a quarter of it; each "
                        "round: 1 / --rounds of it, at least one call); default: --iters calls")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU (1: no "
                   "oversubscription on a shared machine)")
    p.add_argument("--quick", action="store_true", help="lf_dnn, mosi_aligned, batch 1, eager "
                   "and the eager Predictor, 5 calls: a smoke test")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    providers = args.providers or (
        ["eager", "eager_cmdie_loop", "predictor_eager", "predictor_cuda_graphs", "predictor", "server"] if gpu else
        ["eager", "eager_cmdie_loop", "onnxruntime", "aoti", "predictor_eager", "predictor_compiled",
         "predictor_onnxruntime", "predictor", "server"])
    models = args.models or available_models()
    shapes, batches = args.shapes, args.batches
    if args.quick:
        models, shapes, batches, args.iters, args.warmup, args.rounds = ["lf_dnn"], ["mosi_aligned"], [1], 5, 2, 1
        providers = ["eager", "predictor_eager"]
    env = environment(device)
    payload = {"op": "inference", "env": env, "results": [],
               "args": {k: v for k, v in vars(args).items() if k != "out"},
               "note": "p50/p99 over --iters calls after warm-up, the providers of a (model, "
                       "shape, batch) interleaved in --rounds rounds (each row's 'calls': fewer "
                       "where --row-seconds ran out); server: single-sample requests from N "
                       "concurrent localhost clients"}
    path = args.out or os.path.join(RESULTS, f"inference_{device.type}.json")
    if device.type == "cpu" and not args.quick and (args.providers is None or "predictor_overhead" in args.providers):
        for row in overhead_rows(max(args.iters, 2000), args.rounds):
            print(row, flush=True)
            payload["results"].append(row)
    for shape in shapes:
        preset, aligned = SHAPES[shape]
        for name in models:
            batch1, dims = make_batch(preset, aligned, 1)
            torch.manual_seed(0)
            model = build_model(name, dims).to(device).eval()
            if "server" in providers and (shape == "mosi_aligned" or args.providers):
                # (the server's cost is HTTP + batching: one shape is enough by default)
                try:
                    for r in _server_rows(name, model.cpu(), dims, batch1, args.clients,
                                          args.server_seconds, False):
                        row = {"model": name, "shape": shape, "batch": 1, **r}
                        print(row, flush=True)
                        payload["results"].append(row)
                except Exception as exc:  # recorded, not fatal
                    row = {"model": name, "shape": shape, "provider": "server",
                           "error": f"{type(exc).__name__}: {exc}"[:300]}
                    print(row, flush=True)
                    payload["results"].append(row)
                model.to(device)
            runners = {}
            build_s = {}
            for prov in providers:
                t0 = time.perf_counter()
                try:
                    run = _runner(prov, name, model, dims, device, aligned, max(batches))
                except Exception as exc:  # recorded, not fatal (e.g. an export that fails)
                    run = exc
                if run is not None:
                    runners[prov] = run
                    build_s[prov] = round(time.perf_counter() - t0, 2)
            for B in batches:
                mixed = shape == "mosi_mixed"
                pool = [make_batch(preset, aligned, B, seed=i, mixed=mixed)[0]
                        for i in range(MIXED_POOL if mixed else 1)]
                rows, fns = {}, {}
                for prov, run in runners.items():
                    rows[prov] = {"model": name, "shape": shape, "batch": B, "provider": prov}
                    if prov in ("onnxruntime", "aoti") and B == batches[0]:
                        rows[prov]["export_s"] = build_s[prov]  # export + check against eager
                    if isinstance(run, Exception):
                        rows[prov]["error"] = f"{type(run).__name__}: {run}"[:300]
                        continue
                    # model.eval() gets the batch on its device; the others take host tensors
                    bs = [{k: v.to(device) for k, v in b.items()} for b in pool] if prov.startswith("eager") else pool
                    try:  # the first call (a compile / capture of the bucket) is timed apart
                        t0 = time.perf_counter()
                        for b in bs:
                            run(b)
                        rows[prov]["first_call_s"] = round(time.perf_counter() - t0, 2)
                        it = itertools.cycle(bs)
                        fns[prov] = lambda run=run, it=it: run(next(it))
                    except Exception as exc:  # recorded, not fatal
                        rows[prov]["error"] = f"{type(exc).__name__}: {exc}"[:300]
                times = _time_interleaved(fns, args.iters, args.warmup, args.rounds, device,
                                          args.row_seconds) if fns else {}
                for prov, row in rows.items():
                    if prov in times:
                        row.update(_stats(times[prov], B))
                    if prov.startswith("predictor") and not isinstance(runners[prov], Exception):
                        pr = runners[prov].__self__
                        row["runtime"] = pr.runtime_for(pr.bucket_of(B, [TEXT_LEN] * 3)[0])
                        if pr.fallbacks:
                            row["fallbacks"] = dict(pr.fallbacks)
                        if pr.device.type == "cuda":  # a CUDA-graphs row really replayed graphs
                            row["graphs_captured"] = pr.graphs_captured
                    print(row, flush=True)
                    payload["results"].append(row)
            write("inference", payload, path)  # after every model: nothing lost on interruption
    payload["speedup"] = _speedups(payload["results"])
    payload["auto_cpu"] = {m: [list(e) for e in v] for m, v in auto_table(payload).items()} if not gpu else None
    write("inference", payload, path)
    print(json.dumps(payload["speedup"], indent=1))
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(table(payload))
    with open(os.path.splitext(path)[0] + "_summary.md", "w") as f:
        f.write(summary(payload))
    with open(os.path.splitext(path)[0] + "_runtimes.md", "w") as f:
        f.write(runtime_table(payload))
    _plot(payload, path)


RUNTIME_COLUMNS = ("eager", "onnxruntime", "aoti", "predictor_eager", "predictor_compiled",
                   "predictor_onnxruntime", "predictor_aoti", "predictor")


def runtime_table(payload: dict) -> str:
    """The README's runtime table: p50 ms per model, shape and batch for every provider measured,
    the runtime ``auto`` ran, and the default Predictor's p50 over ONNX Runtime's."""
    rows = [r for r in payload["results"] if "p50_ms" in r and "clients" not in r and r["model"] != "zero"]
    cols = [c for c in RUNTIME_COLUMNS if any(r["provider"] == c for r in rows)]
    lines = [f"{payload['env']['device']}, {payload['env']['threads']} threads, torch "
             f"{payload['env']['torch']}, commit {str(payload['env']['commit'])[:10]}; p50 ms; "
             "predictor = the Predictor's defaults (runtime auto)", "",
             "| model | shape | batch | " + " | ".join(cols) + " | auto ran | predictor / onnxruntime |",
             "|---|---|---|" + "---|" * (len(cols) + 2)]
    for key in dict.fromkeys((r["model"], r["shape"], r["batch"]) for r in rows):
        got = {r["provider"]: r for r in rows if (r["model"], r["shape"], r["batch"]) == key}
        cells = [f"{got[c]['p50_ms']:.3f}" if c in got else "" for c in cols]
        best = min((got[c]["p50_ms"], c) for c in cols if c in got)[1]
        cells = [f"**{v}**" if c == best and v else v for c, v in zip(cols, cells)]
        ratio = (f"{got['predictor']['p50_ms'] / got['onnxruntime']['p50_ms']:.2f}"
                 if "predictor" in got and "onnxruntime" in got else "")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells)
                     + f" | {got.get('predictor', {}).get('runtime', '')} | {ratio} |")
    over = [r for r in payload["results"] if "overhead_us" in r]
    if over:
        lines += ["", "The Predictor's own cost at batch 1 (a model that returns zeros): "
                  + "; ".join(f"{r['provider'].removeprefix('predictor_overhead_').replace('_', ' ')} "
                              f"{r['overhead_us']:.1f} us" for r in over)]
    return "\n".join(lines) + "\n"


def summary(payload: dict) -> str:
    """The README's compact table: per model and shape, eager -> Predictor p50 and throughput at
    each batch (the compiled or CUDA-graph Predictor where measured, else the eager one; named),
    and the server rows."""
    rows = [r for r in payload["results"] if "p50_ms" in r]
    batches = sorted({r["batch"] for r in rows if "clients" not in r})
    fast = ("predictor_compiled", "predictor_cuda_graphs", "predictor_eager")
    head = " | ".join(f"batch {b}: p50 eager -> Predictor (x), samples/s x" for b in batches)
    lines = [f"{payload['env']['device']}, {payload['env']['threads']} threads, torch "
             f"{payload['env']['torch']}, commit {str(payload['env']['commit'])[:10]}; "
             f"x = Predictor / eager (p50 ratio; throughput ratio); Predictor = "
             f"{' / '.join(p for p in fast if any(r['provider'] == p for r in rows))}", "",
             f"| model | shape | {head} |", "|---|---|" + "---|" * len(batches)]
    seen = list(dict.fromkeys((r["model"], r["shape"]) for r in rows if "clients" not in r))
    for model, shape in seen:
        cells = []
        for b in batches:
            got = {r["provider"]: r for r in rows if (r["model"], r["shape"], r.get("batch")) == (model, shape, b)
                   and "clients" not in r}
            e = got.get("eager")
            p = next((got[k] for k in fast if k in got), None)
            if e is None or p is None:
                cells.append("")
                continue
            tag = {"predictor_compiled": "compiled", "predictor_cuda_graphs": "CUDA graphs",
                   "predictor_eager": "eager Predictor"}[p["provider"]]
            cells.append(f"{e['p50_ms']:.2f} -> {p['p50_ms']:.2f} ms {tag} ({p['p50_ms'] / e['p50_ms']:.2f}x); "
                         f"{p['samples_per_s'] / e['samples_per_s']:.2f}x")
        lines.append(f"| {model} | {shape} | " + " | ".join(cells) + " |")
    server = [r for r in rows if "clients" in r]
    if server:
        clients = sorted({r["clients"] for r in server})
        lines += ["", "| model (server, single-sample POST /predict) | "
                  + " | ".join(f"{c} clients: p50 ms, req/s" for c in clients) + " |",
                  "|---|" + "---|" * len(clients)]
        for model in dict.fromkeys(r["model"] for r in server):
            by = {r["clients"]: r for r in server if r["model"] == model}
            lines.append(f"| {model} | " + " | ".join(
                f"{by[c]['p50_ms']:.1f}, {by[c]['samples_per_s']:.1f}" if c in by else "" for c in clients) + " |")
    return "\n".join(lines) + "\n"


def table(payload: dict) -> str:
    """The README's table: p50 / p99 ms and samples/s per model, shape, batch and provider."""
    lines = [f"{payload['env']['device']}, {payload['env']['threads']} threads, torch "
             f"{payload['env']['torch']}, commit {str(payload['env']['commit'])[:10]}", "",
             "| model | shape | batch | provider | p50 ms | p99 ms | samples/s | vs eager p50 |",
             "|---|---|---|---|---|---|---|---|"]
    ratio = {(r["model"], r["shape"], r["batch"], r["provider"]): r["p50_ratio"]
             for r in payload.get("speedup", [])}
    for r in payload["results"]:
        if "p50_ms" not in r:
            continue
        prov = r["provider"] + (f" ({r['clients']} clients)" if "clients" in r else "")
        x = ratio.get((r["model"], r["shape"], r.get("batch"), r["provider"]))
        lines.append(f"| {r['model']} | {r['shape']} | {r.get('batch', 1)} | {prov} | {r['p50_ms']:.3f} "
                     f"| {r['p99_ms']:.3f} | {r['samples_per_s']:.1f} | {'' if x is None else f'{x:.2f}x'} |")
    return "\n".join(lines) + "\n"


def _speedups(rows: list[dict]) -> list[dict]:
    """Per (model, shape, batch): eager p50 / Predictor p50 and Predictor / eager throughput."""
    out = []
    key = lambda r: (r["model"], r["shape"], r.get("batch"))  # noqa: E731
    eager = {key(r): r for r in rows if r["provider"] == "eager" and "p50_ms" in r}
    for r in rows:
        if r["provider"] != "eager" and "clients" not in r and "p50_ms" in r and key(r) in eager:
            e = eager[key(r)]
            out.append({"model": r["model"], "shape": r["shape"], "batch": r["batch"],
                        "provider": r["provider"],
                        "p50_ratio": round(r["p50_ms"] / e["p50_ms"], 3),
                        "throughput_x": round(r["samples_per_s"] / e["samples_per_s"], 2)})
    return out


def _plot(payload: dict, path: str) -> None:
    if not have_matplotlib():
        return
    rows = [r for r in payload["results"] if "p50_ms" in r and r["provider"] != "server"]
    if not rows:
        return
    batches = sorted({r["batch"] for r in rows})
    png = os.path.splitext(path)[0] + ".png"
    with figure(png, 1, len(batches), figsize=(5 * len(batches), 4.5), squeeze=False) as (fig, axes):
        for ax, B in zip(axes[0], batches):
            sub = [r for r in rows if r["batch"] == B]
            groups = list(dict.fromkeys(f"{r['model']}\n{r['shape']}" for r in sub))
            provs = list(dict.fromkeys(r["provider"] for r in sub))
            width = 0.8 / len(provs)
            for i, prov in enumerate(provs):
                vals = [next((r["p50_ms"] for r in sub if f"{r['model']}\n{r['shape']}" == g
                              and r["provider"] == prov), 0) for g in groups]
                ax.bar([j + i * width for j in range(len(groups))], vals, width, label=prov)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, rotation=60,
                          fontsize=6)
            ax.set_yscale("log")
            ax.set_ylabel("p50 latency (ms)")
            ax.set_title(f"batch {B}", fontsize=9)
            ax.legend(fontsize=7)
        fig.suptitle(f"inference on {payload['env']['device']} ({payload['env']['threads']} threads)",
                     fontsize=9)


if __name__ == "__main__":
    main()
