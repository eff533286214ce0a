"""msa-fast serve: the real LitServe server on 127.0.0.1 (a subprocess on a free port), real
HTTP requests, answers compared with Predictor.predict; malformed requests get a 422 naming the
field and the server keeps serving."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("litserve", reason="the serve extra (pip install 'msa_fast[serve]'); CI installs it")

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast.cli import main  # noqa: E402
from msa_fast.inference import Predictor  # noqa: E402

DIMS = {"text": 768, "audio": 5, "vision": 20}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body, timeout=60):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/predict", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_run")
    assert main(["train", "--model", "lf_dnn", "--data", "synthetic:tiny:limit=48", "--epochs", "1",
                 "--seeds", "1", "--no-progress", "--out", str(out),
                 "--model-cfg", '{"hidden": 16, "av_hidden": 8}']) == 0
    run = out / "seed_1"
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "msa_fast", "serve", "--checkpoint", str(run),
                             "--host", "127.0.0.1", "--port", str(port), "--max-batch", "8",
                             "--batch-timeout", "0.01", "--no-compile", "--max-length", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "the server did not answer /health in 180 s"
            time.sleep(0.5)
        yield url, Predictor.from_checkpoint(str(run), compile=False)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _sample(seed, lt=None, la=None, lv=None):
    g = np.random.default_rng(seed)
    lt, la, lv = lt or int(g.integers(1, 40)), la or int(g.integers(1, 40)), lv or int(g.integers(1, 40))
    return {"text": g.standard_normal((lt, 768)).round(4).tolist(),
            "audio": g.standard_normal((la, 5)).round(4).tolist(),
            "vision": g.standard_normal((lv, 20)).round(4).tolist()}


def _expected(pred, sample):
    return float(pred.predict([{k: torch.tensor(v) for k, v in sample.items()}])[0])


def test_health_and_single_request(server):
    url, pred = server
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        assert r.status == 200
    s = _sample(0)
    status, body = _post(url, s)
    assert status == 200 and set(body) == {"sentiment", "class_7"}
    assert abs(body["sentiment"] - _expected(pred, s)) < 1e-5
    assert body["class_7"] == int(round(min(3.0, max(-3.0, body["sentiment"]))))


def test_32_concurrent_requests(server):
    url, pred = server
    samples = [_sample(100 + i) for i in range(32)]
    with ThreadPoolExecutor(32) as ex:
        answers = list(ex.map(lambda s: _post(url, s), samples))
    assert all(status == 200 for status, _ in answers)
    got = torch.tensor([body["sentiment"] for _, body in answers])
    want = torch.tensor([_expected(pred, s) for s in samples])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, field", [
    (lambda s: s.pop("audio"), "audio"),
    (lambda s: s.update(vision=[[0.5] * 19]), "vision"),
    (lambda s: s.update(audio=[["loud"] * 5]), "audio"),
    (lambda s: s.update(text=[[0.1] * 768] * 65), "text"),  # over --max-length 64
    (lambda s: s.update(vision=[0.5] * 20), "vision"),  # rank 1
    (lambda s: s["audio"][0].__setitem__(2, float("nan")), "audio"),  # JSON's NaN literal
    (lambda s: s["text"][-1].__setitem__(0, 1e39), "text"),  # finite, but inf in float32
])
def test_malformed_request_is_4xx_and_the_server_keeps_serving(server, change, field):
    url, pred = server
    bad = _sample(7)
    change(bad)
    status, body = _post(url, bad)
    assert 400 <= status < 500, (status, body)
    assert any(d["loc"][:2] == ["body", field] for d in body["detail"]), body
    good = _sample(8)
    status, body = _post(url, good)
    assert status == 200 and abs(body["sentiment"] - _expected(pred, good)) < 1e-5


def test_not_json_is_4xx(server):
    url, _ = server
    status, _ = _post(url, b"{not json")
    assert 400 <= status < 500
    assert _post(url, _sample(9))[0] == 200
