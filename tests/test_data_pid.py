"""synthetic:<preset>:pid: schema, determinism, cache, the planted PID structure, corruption."""

import os
import pickle
import tempfile

import numpy as np
import pytest

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast import cli  # noqa: E402
from msa_fast.data import load_data, synthetic, synthetic_pid  # noqa: E402
from msa_fast.data.schema import check_pickle  # noqa: E402
from msa_fast.data.source import parse_synthetic  # noqa: E402

MODS = ("text", "audio", "vision")
# MOSI widths, three 256-sample chunks: enough clean samples for the probes
PROBE_SPEC = "synthetic:mosi:pid:limit=768"


def _pooled(split, mi, inside=True):
    """(N, d) mean of modality ``mi``'s frames inside (or outside, within the valid length)
    the sample's stored cue window."""
    x = getattr(split, MODS[mi]).numpy()
    win = split.extra["window"][:, mi].numpy()
    length = [split.text_lengths, split.audio_lengths, split.vision_lengths][mi].numpy()
    pos = np.arange(x.shape[1])[None, :]
    sel = (pos >= win[:, :1]) & (pos < win[:, :1] + win[:, 1:])
    if not inside:
        sel = ~sel & (pos < length[:, None])
    sel = sel.astype(np.float64)
    return (x * sel[..., None]).sum(1) / np.maximum(sel.sum(1, keepdims=True), 1)


