"""MMSA pickle loader, synthetic generator, batches and missing-modality protocols."""

import io
import os
import pickle
import tempfile
import types

import numpy as np
import pytest
import torch

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast.data import (  # noqa: E402
    MissingProtocol,
    SchemaError,
    apply_missing_rate,
    apply_modality_drop,
    from_pickle_dict,
    gather_batch,
    load_data,
    load_pickle,
    make_loader,
    synthetic,  # noqa: E402
)
from msa_fast.data.missing import UNK_ID  # noqa: E402


def _split(n, L=6, aligned=True, la=9, lv=7, rng=None):
    rng = rng or np.random.default_rng(0)
    lengths = rng.integers(3, L + 1, n)
    ids = np.zeros((n, L))
    mask = np.zeros((n, L))
    for i, k in enumerate(lengths):
        ids[i, :k] = [101, *rng.integers(2000, 3000, k - 2), 102]
        mask[i, :k] = 1
    d = {
        "text": rng.standard_normal((n, L, 8)).astype(np.float32),
        "text_bert": np.stack([ids, mask, np.zeros_like(ids)], 1).astype(np.float32),
        "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
        "id": np.array([f"v{i}" for i in range(n)], dtype=object),
        "raw_text": np.array(["x"] * n, dtype=object),
    }
    if aligned:
        d["audio"] = rng.standard_normal((n, L, 5)).astype(np.float32)
        d["vision"] = rng.standard_normal((n, L, 4)).astype(np.float32)
    else:
        d["audio"] = rng.standard_normal((n, la, 5)).astype(np.float32)
        d["vision"] = rng.standard_normal((n, lv, 4)).astype(np.float32)
        d["audio_lengths"] = rng.integers(1, la + 1, n)
        d["vision_lengths"] = rng.integers(1, lv + 1, n)
    return d


def _pickle(aligned=True):
    rng = np.random.default_rng(1)
    return {s: _split(n, aligned=aligned, rng=rng) for s, n in (("train", 5), ("valid", 3), ("test", 4))}


def test_labels_outside_mmsa_range_warn_once_at_load(tmp_path, caplog):
    pkl = _pickle()
    pkl["train"]["regression_labels"] = pkl["train"]["regression_labels"] * 50  # a scaled label set
    path = tmp_path / "scaled.pkl"
    path.write_bytes(pickle.dumps(pkl))
    with caplog.at_level("WARNING", logger="msa_fast.data"):
        load_pickle(str(path))
    hits = [r for r in caplog.records if "outside MMSA's [-3, 3]" in r.message]
    assert len(hits) == 1 and "train: " in hits[0].message and "valid" not in hits[0].message
    caplog.clear()
    path.write_bytes(pickle.dumps(_pickle()))
    with caplog.at_level("WARNING", logger="msa_fast.data"):
        load_pickle(str(path))
    assert "outside MMSA" not in caplog.text


def test_aligned_loader_cleans_and_reports(tmp_path, caplog):
    pkl = _pickle()
    pkl["train"]["audio"][0, 1, 2] = -np.inf
    pkl["train"]["audio"][2, 0, 0] = -np.inf
    pkl["train"]["vision"][1, 2, 3] = np.nan
    pkl["test"]["text"][0, 0, 0] = np.nan
    path = tmp_path / "aligned_50.pkl"
    path.write_bytes(pickle.dumps(pkl))
    with caplog.at_level("WARNING", logger="msa_fast.data"):
        data = load_pickle(str(path))
    assert len([r for r in caplog.records if "non-finite" in r.message]) == 1  # reported once
    assert "train/audio: 2 neginf" in caplog.text and "train/vision: 1 nan" in caplog.text
    assert data.report["test"]["text"]["nan"] == 1
    assert data.aligned and data.dims == {"text": 8, "audio": 5, "vision": 4, "text_input": "features"}
    tr = data["train"]
    assert torch.isfinite(tr.audio).all() and tr.audio[0, 1, 2] == 0 and tr.vision[1, 2, 3] == 0
    want = pkl["train"]["text_bert"][:, 1].sum(1)
    assert tr.text_lengths.tolist() == want.astype(int).tolist()
    assert torch.equal(tr.audio_lengths, tr.text_lengths)
    b = gather_batch(tr, torch.arange(5))
    assert b["text_mask"].dtype == torch.bool
    assert torch.equal(b["text_mask"], torch.from_numpy(pkl["train"]["text_bert"][:, 1, : b["text_mask"].shape[1]] == 0))
    assert torch.equal(b["audio_mask"], b["text_mask"])
    assert b["text_bert"].dtype == torch.int64 and b["text_bert"][0, 0, 0] == 101


