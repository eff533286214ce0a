"""``msa-fast serve`` latency and throughput (contract §8, issue 28): 1 / 8 / 32 concurrent
localhost clients, one MOSI-aligned sample (text 50 x 768, audio 50 x 5, vision 50 x 20) per
request, JSON and binary, p50 / p99 and requests/s, in one run.

Modes (each a real server process on a free port of 127.0.0.1, started and stopped here):

- ``binary``: ``POST /v2/models/{name}/infer`` with the KServe v2 binary tensor extension
  (the JSON header, then the raw float32 tensors; binary outputs), what ``tritonclient.http``
  sends with ``binary_data=True``;
- ``tritonclient``: the same requests through the stock ``tritonclient.http`` client, binary
  tensors both ways (the issue's bar: one client p50 <= 5 ms, >= 150 samples/s at 16 clients);
- ``json``: ``POST /predict`` with the sample as nested JSON lists (0.8 MB);
- ``litserve_json`` (``--litserve``, needs ``litserve`` installed): the same JSON requests to
  LitServe 0.2 around the same Predictor, with its faster options (``fast_queue=True``, its
  ZeroMQ transport instead of the ``multiprocessing.Manager`` queues; one API server; a numpy
  decode), the measurement behind dropping it (see the README).

Clients are threads with one persistent ``http.client`` connection each and pre-encoded bodies,
so that the client costs as little as it can; on this 2-core machine they still share the CPU
with the server, so the numbers are a floor of what a separate client host would see. Each
cell runs ``--seconds`` after a warm-up of every batch bucket the server may form; latency per
request (p50, p99 over all of them), throughput = answered requests / seconds.

    python benchmarks/models/bench_serve.py                               # AGFN trained on synthetic:tiny
    python benchmarks/models/bench_serve.py --checkpoint out/seed_1 --litserve
    python benchmarks/models/bench_serve.py --quick                       # smoke, seconds

JSON: ``benchmarks/results/serve_cpu.json``; the README's markdown table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

import numpy as np

from benchmarks._common import RESULTS, environment
from msa_fast._io import save_json
from msa_fast.train.checkpoint import read_run_state

L = 50
WIDTHS = {"text": 768, "audio": 5, "vision": 20}

LITSERVE_SERVER = textwrap.dedent('''
    import sys
    import litserve as ls
    import numpy as np
    from msa_fast.inference import Predictor

    CKPT, PORT, MAX_BATCH, TIMEOUT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

    class API(ls.LitAPI):
        def setup(self, device):
            self.p = Predictor.from_checkpoint(CKPT, max_batch=MAX_BATCH)
        def decode_request(self, request):
            return {k: np.asarray(request[k], np.float32) for k in ("text", "audio", "vision")}
        def batch(self, inputs):
            return list(inputs)
        def predict(self, x):
            return self.p.predict(x).tolist()
        def unbatch(self, output):
            return list(output)
        def encode_response(self, output):
            return {"sentiment": float(output)}

    if __name__ == "__main__":
        api = API(max_batch_size=MAX_BATCH, batch_timeout=TIMEOUT)
        server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60,
                              fast_queue=True)
        server.run(host="127.0.0.1", port=PORT, generate_client_file=False, num_api_servers=1,
                   log_level="warning")
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint(path: str | None) -> str:
    if path:
        return path
    out = os.path.join(tempfile.gettempdir(), "msa_fast_bench_serve_agfn")
    run = os.path.join(out, "seed_1")
    if not os.path.isfile(os.path.join(run, "best.safetensors")):
        subprocess.run([sys.executable, "-m", "msa_fast", "train", "--model", "agfn", "--data",
                        "synthetic:tiny", "--epochs", "1", "--seeds", "1", "--no-progress", "--out", out,
                        "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return run


def _start(cmd: list[str], health: str, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(health, timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    _stop(proc)
    raise RuntimeError(f"server not ready in {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _samples(n: int) -> list[dict]:
    g = np.random.default_rng(0)
    return [{m: g.standard_normal((L, w), dtype=np.float32) for m, w in WIDTHS.items()} for _ in range(n)]


def _bodies(n: int, name: str) -> dict:
    """``n`` distinct samples, pre-encoded for each mode: (path, body, headers)."""
    samples = _samples(n)
    js = [json.dumps({k: v.tolist() for k, v in s.items()}).encode() for s in samples]
    binary = []
    for s in samples:
        raw = [s[m][None].tobytes() for m in WIDTHS]
        head = json.dumps({"inputs": [{"name": m.upper(), "datatype": "FP32", "shape": [1, L, w],
                                       "parameters": {"binary_data_size": len(r)}}
                                      for (m, w), r in zip(WIDTHS.items(), raw)],
                           "parameters": {"binary_data_output": True}}).encode()
        binary.append((f"/v2/models/{name}/infer", head + b"".join(raw),
                       {"Inference-Header-Content-Length": str(len(head)),
                        "Content-Type": "application/octet-stream"}))
    jh = {"Content-Type": "application/json"}
    return {"json": [("/predict", b, jh) for b in js], "litserve_json": [("/predict", b, jh) for b in js],
            "binary": binary}


def _drive(clients: int, seconds: float, make_client) -> dict:
    """``clients`` threads for ``seconds``, each calling its ``make_client(k)`` -> ``send(j)``
    (True when answered 200) with requests ``k, k + clients, ...``; latency per answered
    request, p50 / p99 over all, throughput = answered / wall time."""
    stop_at = time.perf_counter() + seconds
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def client(k: int) -> None:
        send, close = make_client(k)
        j = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            if send(j):
                lat[k].append(time.perf_counter() - t0)
            else:
                errors[k] += 1
            j += clients
        close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = np.array([x for li in lat for x in li]) * 1e3
    return {"clients": clients, "requests": int(all_lat.size), "errors": int(sum(errors)),
            "p50_ms": round(float(np.percentile(all_lat, 50)), 3) if all_lat.size else None,
            "p99_ms": round(float(np.percentile(all_lat, 99)), 3) if all_lat.size else None,
            "requests_per_s": round(all_lat.size / wall, 1)}


def _load(port: int, reqs: list, clients: int, seconds: float) -> dict:
    """Pre-encoded requests on one persistent ``http.client`` connection per client."""
    def connect() -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.connect()
        # http.client sends the headers and the body in two writes: without TCP_NODELAY
        # Nagle holds the body back until the headers' delayed ACK (a few ms a request)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def make_client(k: int):
        state = {"conn": connect()}

        def send(j: int) -> bool:
            path, body, headers = reqs[j % len(reqs)]
            try:
                state["conn"].request("POST", path, body, headers)
                r = state["conn"].getresponse()
                r.read()
                return r.status == 200
            except OSError:
                state["conn"].close()
                state["conn"] = connect()
                return False
        return send, lambda: state["conn"].close()

    return _drive(clients, seconds, make_client)


def _load_triton(port: int, name: str, samples: list[dict], clients: int, seconds: float) -> dict:
    """The same through the stock ``tritonclient.http`` client, binary tensors both ways (what
    a KServe / Triton user runs unchanged): one client object (one connection) per thread."""
    import tritonclient.http as th

    def inputs_of(s):
        ins = []
        for m in WIDTHS:
            i = th.InferInput(m.upper(), [1, *s[m].shape], "FP32")
            i.set_data_from_numpy(s[m][None], binary_data=True)
            ins.append(i)
        return ins

    prepared = [inputs_of(s) for s in samples]
    outputs = [th.InferRequestedOutput("SENTIMENT", binary_data=True)]

    def make_client(k: int):
        c = th.InferenceServerClient(f"127.0.0.1:{port}")

        def send(j: int) -> bool:
            try:
                c.infer(name, prepared[j % len(prepared)], outputs=outputs)
                return True
            except Exception:  # noqa: BLE001 - counted as an error
                return False
        return send, c.close

    return _drive(clients, seconds, make_client)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="run directory (default: AGFN trained 1 epoch on synthetic:tiny)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--modes", nargs="+", default=["binary", "tritonclient", "json"],
                   choices=["binary", "tritonclient", "json", "litserve_json"])
    p.add_argument("--litserve", action="store_true", help="add the litserve_json mode")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--batch-timeout", type=float, default=0.005)
    p.add_argument("--quick", action="store_true", help="1 s a cell, clients 1 and 8")
    p.add_argument("--out", default=os.path.join(RESULTS, "serve_cpu.json"))
    args = p.parse_args()
    if args.quick:
        args.seconds, args.clients = 1.0, [1, 8]
    modes = list(dict.fromkeys(args.modes + (["litserve_json"] if args.litserve else [])))
    run = _checkpoint(args.checkpoint)
    name = read_run_state(run)["model"]
    bodies = _bodies(64, name)
    samples = _samples(64)
    rows = []
    for server in dict.fromkeys("litserve" if m == "litserve_json" else "msa_fast" for m in modes):
        port = _free_port()
        if server == "msa_fast":
            cmd = [sys.executable, "-m", "msa_fast", "serve", "--checkpoint", run, "--port", str(port),
                   "--max-batch", str(args.max_batch), "--batch-timeout", str(args.batch_timeout)]
            health = f"http://127.0.0.1:{port}/v2/health/ready"
        else:
            script = os.path.join(tempfile.mkdtemp(), "litserve_server.py")
            open(script, "w").write(LITSERVE_SERVER)
            cmd = [sys.executable, script, run, str(port), str(args.max_batch), str(args.batch_timeout)]
            health = f"http://127.0.0.1:{port}/health"
        proc = _start(cmd, health)
        try:
            for mode in [m for m in modes if (m == "litserve_json") == (server == "litserve")]:
                if mode == "tritonclient":
                    load = lambda c, s, port=port: _load_triton(port, name, samples, c, s)  # noqa: E731
                else:
                    load = lambda c, s, mode=mode, port=port: _load(port, bodies[mode], c, s)  # noqa: E731
                load(max(args.clients), min(2.0, args.seconds))  # warm-up
                for c in args.clients:
                    r = {"mode": mode, **load(c, args.seconds)}
                    r["samples_per_s"] = r["requests_per_s"]
                    print(json.dumps(r), flush=True)
                    rows.append(r)
        finally:
            _stop(proc)
    import torch

    payload = {"benchmark": "serve", "model": name, "checkpoint": run, "sample": "MOSI aligned, 50 steps",
               "seconds": args.seconds, "max_batch": args.max_batch, "batch_timeout": args.batch_timeout,
               "environment": environment(torch.device("cpu")), "results": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    save_json(args.out, payload, indent=1)
    md = ["| mode | clients | p50 ms | p99 ms | requests/s | errors |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['mode']} | {r['clients']} | {r['p50_ms']} | {r['p99_ms']} | {r['requests_per_s']} | {r['errors']} |"
           for r in rows]
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
