"""Predictor (contract §7, inference): equal to model.eval() for every registered model, bucket
independence, per-sample dicts of any lengths with a missing modality, SplitData, bad input,
from_checkpoint, one compiled bucket, and the CUDA-graph path (gpu)."""

import subprocess
import sys
import warnings

import pytest
import torch

from msa_fast.data.missing import apply_modality_drop
from msa_fast.inference import Predictor, collate_samples
from msa_fast.models import available_models, build_model

DIMS = {"text": 768, "audio": 5, "vision": 20, "text_input": "features"}


def _batch(B, Lt, La, Lv, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {"present": torch.ones(B, 3, dtype=torch.bool)}
    for m, L in (("text", Lt), ("audio", La), ("vision", Lv)):
        lens = torch.randint(1, L + 1, (B,), generator=g)
        lens[0] = L
        mask = torch.arange(L)[None] >= lens[:, None]
        out[m] = torch.randn(B, L, DIMS[m], generator=g) * (~mask).unsqueeze(-1)
        out[f"{m}_mask"], out[f"{m}_lengths"] = mask, lens
    return out


def _model(name, seed=0):
    torch.manual_seed(seed)
    return build_model(name, DIMS).eval()


def _ref(model, batch):
    with torch.inference_mode():
        return model(batch)["pred"].float()


def _aligned(name):
    # FD-CMDIE's 'mean' global feature needs one length for all modalities
    return name == "fd_cmdie"


@pytest.mark.parametrize("name", available_models())
def test_equals_model_eval_and_bucket_independent(name):
    model = _model(name)
    L = (37, 37, 37) if _aligned(name) else (37, 21, 45)
    batch = _batch(5, *L)
    ref = _ref(model, batch)
    pred = Predictor(model, DIMS, compile=False, model_name=name, max_batch=4)
    out = pred.predict(batch)  # two chunks (4 + 1), buckets (4, 64..) and (1, 64..)
    assert out.shape == (5,) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # every sample alone (batch bucket 1, its own length buckets) gives the same prediction
    alone = torch.cat([pred.predict({k: v[i : i + 1] for k, v in batch.items()}) for i in range(5)])
    torch.testing.assert_close(alone, ref, atol=1e-5, rtol=1e-5)
    # other length buckets: the same samples padded to 128 steps
    wide = Predictor(model, DIMS, compile=False, model_name=name, length_buckets=(128,))
    torch.testing.assert_close(wide.predict(batch), ref, atol=1e-5, rtol=1e-5)
    assert not torch.is_grad_enabled() or out.grad_fn is None


def test_bucket_keys():
    pred = Predictor(_model("lf_dnn"), DIMS, compile=False, max_batch=48)
    assert pred.batch_buckets == (1, 2, 4, 8, 16, 32, 64)
    assert pred.bucket_of(3, {"text": 9, "audio": 8, "vision": 1}) == (4, 16, 8, 8)
    assert pred.bucket_of(1, {"text": 513, "audio": 8, "vision": 1}) is None


def test_outside_buckets_runs_eagerly():
    model = _model("lf_dnn")
    batch = _batch(3, 20, 40, 40)
    pred = Predictor(model, DIMS, compile=False, length_buckets=(8, 16))
    torch.testing.assert_close(pred.predict(batch), _ref(model, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["agfn", "promma", "lf_dnn"])
def test_list_of_dicts_any_lengths_and_missing_modality(name):
    model = _model(name)
    g = torch.Generator().manual_seed(1)
    samples = [
        {"text": torch.randn(7, 768, generator=g), "audio": torch.randn(12, 5, generator=g),
         "vision": torch.randn(3, 20, generator=g)},
        {"text": torch.randn(20, 768, generator=g).tolist(), "vision": torch.randn(9, 20, generator=g).numpy()},
        {"audio": torch.randn(2, 5, generator=g), "vision": torch.randn(30, 20, generator=g)},
    ]
    pred = Predictor(model, DIMS, compile=False, model_name=name)
    out = pred.predict(samples)
    # the same samples, each alone, padded by hand; a missing modality as the drop protocol
    # makes it: zeros of the sample's longest length, valid under the mask, present False
    for i, s in enumerate(samples):
        longest = max(len(v) for v in s.values())
        b = {"present": torch.ones(1, 3, dtype=torch.bool)}
        for mi, m in enumerate(("text", "audio", "vision")):
            x = torch.as_tensor(s[m], dtype=torch.float32) if m in s else torch.zeros(longest, DIMS[m])
            b[m] = x[None]
            b[f"{m}_mask"] = torch.zeros(1, len(x), dtype=torch.bool)
            b[f"{m}_lengths"] = torch.tensor([len(x)])
            b["present"][0, mi] = m in s
        torch.testing.assert_close(out[i], _ref(model, b)[0], atol=1e-5, rtol=1e-5)


def test_missing_modality_matches_drop_protocol():
    model = _model("promma")
    batch = _batch(8, 16, 16, 16, seed=3)
    batch["labels"] = torch.zeros(8)
    dropped = apply_modality_drop(batch, 1.0, torch.Generator().manual_seed(0))
    pred = Predictor(model, DIMS, compile=False, model_name="promma")
    torch.testing.assert_close(pred.predict(dropped), _ref(model, dropped), atol=1e-5, rtol=1e-5)


def test_split_input():
    from msa_fast.data.source import load_data

    data = load_data("synthetic:tiny", limit=40)
    model = _model("agfn")
    pred = Predictor(model, data.dims, compile=False, max_batch=16)
    out = pred.predict(data["test"])
    from msa_fast.data.loader import gather_batch

    ref = _ref(model, gather_batch(data["test"], torch.arange(len(data["test"]))))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("samples, match", [
    ([], r"samples: expected at least one sample"),
    ([{"text": torch.randn(3, 767)}], r"samples\[0\]\.text: expected shape \(Lt, 768\)"),
    ([{"audio": torch.randn(3, 5)}, {"audio": torch.randn(2, 3, 5)}], r"samples\[1\]\.audio: expected rank 2"),
    ([{"vision": torch.full((2, 20), float("nan"))}], r"samples\[0\]\.vision: expected finite"),
    ([{"audio": [["x"] * 5]}], r"samples\[0\]\.audio: expected numbers"),
    ([{"label": 1.0}], r"samples\[0\]: expected at least one of"),
    (["not a dict"], r"samples\[0\]: expected a dict"),
])
def test_bad_samples(samples, match):
    pred = Predictor(_model("lf_dnn"), DIMS, compile=False)
    with pytest.raises(ValueError, match=match):
        pred.predict(samples)


def test_bad_batch_dict():
    pred = Predictor(_model("lf_dnn"), DIMS, compile=False)
    batch = _batch(2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"batch\.audio: expected \(B, L, 5\)"):
        pred.predict(dict(batch, audio=torch.randn(2, 4, 6)))
    with pytest.raises(ValueError, match=r"batch\.vision_mask: expected bool"):
        pred.predict(dict(batch, vision_mask=batch["vision_mask"].float()))
    with pytest.raises(ValueError, match=r"batch\.text: expected finite"):
        pred.predict(dict(batch, text=batch["text"].masked_fill(torch.ones_like(batch["text"], dtype=torch.bool), float("nan"))))
    with pytest.raises(ValueError, match=r"max_batch"):
        Predictor(_model("lf_dnn"), DIMS, max_batch=0)


def test_collate_lengths_and_masks():
    b = collate_samples([{"text": torch.randn(3, 768), "audio": torch.randn(5, 5)}], DIMS)
    assert b["text"].shape == (1, 3, 768) and b["audio"].shape == (1, 5, 5)
    assert b["vision"].shape == (1, 5, 20) and b["vision"].abs().sum() == 0
    assert b["present"].tolist() == [[True, True, False]]
    assert b["text_mask"].tolist() == [[False] * 3]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    subprocess.run([sys.executable, "-m", "msa_fast", "train", "--model", "lf_dnn", "--data",
                    "synthetic:tiny", "--seeds", "1", "--epochs", "1", "--out", str(out),
                    "--no-progress"], check=True, capture_output=True)
    return out / "seed_1"


def test_from_checkpoint(run_dir):
    from msa_fast.data.loader import gather_batch
    from msa_fast.data.source import load_data
    from msa_fast.train.checkpoint import load_weights

    pred = Predictor.from_checkpoint(str(run_dir), compile=False)
    data = load_data("synthetic:tiny")
    model = build_model("lf_dnn", data.dims)
    load_weights(str(run_dir / "best.safetensors"), model)
    batch = gather_batch(data["test"], torch.arange(10))
    torch.testing.assert_close(pred.predict(batch), _ref(model.eval(), batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected a checkpoint of model 'agfn', got one of 'lf_dnn'"):
        Predictor.from_checkpoint(str(run_dir), model="agfn")
    with pytest.raises(ValueError, match="no checkpoint"):
        Predictor.from_checkpoint(str(run_dir / "nope"))


def test_checkpoint_of_another_model(run_dir, tmp_path):
    import shutil

    from msa_fast.train.checkpoint import load_json, save_json

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    state = load_json(str(other / "state.json"))
    state["model"] = "agfn"  # weights of lf_dnn under an agfn state
    save_json(str(other / "state.json"), state)
    with pytest.raises(ValueError, match="weights do not fit the model"):
        Predictor.from_checkpoint(str(other), compile=False)


def test_compiled_bucket_equals_eager():
    """One small compiled bucket (lf_dnn, batch 2, length 8): equal to eager, and a second
    request of the same bucket does not recompile."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _model("lf_dnn")
    batch = _batch(2, 6, 6, 6)
    pred = Predictor(model, DIMS, compile=True, model_name="lf_dnn", length_buckets=(8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure would warn
        out = pred.predict(batch)
        torch.testing.assert_close(out, _ref(model, batch), atol=1e-5, rtol=1e-5)
        from torch._dynamo.utils import counters

        before = dict(counters["stats"])
        again = pred.predict(_batch(2, 5, 7, 3, seed=4))
    assert pred.compile, "the compiled path fell back to eager"
    assert counters["stats"].get("unique_graphs", 0) == before.get("unique_graphs", 0)
    torch.testing.assert_close(again, _ref(model, _batch(2, 5, 7, 3, seed=4)), atol=1e-5, rtol=1e-5)


def test_compiled_buckets_alternating_pick_their_own_graph():
    """After its first call a bucket runs with only the guards that tell compiled buckets
    apart: requests alternating between two batch buckets and two length buckets (and a
    missing modality, which adds `present`) must each get their own graph's answer."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _model("lf_dnn")
    pred = Predictor(model, DIMS, compile=True, model_name="lf_dnn", length_buckets=(8, 16))
    absent = _batch(3, 5, 4, 6, seed=7)
    absent["present"] = torch.tensor([[True, False, True], [True, True, True], [False, True, True]])
    requests = [_batch(1, 6, 6, 6, seed=1), _batch(3, 12, 9, 14, seed=2), absent]
    for rnd in range(3):
        for i, batch in enumerate(requests):
            torch.testing.assert_close(pred.predict(batch), _ref(model, batch), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, i=i, rnd=rnd: f"request {i}, round {rnd}: {m}")
    assert pred.compile and len(pred._compiled_keys) == 3


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    model = _model("lf_dnn")
    pred = Predictor(model, DIMS, compile=True, model_name="lf_dnn")

    def broken():
        def fn(batch):
            raise RuntimeError("inductor exploded")
        return fn

    monkeypatch.setattr(pred, "_compiled_fn", broken)
    batch = _batch(2, 6, 6, 6)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        out = pred.predict(batch)
    torch.testing.assert_close(out, _ref(model, batch), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred.predict(batch)  # no second warning
    # the failing bucket runs eagerly from now on, counted; compilation stays on for the rest
    assert pred.compile and pred.fallbacks["torch.compile"] == 1 and len(pred._eager_keys) == 1


def test_compiled_stays_compiled_on_mixed_lengths():
    """Samples of lengths 45, 40, 49, 50, 8, 50 (one at a bucket's own length, whose rows
    would be views of the caller's tensors without the collation's fresh copies): every
    request keeps its bucket's compiled graph, two buckets compile once each, nothing falls
    back and nothing recompiles."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.recompile_limit
    model = _model("lf_dnn")
    pred = Predictor(model, DIMS, compile=True, model_name="lf_dnn")
    g = torch.Generator().manual_seed(3)
    for L in (45, 40, 49, 50, 8, 50):
        sample = {"text": torch.randn(L, DIMS["text"], generator=g), "audio": torch.randn(L, DIMS["audio"], generator=g),
                  "vision": torch.randn(L, DIMS["vision"], generator=g)}
        got = pred.predict([sample])
        batch = {m: sample[m][None] for m in ("text", "audio", "vision")}
        batch.update({f"{m}_mask": torch.zeros(1, L, dtype=torch.bool) for m in ("text", "audio", "vision")})
        torch.testing.assert_close(got, _ref(model, batch), atol=1e-5, rtol=1e-5)
    assert pred.compile and not pred.fallbacks and not pred._eager_keys
    assert len(pred._compiled_keys) == 2  # (1, 50, 50, 50) and (1, 8, 8, 8)
    assert counters["stats"]["unique_graphs"] == 2
    assert torch._dynamo.config.recompile_limit == limit  # raised for the Predictor's compiles only


@pytest.mark.parametrize("name", available_models())
def test_predictor_model_is_one_graph(name):
    # no host read in the eval forward of the Predictor's copy (unpacked LSTMs), also with a
    # modality missing: one compiled graph per bucket, capturable as one CUDA graph
    model = _model(name)
    L = (12, 12, 12) if _aligned(name) else (12, 7, 9)
    batch = _batch(4, *L)
    batch["present"] = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    pred = Predictor(model, DIMS, compile=False, model_name=name)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(lambda b: pred.model(b)["pred"])(batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["agfn", "fd_cmdie", "promma", "lf_dnn"])
def test_cuda_graphs_equal_eager(name):
    model = _model(name)
    L = (37, 37, 37) if _aligned(name) else (37, 21, 45)
    batch = _batch(5, *L)
    ref = _ref(model, batch)
    pred = Predictor(model, DIMS, device="cuda", cuda_graphs=True, model_name=name)
    out = pred.predict(batch)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert pred.cuda_graphs and len(pred._graphs) == 1, "no CUDA graph was captured"
    assert pred.graphs_captured == 1
    graph, static, *_ = next(iter(pred._graphs.values()))
    ptr = static["audio"].data_ptr()
    out2 = pred.predict({k: v.flip(0) for k, v in batch.items()})  # same bucket: a replay
    assert static["audio"].data_ptr() == ptr and len(pred._graphs) == 1
    torch.testing.assert_close(out2, ref.flip(0), atol=1e-4, rtol=1e-4)


def test_unaligned_stays_unaligned_in_equal_buckets():
    """Unaligned lengths 5, 7, 3 pad to the buckets 8, 8, 8, where FD-CMDIE would read three
    equal lengths as aligned data (its 'auto' global feature: mean instead of concat): the
    Predictor passes the layout (batch["aligned"]), so the bucket runs the concat path that
    model.eval() runs on the unpadded batch. (The concat path itself is not padding-invariant:
    the sinusoidal positions of G count the padded steps of the modalities before it.)"""
    model = _model("fd_cmdie")
    batch = _batch(2, 5, 7, 3, seed=4)
    pred = Predictor(model, DIMS, compile=False, model_name="fd_cmdie", length_buckets=(8,))
    assert pred.bucket_of(2, {"text": 5, "audio": 7, "vision": 3}) == (2, 8, 8, 8)
    padded = {}
    for m, L in (("text", 5), ("audio", 7), ("vision", 3)):
        padded[m] = torch.cat([batch[m], torch.zeros(2, 8 - L, DIMS[m])], 1)
        padded[f"{m}_mask"] = torch.cat([batch[f"{m}_mask"], torch.ones(2, 8 - L, dtype=torch.bool)], 1)
    concat = _ref(model, dict(padded, aligned=False))
    mean = _ref(model, padded)  # three equal lengths, no layout given: aligned
    assert (concat - mean).abs().max() > 1e-3
    torch.testing.assert_close(pred.predict(batch), concat, atol=1e-5, rtol=1e-5)
    # the same samples padded to one length by their caller are aligned data: mean, as eager
    torch.testing.assert_close(pred.predict(padded), mean, atol=1e-5, rtol=1e-5)


def test_two_compiled_predictors_keep_their_own_graphs():
    """Two compiled Predictors of one model class (other weights, same buckets) in one
    process, called in turns: each runs its own weights, on the skip-guard fast path too."""
    models = [_model("lf_dnn", seed=s) for s in (0, 1)]
    preds = [Predictor(m, DIMS, compile=True, model_name="lf_dnn", length_buckets=(8,)) for m in models]
    batch = _batch(2, 6, 6, 6, seed=5)
    for _ in range(3):
        for m, p in zip(models, preds):
            torch.testing.assert_close(p.predict(batch), _ref(m, batch), atol=1e-5, rtol=1e-5)
    assert all(not p.fallbacks and p._compiled_keys for p in preds)


def test_graph_cache_is_an_lru():
    from msa_fast.inference.predictor import GraphCache

    c = GraphCache(2)
    assert c.put("a", 1) == [] and c.put("b", 2) == []
    assert c.get("a") == 1  # "a" used last: "b" is the oldest now
    assert c.put("c", 3) == [("b", 2)]
    assert list(c.keys()) == ["a", "c"] and "b" not in c and len(c) == 2 and c.evictions == 1
    assert c.get("b") is None
    assert c.put("d", 4) == [("a", 1)]
    c.clear()
    assert len(c) == 0
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_graphs"):
            GraphCache(bad)


def test_predictor_graph_state_on_cpu():
    """On the CPU no graph is captured; max_graphs is checked and kept; the lock exists."""
    from msa_fast.inference.predictor import MAX_GRAPHS

    model = _model("lf_dnn")
    pred = Predictor(model, DIMS, compile=False, model_name="lf_dnn")
    assert pred._graphs.max_size == MAX_GRAPHS and pred.graphs_captured == 0 and not pred.cuda_graphs
    assert Predictor(model, DIMS, compile=False, max_graphs=3)._graphs.max_size == 3
    with pytest.raises(ValueError, match="max_graphs"):
        Predictor(model, DIMS, compile=False, max_graphs=0)
    assert pred._graph_lock.acquire(blocking=False)
    pred._graph_lock.release()
    pred.predict(_batch(2, 8, 8, 8))
    assert pred.graphs_captured == 0 and len(pred._graphs) == 0


def test_full_fp32_scopes_and_restores_tf32():
    from msa_fast.inference.predictor import _full_fp32

    prec, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.allow_tf32 = True
        with pytest.raises(KeyError), _full_fp32():
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cudnn.allow_tf32
            raise KeyError  # restored on the way out of an error too
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
        with _full_fp32(False):
            assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cudnn.allow_tf32 = cudnn


@pytest.mark.gpu
def test_cuda_graphs_share_one_pool_and_stream_and_equal_eager():
    """Two buckets: two captures on the Predictor's one stream into its one pool, each equal to
    eager fp32 (TF32 off, as the graphs run) within 1e-5; an LRU of one graph evicts and
    recaptures; concurrent predict calls each get their own answer."""
    import threading

    from msa_fast.inference.predictor import _full_fp32

    name = "agfn"
    model = _model(name)
    small, large = _batch(2, 16, 16, 16, seed=1), _batch(5, 37, 21, 45, seed=2)
    with _full_fp32():
        ref_small = _ref(model.cuda(), {k: v.cuda() for k, v in small.items()}).cpu()
        ref_large = _ref(model, {k: v.cuda() for k, v in large.items()}).cpu()
    pred = Predictor(model, DIMS, device="cuda", cuda_graphs=True, model_name=name)
    out_small, out_large = pred.predict(small), pred.predict(large)
    assert pred.cuda_graphs and pred.graphs_captured == 2 and len(pred._graphs) == 2, pred.fallbacks
    torch.testing.assert_close(out_small, ref_small, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_large, ref_large, atol=1e-5, rtol=1e-5)
    pools = {entry[0].pool() for entry in pred._graphs.values()}
    assert pools == {pred._graph_pool}
    assert pred._graph_stream is not None and pred._graph_stream.device == pred.device
    stream = pred._graph_stream
    torch.testing.assert_close(pred.predict(small), ref_small, atol=1e-5, rtol=1e-5)  # a replay
    assert pred.graphs_captured == 2 and pred._graph_stream is stream

    results, errors = {}, []

    def worker(i):
        try:
            results[i] = pred.predict(small if i % 2 else large)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, out in results.items():
        torch.testing.assert_close(out, ref_small if i % 2 else ref_large, atol=1e-5, rtol=1e-5)
    assert pred.graphs_captured == 2

    lru = Predictor(model, DIMS, device="cuda", cuda_graphs=True, model_name=name, max_graphs=1)
    lru.predict(small)
    lru.predict(large)  # evicts small's graph
    torch.testing.assert_close(lru.predict(small), ref_small, atol=1e-5, rtol=1e-5)  # recaptured
    assert lru.graphs_captured == 3 and len(lru._graphs) == 1 and lru._graphs.evictions == 2


@pytest.mark.gpu
def test_compile_on_cuda_is_not_silently_ignored():
    model = _model("lf_dnn")
    with pytest.warns(UserWarning, match="not applied on CUDA"):
        pred = Predictor(model, DIMS, device="cuda", compile=True)
    assert pred.cuda_graphs and not pred.compile
    honoured = Predictor(model, DIMS, device="cuda", compile=True, cuda_graphs=False)
    assert honoured.compile and honoured.runtime_for(1) == "compiled"