def test_unaligned_lengths_to_masks():
    pkl = _pickle(aligned=False)
    pkl["valid"]["audio_lengths"][0] = 0  # empty sequences exist in MOSEI; clamped to 1
    data = from_pickle_dict(pkl)
    assert not data.aligned
    v = data["valid"]
    assert v.audio_lengths[0] == 1
    b = gather_batch(v, torch.arange(3))
    La = int(v.audio_lengths.max())
    assert b["audio"].shape == (3, La, 5)
    for i in range(3):
        n = int(v.audio_lengths[i])
        assert not b["audio_mask"][i, :n].any() and b["audio_mask"][i, n:].all()
        m = int(v.vision_lengths[i])
        assert not b["vision_mask"][i, :m].any() and b["vision_mask"][i, m:].all()


def test_text_bert_only():
    pkl = _pickle()
    for s in pkl.values():
        del s["text"]
    data = from_pickle_dict(pkl)
    assert data.dims["text_input"] == "bert" and data["train"].text is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["train"].pop("audio"), "missing key 'audio'"),
        (lambda p: p["valid"].pop("regression_labels"), "missing key 'regression_labels'"),
        (lambda p: p.pop("test"), "missing split 'test'"),
        (lambda p: p["train"].__setitem__("vision", p["train"]["vision"][:4]), "'vision' has 4 samples"),
        (lambda p: p["train"].__setitem__("audio", p["train"]["audio"][:, :3]), "'audio' length 6"),
        (lambda p: p["test"].pop("vision_lengths"), "missing key 'vision_lengths'"),
        (lambda p: p["test"].__setitem__("id", p["test"]["id"][:1]), "'id' has 1 entries"),
    ],
)
def test_schema_errors_name_the_problem(edit, message):
    pkl = _pickle(aligned="lengths" not in message)
    edit(pkl)
    with pytest.raises(SchemaError, match=message):
        from_pickle_dict(pkl)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_pickle(str(tmp_path / "nope.pkl"))
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(SchemaError, match="not a readable pickle"):
        load_pickle(str(tmp_path / "junk.pkl"))


def test_synthetic_schema_determinism_and_prefix():
    a = synthetic.generate("tiny", seed=3, aligned=True, limit=40)
    b = synthetic.generate("tiny", seed=3, aligned=True, limit=40)
    c = synthetic.generate("tiny", seed=3, aligned=True, limit=20)
    for k in ("text", "audio", "vision", "regression_labels", "noise_level"):
        np.testing.assert_array_equal(a["train"][k], b["train"][k])
        np.testing.assert_array_equal(a["train"][k][:20], c["train"][k])
    tr = a["train"]
    assert tr["text"].dtype == np.float32 and tr["text"].shape == (40, 50, 768)
    assert tr["text_bert"].shape == (40, 3, 50) and tr["audio"].shape == (40, 50, 5)
    assert tr["noise_level"].shape == (40, 3)
    # MMSA's audio carries -inf frames, and so does the generator's (the loader zeroes them)
    assert np.isneginf(tr["audio"]).sum() > 0 and np.abs(tr["regression_labels"]).max() <= 3
    data = from_pickle_dict(a)
    assert data.aligned


