"""msa-fast export (ONNX, AOTInductor) and Predictor(runtime=...): the LSTM op against nn.LSTM,
the exported files run by programs that never import msa_fast and equal the Predictor, the
export check refuses a difference, the Predictor's ONNX Runtime / auto runtimes equal eager on
mixed lengths and missing modalities with nothing recompiled or fallen back, fallbacks are
counted, an earlier checkpoint layout exports and a corrupt one is a one-line error."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast.cli import main  # noqa: E402
from msa_fast.inference import Predictor, runtimes  # noqa: E402
from msa_fast.inference import export as E  # noqa: E402
from msa_fast.models import build_model  # noqa: E402

pytest.importorskip("onnxscript", reason="the [onnx] extra (onnx, onnxscript, onnxruntime)")
pytest.importorskip("onnxruntime", reason="the [onnx] extra (onnx, onnxscript, onnxruntime)")

DIMS = {"text": 768, "audio": 5, "vision": 20, "text_input": "features"}
TINY = ["--data", "synthetic:tiny:limit=48", "--epochs", "1", "--batch-size", "16", "--no-progress",
        "--model-cfg", '{"hidden": 16, "av_hidden": 8}', "--seeds", "1"]
OLD = os.path.join(os.path.dirname(__file__), "data", "old_checkpoints")


def _samples(seed=0, lengths=(45, 40, 49, 50, 8, 50)):
    """One aligned sample per length, and one more without audio (the drop protocol's zeros)."""
    g = np.random.default_rng(seed)
    out = [{m: g.standard_normal((L, DIMS[m]), dtype=np.float32) for m in ("text", "audio", "vision")}
           for L in lengths]
    out.append({"text": g.standard_normal((30, 768), dtype=np.float32),
                "vision": g.standard_normal((30, 20), dtype=np.float32)})
    return out


def _model(name="lf_dnn", seed=0):
    torch.manual_seed(seed)
    return build_model(name, DIMS).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export_run")
    assert main(["train", "--model", "lf_dnn", *TINY, "--out", str(out)]) == 0
    return out / "seed_1"


# -- the LSTM op ----------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_op_equals_nn_lstm(layers):
    from msa_fast.ops.lstm import lstm, lstm_weights

    torch.manual_seed(layers)
    ref = torch.nn.LSTM(7, 5, num_layers=layers, batch_first=True).eval()
    x = torch.randn(3, 11, 7)
    with torch.no_grad():
        want = ref(x)[0]
    assert [w.data_ptr() for w in lstm_weights(ref)] == [w.data_ptr() for w in ref._flat_weights]
    got = lstm(x, lstm_weights(ref), 5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert got.is_contiguous()
    torch.library.opcheck(torch.ops.msa_fast.lstm.default, (x, [w.detach() for w in lstm_weights(ref)], 5),
                          test_utils=("test_schema", "test_faketensor"))


# -- exported files without msa_fast --------------------------------------------------------

_ORT_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    path, inputs, out = sys.argv[1:4]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    names = meta["msa_fast.inputs"].split(",")
    assert [i.name for i in sess.get_inputs()] == names, (names, [i.name for i in sess.get_inputs()])
    feeds = np.load(inputs)
    preds = [sess.run(None, {n: feeds[f"{k}.{n}"] for n in names})[0]
             for k in sorted({key.split(".")[0] for key in feeds.files}, key=int)]
    np.save(out, np.concatenate(preds))
    print(json.dumps({"msa_fast_imported": "msa_fast" in sys.modules, "model": meta["msa_fast.model"],
                      "mask": meta["msa_fast.mask"]}))
""")

_AOTI_SCRIPT = textwrap.dedent("""
    import json, runpy, sys
    import numpy as np
    import torch
    path, inputs, out = sys.argv[1:4]
    runpy.run_path(path + ".ops.py")  # registers msa_fast::lstm with torch alone
    loaded = torch._inductor.aoti_load_package(path)
    meta = loaded.get_metadata()
    names = meta["msa_fast.inputs"].split(",")
    feeds = np.load(inputs)
    with torch.inference_mode():
        preds = [loaded(*[torch.from_numpy(feeds[f"{k}.{n}"]) for n in names]).numpy()
                 for k in sorted({key.split(".")[0] for key in feeds.files}, key=int)]
    np.save(out, np.concatenate(preds))
    print(json.dumps({"msa_fast_imported": "msa_fast" in sys.modules, "model": meta["msa_fast.model"],
                      "mask": meta["msa_fast.mask"]}))
""")


def _graph_feeds(pred, samples, path):
    """Per sample, the graph inputs the Predictor feeds its runtime (its own bucket padding),
    saved for a program without msa_fast; returns the Predictor's predictions."""
    from msa_fast.inference import predictor as P

    feeds, want = {}, []
    rows = P._sample_rows(samples, pred.dims)
    lengths, present = P._row_lengths(rows, False)
    for k in range(len(rows)):
        longest = lengths[k]
        key = pred.bucket_of(1, longest)
        padded = P._fill_rows(rows[k:k + 1], lengths[k:k + 1], present[k:k + 1], pred.dims, key[0], key[1:])
        padded.setdefault("present", np.ones((1, 3), bool))
        for n in E.input_names(pred.dims):
            feeds[f"{k}.{n}"] = padded[n]
        want.append(pred.predict([samples[k]]).numpy())
    np.savez(path, **feeds)
    return np.concatenate(want)


@pytest.mark.parametrize("fmt, script", [("onnx", _ORT_SCRIPT), ("aoti", _AOTI_SCRIPT)])
def test_exported_file_runs_without_msa_fast(run_dir, tmp_path, capsys, fmt, script):
    out = str(tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt2'}")
    assert main(["export", "--checkpoint", str(run_dir), "--format", fmt, "--out", out]) == 0
    assert "max |exported - eager|" in capsys.readouterr().out
    meta = json.loads(open(out + ".json").read())
    assert meta["msa_fast.model"] == "lf_dnn" and meta["msa_fast.aligned"] == "true"
    assert meta["msa_fast.checked_on"] == "random and the run's test samples"
    pred = Predictor.from_checkpoint(str(run_dir), device="cpu", runtime="eager")
    # lengths 45 .. 8 pad into buckets 50 and 8; the last sample has no audio
    want = _graph_feeds(pred, _samples(), str(tmp_path / "inputs.npz"))
    (tmp_path / "run.py").write_text(script)
    res = subprocess.run([sys.executable, str(tmp_path / "run.py"), out, str(tmp_path / "inputs.npz"),
                          str(tmp_path / "preds.npy")], capture_output=True, text=True, cwd=str(tmp_path),
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"msa_fast_imported": False, "model": "lf_dnn", "mask": "True = padding"}
    got = np.load(tmp_path / "preds.npy")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # refuses to overwrite without --overwrite
    assert main(["export", "--checkpoint", str(run_dir), "--format", fmt, "--out", out]) == 2
    assert "exists" in capsys.readouterr().err


def test_export_refuses_a_difference():
    pred = Predictor(_model(), DIMS, runtime="eager", model_name="lf_dnn")
    forward = E.ExportForward(pred.model, DIMS).eval()

    def off(*inputs):
        with torch.inference_mode():
            return forward(*inputs).numpy() + 1e-3
    with pytest.raises(E.ExportError, match=r"random batch 1, lengths \(50, 50, 50\): the exported graph "
                                            r"differs from eager by 0\.001"):
        E.verify(off, forward, DIMS, aligned=True)
    assert E.verify(lambda *a: forward(*a).numpy(), forward, DIMS, aligned=True) == 0.0


# -- Predictor runtimes ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lf_dnn", "agfn"])
def test_onnxruntime_runtime_equals_eager_on_mixed_lengths(name):
    model = _model(name)
    ref = Predictor(model, DIMS, runtime="eager", model_name=name)
    pred = Predictor(model, DIMS, runtime="onnxruntime", model_name=name)
    samples = _samples(seed=1)
    for s in samples:  # one request at a time, as they come
        torch.testing.assert_close(pred.predict([s]), ref.predict([s]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.predict(samples), ref.predict(samples), atol=1e-5, rtol=1e-5)
    assert pred.runtime_for(1) == "onnxruntime" and not pred.fallbacks
    # one graph per layout and "present" variant, built once: aligned without / with present
    assert sorted(k for k, v in pred._exported.items() if v is not None) == [
        ("onnxruntime", True, False), ("onnxruntime", True, True)]


def test_unaligned_batch_dict_through_onnxruntime():
    model = _model("agfn")
    g = torch.Generator().manual_seed(2)
    batch = {}
    for m, L in (("text", 30), ("audio", 60), ("vision", 45)):
        lens = torch.randint(1, L + 1, (3,), generator=g)
        lens[0] = L
        batch[f"{m}_mask"] = torch.arange(L)[None] >= lens[:, None]
        batch[m] = torch.randn(3, L, DIMS[m], generator=g) * (~batch[f"{m}_mask"])[..., None]
    with torch.inference_mode():
        want = model(batch)["pred"]
    pred = Predictor(model, DIMS, runtime="onnxruntime", model_name="agfn")
    torch.testing.assert_close(pred.predict(batch), want, atol=1e-5, rtol=1e-5)
    assert ("onnxruntime", False, False) in pred._exported and not pred.fallbacks


def test_runtime_arguments():
    with pytest.raises(ValueError, match=r"runtime: expected one of"):
        Predictor(_model(), DIMS, runtime="tensorrt")
    with pytest.raises(ValueError, match=r"compile: compile=True means runtime 'compiled'"):
        Predictor(_model(), DIMS, compile=True, runtime="onnxruntime")
    assert Predictor(_model(), DIMS, compile=False).runtime == "eager"
    assert Predictor(_model(), DIMS, runtime="aoti", model_name="agfn").torch_runtime == "compiled"


def test_auto_follows_the_table_and_falls_back_without_onnxruntime(monkeypatch):
    name = next(m for m, entries in runtimes.AUTO_CPU.items() if any(rt == "onnxruntime" for _, rt in entries))
    for top, rt in runtimes.AUTO_CPU[name]:
        assert Predictor(_model(name), DIMS, model_name=name).runtime_for(top) == rt
    monkeypatch.setattr(runtimes, "onnxruntime_available", lambda: False)
    pred = Predictor(_model(name), DIMS, model_name=name)
    assert all(pred.runtime_for(top) in ("eager", "compiled") for top, _ in runtimes.AUTO_CPU[name])
    with pytest.raises(ValueError, match=r"pip install 'msa_fast\[onnx\]'"):
        Predictor(_model(name), DIMS, runtime="onnxruntime")


def test_auto_table_is_the_benchmark():
    """AUTO_CPU is what benchmarks/results/inference_cpu_mosi.json measured (bench_inference.py
    writes it as "auto_cpu")."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "inference_cpu_mosi.json")
    with open(path) as f:
        measured = json.load(f)["auto_cpu"]
    table = {m: [list(e) for e in v] for m, v in runtimes.AUTO_CPU.items()}
    assert table == measured


def test_export_failure_falls_back_counted_and_warned_once(monkeypatch):
    model = _model()
    pred = Predictor(model, DIMS, runtime="onnxruntime", model_name="lf_dnn")

    def broken(*a, **k):
        raise E.ExportError("export: torch.onnx.export failed: boom")
    monkeypatch.setattr(E, "export_onnx", broken)
    s = _samples()[:2]
    with pytest.warns(RuntimeWarning, match="onnxruntime export failed"):
        got = pred.predict(s)
    torch.testing.assert_close(got, Predictor(model, DIMS, runtime="eager").predict(s), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred.predict(s)  # the layout stays on torch: no second export, no second warning
    assert pred.fallbacks["onnxruntime export"] == 1


# -- checkpoints ----------------------------------------------------------------------------

def test_earlier_layout_checkpoint_exports(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from msa_fast.train.checkpoint import save_json

    with open(os.path.join(OLD, "promma.json")) as f:
        meta = json.load(f)
    tensors = load_file(os.path.join(OLD, "promma.safetensors"))
    run = tmp_path / "run"
    run.mkdir()
    save_file({k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")},
              str(run / "best.safetensors"))
    save_json(str(run / "state.json"), {
        "epoch": 0, "weights": "best.safetensors", "optimizer": None, "history": [],
        "config": {"model": "promma"}, "model": "promma", "dims": meta["dims"],
        "model_cfg": meta["model_cfg"], "seed": 0, "data": "synthetic:tiny"})
    out = str(tmp_path / "promma.onnx")
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", out]) == 0
    assert "promma -> " in capsys.readouterr().out
    # the file equals the upgraded checkpoint's model (old fixture batch, expected from the old code)
    import onnxruntime as ort

    batch = {k[len("batch."):]: v for k, v in tensors.items() if k.startswith("batch.")}
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    B = batch["audio"].shape[0]
    feed = {n: (batch[n] if n in batch else torch.ones(B, 3, dtype=torch.bool)).numpy() for n in names}
    np.testing.assert_allclose(sess.run(None, feed)[0], tensors["expected"].numpy(), atol=1e-5, rtol=1e-5)


def test_corrupt_checkpoint_is_one_line(run_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    path = bad / "best.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    assert main(["export", "--checkpoint", str(bad), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msa-fast: error:") and "best.safetensors" in err[0], err
    assert not (tmp_path / "m.onnx").exists()