def _fit(x, y, alpha=1.0):
    """Ridge probe with an intercept; returns predict(x)."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return lambda q: ((q - mu) / sd) @ w + y.mean()


def _r2(pred, y):
    return 1.0 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()


def _quad(x):
    i, j = np.triu_indices(x.shape[1])
    return np.concatenate([x, x[:, i] * x[:, j]], axis=1)


def _outer(a, v):
    return np.concatenate([a, v, (a[:, :, None] * v[:, None, :]).reshape(len(a), -1)], axis=1)


@pytest.fixture(scope="module")
def probe_data():
    return load_data(PROBE_SPEC)


@pytest.mark.parametrize("aligned", [True, False])
def test_schema_and_keys(aligned):
    pkl = synthetic_pid.generate("tiny", seed=2, aligned=aligned, limit=40)
    info = check_pickle(pkl)
    assert all(i["aligned"] == aligned for i in info.values())
    tr = pkl["train"]
    n = 40
    assert tr["text"].shape == (n, 50, 768) and tr["text_bert"].shape == (n, 3, 50)
    assert tr["latent"].shape == (n, len(synthetic_pid.LATENTS)) and tr["latent"].dtype == np.float32
    assert tr["corrupted"].shape == (n, 3) and tr["corrupted"].dtype == bool
    assert tr["window"].shape == (n, 3, 2) and tr["noise_level"].shape == (n, 3)
    if aligned:
        assert tr["audio"].shape == (n, 50, 5) and "audio_lengths" not in tr
    else:
        assert tr["audio"].shape == (n, 375, 5) and tr["vision"].shape == (n, 500, 20)
        assert tr["audio_lengths"].dtype == np.int64
    y = tr["regression_labels"]
    assert np.abs(y).max() <= 3 and np.allclose(np.round(y / 0.2) * 0.2, y, atol=1e-5)
    assert pkl["synthetic"]["kind"] == "pid" and pkl["synthetic"]["shares"] == synthetic_pid.SHARES
    assert pickle.loads(pickle.dumps(pkl["synthetic"])) == pkl["synthetic"]


def test_determinism_and_prefix():
    a = synthetic_pid.generate("tiny", seed=5, aligned=False, limit=30)
    b = synthetic_pid.generate("tiny", seed=5, aligned=False)
    c = synthetic_pid.generate("tiny", seed=6, aligned=False, limit=30)
    for split in ("train", "valid", "test"):
        for k in ("text", "audio", "vision", "latent", "corrupted", "window", "regression_labels"):
            assert np.array_equal(a[split][k], b[split][k][:30], equal_nan=True), (split, k)
    assert not np.array_equal(a["train"]["latent"], c["train"]["latent"])
    # a distinct generator, not v1 under another name
    v1 = synthetic.generate("tiny", seed=5, aligned=False, limit=30)
    assert not np.array_equal(v1["train"]["regression_labels"], a["train"]["regression_labels"])


def test_spec_parsing_and_cache(tmp_path, monkeypatch):
    assert parse_synthetic("synthetic:tiny:pid:unaligned:seed=3")["pid"] is True
    assert parse_synthetic("synthetic:tiny:unaligned")["pid"] is False
    monkeypatch.setenv("MSA_FAST_CACHE", str(tmp_path))
    path = synthetic_pid.cached("tiny", 1, False, 20)
    assert os.path.dirname(path) == os.path.join(str(tmp_path), "synthetic")
    name = os.path.basename(path)
    assert name.startswith("synthetic_pid_tiny_unaligned_seed1_n20")
    assert f"pidv{synthetic_pid.VERSION}" in name
    assert os.path.basename(synthetic.cached("tiny", 1, False, 20)) != name  # v1 beside it
    mtime = os.stat(path).st_mtime_ns
    assert synthetic_pid.cached("tiny", 1, False, 20) == path and os.stat(path).st_mtime_ns == mtime
    data = load_data("synthetic:tiny:pid:unaligned:seed=1:limit=20")
    assert data.meta["kind"] == "pid" and not data.aligned
    tr = data["train"]
    assert tr.extra["corrupted"].dtype.is_floating_point is False and tr.extra["corrupted"].shape == (20, 3)
    assert tuple(tr.extra["latent"].shape) == (20, 6)
    v1 = load_data("synthetic:tiny:unaligned:seed=1:limit=20")
    assert "corrupted" not in v1["train"].extra and "kind" not in v1.meta


@pytest.mark.parametrize("aligned", [True, False])
def test_windows_within_valid_lengths(aligned):
    spec = "synthetic:tiny:pid" + ("" if aligned else ":unaligned")
    tr = load_data(spec)["train"]
    win = tr.extra["window"].numpy()
    lengths = np.stack([tr.text_lengths.numpy(), tr.audio_lengths.numpy(), tr.vision_lengths.numpy()], 1)
    start, wlen = win[..., 0], win[..., 1]
    assert (start >= 0).all() and (wlen >= 1).all() and (start + wlen <= lengths).all()
    frac = wlen / lengths
    assert frac.min() >= 0.2 - 0.5 / lengths.min() and frac.max() <= 0.5 + 0.5 / lengths.min()
    same = (win[:, 0] == win[:, 1]).all(1) & (win[:, 0] == win[:, 2]).all(1)
    if aligned:
        assert same.all()
    else:
        assert same.mean() < 0.05  # offset between modalities


@pytest.mark.parametrize("unaligned", [False, True])
def test_redundant_latent_from_each_modality_alone(probe_data, unaligned):
    data = load_data("synthetic:mosi:pid:unaligned:limit=768") if unaligned else probe_data
    tr, te = data["train"], data["test"]
    for mi in range(3):
        fit_ok = ~tr.extra["corrupted"][:, mi].numpy()
        test_ok = ~te.extra["corrupted"][:, mi].numpy()
        rho_tr, rho_te = tr.extra["latent"][:, 0].numpy(), te.extra["latent"][:, 0].numpy()
        xtr, xte = _pooled(tr, mi), _pooled(te, mi)
        probe = _fit(xtr[fit_ok], rho_tr[fit_ok], alpha=10.0 if mi == 0 else 1.0)
        r2 = _r2(probe(xte[test_ok]), rho_te[test_ok])
        assert r2 > 0.6, (MODS[mi], r2)
        # the cue lives only inside the window
        out = np.corrcoef(probe(_pooled(te, mi, inside=False))[test_ok], rho_te[test_ok])[0, 1]
        assert abs(out) < 0.3, (MODS[mi], out)
        # corrupted samples: the cue is gone
        bad = ~test_ok
        c = np.corrcoef(probe(xte[bad]), rho_te[bad])[0, 1]
        assert abs(c) < 0.35, (MODS[mi], c)


def test_synergy_needs_audio_and_vision(probe_data):
    tr, te = probe_data["train"], probe_data["test"]

    def clean(s):
        cor = s.extra["corrupted"].numpy()
        return ~cor[:, 1] & ~cor[:, 2]

    ok_tr, ok_te = clean(tr), clean(te)
    lat_tr, lat_te = tr.extra["latent"].numpy(), te.extra["latent"].numpy()
    target_tr, target_te = lat_tr[:, 4] * lat_tr[:, 5], lat_te[:, 4] * lat_te[:, 5]
    a_tr, a_te = _pooled(tr, 1), _pooled(te, 1)
    v_tr, v_te = _pooled(tr, 2), _pooled(te, 2)
    # each factor alone is there...
    assert _r2(_fit(a_tr[ok_tr], lat_tr[ok_tr, 4])(a_te[ok_te]), lat_te[ok_te, 4]) > 0.6
    assert _r2(_fit(v_tr[ok_tr], lat_tr[ok_tr, 5])(v_te[ok_te]), lat_te[ok_te, 5]) > 0.6
    # ...but the product is invisible from audio alone or vision alone, even quadratically
    for f_tr, f_te, name in ((_quad(a_tr), _quad(a_te), "audio"), (v_tr, v_te, "vision"),
                             (_quad(v_tr), _quad(v_te), "vision quadratic")):
        r2 = _r2(_fit(f_tr[ok_tr], target_tr[ok_tr], alpha=10.0)(f_te[ok_te]), target_te[ok_te])
        assert r2 < 0.05, (name, r2)
    # and visible from both (bilinear features)
    both = _fit(_outer(a_tr, v_tr)[ok_tr], target_tr[ok_tr], alpha=10.0)
    r2 = _r2(both(_outer(a_te, v_te)[ok_te]), target_te[ok_te])
    assert r2 > 0.4, r2


def test_corruption_rate_and_noise(probe_data):
    cor = np.concatenate([probe_data[s].extra["corrupted"].numpy() for s in ("train", "valid", "test")])
    assert cor.sum(1).max() == 1  # at most one modality per sample
    assert 0.25 < cor.any(1).mean() < 0.35
    assert (cor.mean(0) > 0.05).all()  # every modality gets its share
    tr = probe_data["train"]
    cor = tr.extra["corrupted"].numpy()
    nl = tr.extra["noise_level"].numpy()
    for mi in range(3):
        assert nl[cor[:, mi], mi].min() > nl[~cor[:, mi], mi].max()  # noise raised
        x = getattr(tr, MODS[mi]).numpy()
        length = [tr.text_lengths, tr.audio_lengths, tr.vision_lengths][mi].numpy()
        pos = np.arange(x.shape[1])[None, :]
        win = tr.extra["window"][:, mi].numpy()
        # frames outside the cue window hold noise only (and text its token embeddings)
        noise = (pos < length[:, None]) & ~((pos >= win[:, :1]) & (pos < win[:, :1] + win[:, 1:]))
        sd = np.array([x[i][noise[i]].std() for i in range(len(x))])  # windows are <= ~50 %
        ratio = np.median(sd[cor[:, mi]]) / np.median(sd[~cor[:, mi]])
        assert ratio > 2.0, (MODS[mi], ratio)


def test_ceilings_order():
    res = synthetic_pid.ceilings(n=20_000, draws=16)
    acc = {k: v["Non0_acc_2"] for k, v in res.items()}
    mae = {k: v["MAE"] for k, v in res.items()}
    for dropped in ("drop text", "drop audio", "drop vision"):
        assert acc["text only"] < acc[dropped] < acc["all"] and mae["all"] < mae[dropped] < mae["text only"]
    # the synergy share is lost with audio or vision, so those drops cost more than text's unique one
    assert mae["drop audio"] > mae["drop text"] and mae["drop vision"] > mae["drop text"]
    # one modality alone: audio / vision carry the redundant latent and their unique one (shares
    # 0.30 + 0.15) but no synergy, text 0.30 + 0.20: each below its pair, text alone the best
    for alone in ("audio only", "vision only"):
        assert mae[alone] > mae["text only"] and mae[alone] > mae["drop text"] > mae["all"]


def test_data_inspect_and_synth_cli(tmp_path, capsys):
    assert cli.main(["data", "inspect", "synthetic:tiny:pid:limit=64"]) == 0
    out = capsys.readouterr().out
    assert "pid shares of var(h): redundant 0.30" in out and "synergy 0.20" in out
    assert out.count("corrupted fraction text/audio/vision:") == 3
    assert cli.main(["data", "inspect", "synthetic:tiny:limit=64"]) == 0
    out = capsys.readouterr().out
    assert "pid" not in out and "corrupted" not in out
    path = str(tmp_path / "pid.pkl")
    assert cli.main(["data", "synth", "--preset", "tiny", "--pid", "--limit", "10", "--out", path]) == 0
    assert load_data(path).meta["kind"] == "pid"