def test_synthetic_presets_sizes_and_dims():
    assert synthetic.PRESETS["mosi"]["sizes"] == (1284, 229, 686)
    assert synthetic.PRESETS["mosei"]["sizes"] == (16326, 1871, 4659)
    u = synthetic.generate("mosei", seed=0, aligned=False, limit=3)
    assert u["train"]["audio"].shape == (3, 500, 74) and u["train"]["vision"].shape == (3, 500, 35)
    assert (u["train"]["audio_lengths"] <= 500).all()
    m = synthetic.generate("mosi", seed=0, aligned=False, limit=3)
    assert m["test"]["audio"].shape == (3, 375, 5) and m["test"]["vision"].shape == (3, 500, 20)
    from_pickle_dict(u)


def test_synthetic_signal_is_planted():
    """Labels follow the latents: a full oracle separates signs far better than text alone."""
    d = synthetic.generate("mosi", seed=0, limit=600)["train"]
    z, y = d["latent"], d["regression_labels"]
    g = synthetic._g
    sh = synthetic.SHARES
    h = np.sqrt(sh["text"]) * z[:, 0] + np.sqrt(sh["audio"]) * g(z[:, 1]) + np.sqrt(sh["vision"]) * g(z[:, 2])
    nz = y != 0
    full = np.mean((h[nz] > 0) == (y[nz] > 0))
    text = np.mean((z[nz, 0] > 0) == (y[nz] > 0))
    assert full > 0.85 and text < 0.78


def test_synthetic_spec_and_cache():
    d1 = load_data("synthetic:tiny:limit=30")
    assert len(d1["train"]) == 30 and d1["train"].extra["noise_level"].shape == (30, 3)
    assert os.path.exists(synthetic.cached("tiny", 0, True, 30))
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        load_data("synthetic:nope")
    with pytest.raises(ValueError, match="unknown synthetic option"):
        load_data("synthetic:tiny:sideways")


def test_bucketing_covers_every_sample_once():
    data = load_data("synthetic:tiny:unaligned:limit=100")
    loader = make_loader(data["train"], 16, shuffle=True, seed=1, aligned=False)
    seen = torch.cat([b["index"] for b in loader])
    assert sorted(seen.tolist()) == list(range(100))
    loader.batch_sampler.set_epoch(1)
    again = torch.cat([b["index"] for b in loader])
    assert not torch.equal(seen, again)  # a new order every epoch
    loader.batch_sampler.set_epoch(0)
    assert torch.equal(seen, torch.cat([b["index"] for b in loader]))  # reproducible


def _batch():
    data = load_data("synthetic:tiny:limit=30")
    return gather_batch(data["train"], torch.arange(16))


def test_missing_rate_mmsa():
    b = _batch()
    g = torch.Generator().manual_seed(0)
    same = apply_missing_rate(b, 0.0, g)
    assert torch.equal(same["text_bert"], b["text_bert"])
    full = apply_missing_rate(b, 1.0, torch.Generator().manual_seed(0))
    ids = full["text_bert"][:, 0]
    valid = ~b["text_mask"]
    lengths = b["text_lengths"]
    assert (ids[:, 0] == 101).all() and (ids[torch.arange(16), lengths - 1] == 102).all()
    inner = valid.clone()
    inner[:, 0] = False
    inner[torch.arange(16), lengths - 1] = False
    assert (ids[inner] == UNK_ID).all() and (ids[~valid] == 0).all()
    assert (full["audio"] == 0).all() and (full["text"][inner] == 0).all()
    half = apply_missing_rate(b, (0.5, 0.5, 0.5), torch.Generator().manual_seed(0))
    frac = (half["text_bert"][:, 0][inner] == UNK_ID).float().mean()
    assert 0.3 < frac < 0.7
    again = apply_missing_rate(b, (0.5, 0.5, 0.5), torch.Generator().manual_seed(0))
    assert torch.equal(half["audio"], again["audio"])
    assert not (b["audio"] == 0).all()  # the input batch is untouched


def test_modality_drop_mplmm():
    b = _batch()
    out = apply_modality_drop(b, 1.0, torch.Generator().manual_seed(0))
    missing = (~out["present"]).sum(1)
    assert ((missing >= 1) & (missing <= 2)).all()
    for i in range(16):
        if not out["present"][i, 1]:
            assert (out["audio"][i] == 0).all()
        else:
            assert torch.equal(out["audio"][i], b["audio"][i])
        if not out["present"][i, 0]:
            assert (out["text"][i] == 0).all()
            assert out["text_bert"][i, 0, 0] == 101
    none = MissingProtocol(0.0, 0.0)(b, MissingProtocol.generator(0, "test"))
    assert none["present"].all()
    with pytest.raises(ValueError, match="drop_rate"):
        MissingProtocol(0.0, 1.5)


# --- untrusted pickles (contract §5, last bullet) -------------------------------------------------

class _Payload:
    """Unpickling this calls ``func(*args)``: what a malicious pickle does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _Numpy1Pickler(pickle._Pickler):
    """Pickles as numpy 1 (which wrote MMSA's files) did: its reconstructors under
    ``numpy.core.*`` rather than numpy 2's ``numpy._core.*``."""

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "") or ""
        if not module.startswith("numpy._core."):
            return super().save_global(obj, name)
        module, name = module.replace("numpy._core.", "numpy.core."), name or obj.__name__
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)  # the table holds the base class's function
    dispatch[types.FunctionType] = save_global


def _numpy1_dumps(obj, protocol: int) -> bytes:
    buf = io.BytesIO()
    _Numpy1Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_mmsa_format_pickles_still_load(tmp_path, protocol):
    pkl = _pickle(aligned=False)
    pkl["train"]["extra_scalar"] = np.float32(0.5)  # numpy scalars and dtypes go through too
    pkl["train"]["extra_dtype"] = np.dtype("int16")
    for name, data in (("ours", pickle.dumps(pkl, protocol=protocol)),
                       ("numpy1", _numpy1_dumps(pkl, protocol))):
        if name == "numpy1":
            assert b"numpy.core.multiarray" in data and b"numpy._core" not in data
        path = tmp_path / f"{name}_{protocol}.pkl"
        path.write_bytes(data)
        got = load_pickle(str(path))
        np.testing.assert_array_equal(got["train"].audio.numpy(), pkl["train"]["audio"])
        np.testing.assert_array_equal(got["test"].labels.numpy(), pkl["test"]["regression_labels"])
        assert got["valid"].ids == [str(i) for i in pkl["valid"]["id"]]


def test_synthetic_pickle_written_by_us_loads_safely(tmp_path):
    path = synthetic.write(str(tmp_path / "s.pkl"), "tiny", limit=10, aligned=False)
    assert len(load_pickle(path)["train"]) == 10


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("how", ["system", "exec", "nested", "numpy_subclass"])
def test_code_running_pickle_is_refused_and_does_not_run(tmp_path, capsys, protocol, how):
    from msa_fast.cli import main

    marker = tmp_path / "pwned"
    if how == "system":
        payload = _Payload(os.system, f"touch {marker}")
    elif how == "exec":
        payload = _Payload(exec, f"open({str(marker)!r}, 'w').close()")
    elif how == "nested":  # hidden deep inside an otherwise valid split
        payload = _pickle()
        payload["train"]["id"] = [_Payload(os.system, f"touch {marker}")] * 5
    else:  # a numpy reconstructor handed a non-numpy class
        payload = _Payload(np._core.multiarray._reconstruct, _Payload, (0,), b"b")
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    assert main(["data", "inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"msa-fast: error: {path}: refusing to unpickle ") and "\n" not in err
    assert "pickles can run code" in err
    assert not marker.exists()
