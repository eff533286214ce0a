"""Robustness protocols (msa_fast.robustness) against hand-built cases, and the CLI end to end."""

import json
import os
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast import robustness as R  # noqa: E402
from msa_fast.cli import main  # noqa: E402
from msa_fast.data.loader import gather_batch  # noqa: E402
from msa_fast.data.missing import (  # noqa: E402
    DROP_PATTERNS,
    UNK_ID,
    add_gaussian_noise,
    apply_modality_drop,
    drop_modalities,
)
from msa_fast.data.source import load_data  # noqa: E402
from msa_fast.metrics import METRIC_KEYS  # noqa: E402

DATA = "synthetic:tiny:limit=48"


@pytest.fixture(scope="module")
def data():
    return load_data(DATA)


class Recorder(nn.Module):
    """Predicts a fixed function of the inputs and keeps every batch it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, batch):
        self.seen.append(batch)
        return {"pred": batch["audio"][:, :, 0].sum(1) + batch["text"][:, 1, 0] - 0.1}


# -- summaries -----------------------------------------------------------------------------


def test_relative_robustness_known_curves():
    levels = R.NOISE_LEVELS
    assert R.relative_robustness(np.linspace(1, 0, 11), levels) == pytest.approx(0.5)
    assert R.relative_robustness([0.7] * 11, levels) == pytest.approx(0.7)
    # a V-shaped curve 1 -> 0 at 0.5 -> 1: area 0.5, by hand
    v = [abs(1 - 2 * s) for s in levels]
    assert R.relative_robustness(v, levels) == pytest.approx(0.5)
    # MultiBench's helper: sum of (a_i + a_{i+1}) * 0.1 / 2
    acc = np.random.default_rng(0).uniform(size=11)
    assert R.relative_robustness(acc) == pytest.approx(sum((acc[i] + acc[i + 1]) * 0.05 for i in range(10)))
    with pytest.raises(ValueError, match="accuracy"):
        R.relative_robustness([1.0, 0.5], levels)


def test_effective_robustness_known_curves():
    ref = 0.8 - 0.02 * np.arange(11)
    assert R.effective_robustness(ref, ref) == 0.0
    assert R.effective_robustness(ref + 0.1, ref) == pytest.approx(0.0)  # same trend, higher
    # flat at the clean accuracy while the reference loses 0.02 per level: sum 0.02 * i
    assert R.effective_robustness([0.8] * 11, ref) == pytest.approx(0.02 * 55)
    assert R.effective_robustness(ref - 0.01 * np.arange(11), ref) == pytest.approx(-0.01 * 55)
    with pytest.raises(ValueError, match="reference"):
        R.effective_robustness([0.8] * 11, [0.8] * 10)


# -- protocols -----------------------------------------------------------------------------


def test_missing_positions_at_seed_and_rate(data):
    """Which tokens / frames a given (seed, rate) masks, against an independent replay of the
    generator: u ~ U[0,1) per (sample, position) for text, audio, vision in that order; a valid
    position is dropped iff u <= rate; CLS and the last valid (SEP) text position kept."""
    split = data["test"]
    rec = Recorder()
    seed, rates = 7, (0.0, 0.3)
    R.run_robustness(rec, data, protocols=("missing",), seeds=[seed], batch_size=len(split), rates=rates)
    clean = gather_batch(split, torch.arange(len(split)))
    assert len(rec.seen) == 2
    assert torch.equal(rec.seen[0]["text_bert"], clean["text_bert"])  # rate 0: untouched
    got = rec.seen[1]
    g = torch.Generator().manual_seed(R.condition_seed(seed, "missing", 1))
    u = {m: torch.rand(clean[f"{m}_mask"].shape, generator=g) for m in ("text", "audio", "vision")}
    B = len(split)
    for b in range(B):
        n_t = int(clean["text_lengths"][b])
        for j in range(clean["text_mask"].shape[1]):
            special = j == 0 or j == n_t - 1
            dropped = j < n_t and not special and float(u["text"][b, j]) <= 0.3
            want = UNK_ID if dropped else int(clean["text_bert"][b, 0, j])
            assert int(got["text_bert"][b, 0, j]) == want
            assert bool((got["text"][b, j] == 0).all()) == (dropped or bool((clean["text"][b, j] == 0).all()))
        for m in ("audio", "vision"):
            n = int(clean[f"{m}_lengths"][b])
            for j in range(n):
                if float(u[m][b, j]) <= 0.3:
                    assert (got[m][b, j] == 0).all()
                else:
                    assert torch.equal(got[m][b, j], clean[m][b, j])
    valid = ~clean["audio_mask"] & (clean["audio"] != 0).any(-1)
    frac = (got["audio"] == 0).all(-1)[valid].float().mean()
    assert 0.15 < frac < 0.45  # about the rate
    assert torch.equal(got["text_mask"], clean["text_mask"]) and got["present"].all()


def test_seven_drop_patterns(data):
    split = data["test"]
    rec = Recorder()
    res = R.run_robustness(rec, data, protocols=("drop",), seeds=[0], batch_size=len(split))
    assert res["drop"]["patterns"] == ["T", "A", "V", "T,A", "T,V", "A,V", "complete"]
    assert len(R.DROP_PATTERNS) == 7 and set(R.DROP_PATTERNS[:6]) == set(DROP_PATTERNS)
    clean = gather_batch(split, torch.arange(len(split)))
    inner = ~clean["text_mask"]
    inner[:, 0] = False
    inner[torch.arange(len(split)), clean["text_lengths"] - 1] = False
    for pat, got in zip(R.DROP_PATTERNS, rec.seen):
        for m, mod in enumerate(("text", "audio", "vision")):
            assert bool(got["present"][:, m].all()) == (m not in pat)
            assert bool(got["present"][:, m].any()) == (m not in pat)
            if m in pat:
                assert (got[mod] == 0).all()
            else:
                assert torch.equal(got[mod], clean[mod])
        ids = got["text_bert"][:, 0]
        if 0 in pat:
            assert (ids[inner] == UNK_ID).all() and (ids[:, 0] == 101).all()
        else:
            assert torch.equal(ids, clean["text_bert"][:, 0])
    # the mean over the seven patterns is the mean of the per-pattern metrics
    mae = [c["mean"]["MAE"] for c in res["drop"]["conditions"]]
    assert res["drop"]["mean_over_patterns"]["mean"]["MAE"] == pytest.approx(np.mean(mae), abs=1e-4)


def test_drop_modalities_is_the_random_drop(data):
    """A fixed pattern removes exactly what the random drop does for a sample that drew it."""
    b = gather_batch(data["train"], torch.arange(24))
    rnd = apply_modality_drop(b, 1.0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    torch.rand(24, generator=g)
    pattern = torch.randint(len(DROP_PATTERNS), (24,), generator=g)
    for p, mods in enumerate(DROP_PATTERNS):
        rows = (pattern == p).nonzero().flatten()
        if len(rows) == 0:
            continue
        fixed = drop_modalities(b, mods)
        for k in ("text", "text_bert", "audio", "vision", "present"):
            assert torch.equal(fixed[k][rows], rnd[k][rows]), (mods, k)
    with pytest.raises(ValueError, match="mods"):
        drop_modalities(b, (3,))


def test_gaussian_noise_on_valid_positions_only(data):
    split = data["train"]
    std = R.feature_std(split, "audio")
    x = split.audio.double().numpy()
    valid = np.arange(x.shape[1])[None, :] < split.audio_lengths.numpy()[:, None]
    assert np.allclose(std.numpy(), x[valid].std(0), atol=1e-5)
    b = gather_batch(split, torch.arange(len(split)))
    same = add_gaussian_noise(b, "audio", 0.0, std, torch.Generator().manual_seed(0))
    assert torch.equal(same["audio"], b["audio"])
    noisy = add_gaussian_noise(b, "vision", 0.5, R.feature_std(split, "vision"), torch.Generator().manual_seed(0))
    d = (noisy["vision"] - b["vision"]).numpy()
    pad = b["vision_mask"].numpy()
    vstd = R.feature_std(split, "vision").numpy()
    ok = vstd > 0
    assert ok.any() and (d[pad] == 0).all() and (d[~pad][:, ok] != 0).mean() > 0.99
    assert np.allclose(d[~pad][:, ok].std(0) / vstd[ok], 0.5, rtol=0.25)
    assert torch.equal(noisy["audio"], b["audio"])
    with pytest.raises(ValueError, match="modality"):
        add_gaussian_noise(b, "smell", 0.1, std, torch.Generator())
    with pytest.raises(ValueError, match="std"):
        add_gaussian_noise(b, "audio", 0.1, torch.ones(3), torch.Generator())


def test_noise_sweep_seeds_and_summary(data):
    rec = Recorder()
    res = R.run_robustness(rec, data, protocols=("noise",), seeds=[1, 2], batch_size=16,
                           levels=(0.0, 0.5, 1.0), targets=("audio", "all"))
    n = res["noise"]
    assert list(n["targets"]) == ["audio", "all"] and n["levels"] == [0.0, 0.5, 1.0]
    for t in n["targets"].values():
        c = t["conditions"]
        assert c[0]["std"]["MAE"] == 0.0  # level 0 is clean whatever the seed
        accs = [[c[i]["per_seed"][j][R.AUC_METRIC] for i in range(3)] for j in range(2)]
        per = t["relative_robustness"][R.AUC_METRIC]["per_seed"]
        assert per == pytest.approx([R.relative_robustness(a, (0.0, 0.5, 1.0)) for a in accs])
        assert set(c[1]["mean"]) == set(METRIC_KEYS)
    R.add_effective_robustness(res, res)
    assert res["noise"]["targets"]["audio"]["effective_robustness"][R.AUC_METRIC]["per_seed"] == \
        pytest.approx([R.effective_robustness(
            [c["per_seed"][j][R.AUC_METRIC] for c in res["noise"]["targets"]["audio"]["conditions"]],
            [c["mean"][R.AUC_METRIC] for c in res["noise"]["targets"]["audio"]["conditions"]])
            for j in range(2)])
    with pytest.raises(ValueError, match="protocols"):
        R.run_robustness(rec, data, protocols=("blur",))


# -- CLI end to end ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rob") / "run"
    assert main(["train", "--model", "lf_dnn", "--data", DATA, "--seeds", "1", "--epochs", "1",
                 "--batch-size", "16", "--out", str(out), "--no-progress",
                 "--model-cfg", '{"hidden": 16, "av_hidden": 8}']) == 0
    return out / "seed_1"


def test_cli_robustness_all(run_dir, tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["eval", "--checkpoint", str(run_dir), "--robustness", "all", "--seeds", "1", "2",
                 "--out", str(js), "--plot", str(png), "--reference", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "LNLN mean over rates" in printed and "effective robustness" in printed
    r = json.load(open(js))
    assert png.stat().st_size > 1000
    assert r["model"] == "lf_dnn" and r["data"] == DATA and r["params"]["seeds"] == [1, 2]
    assert r["checkpoint"] == os.path.abspath(run_dir)
    assert [c["rate"] for c in r["missing"]["conditions"]] == list(R.MISSING_RATES)
    assert len(r["drop"]["conditions"]) == 7
    assert set(r["noise"]["targets"]) == set(R.NOISE_TARGETS)
    for t in r["noise"]["targets"].values():
        assert [c["level"] for c in t["conditions"]] == list(R.NOISE_LEVELS)
        # the model is its own reference: effective robustness 0 for every seed
        assert t["effective_robustness"][R.AUC_METRIC]["per_seed"] == pytest.approx([0.0, 0.0], abs=1e-3)
    for block in (r["missing"]["mean_over_rates"], r["drop"]["mean_over_patterns"]):
        assert set(block["mean"]) == set(METRIC_KEYS) and len(block["per_seed"]) == 2
    # a reference given as a robustness JSON gives the same numbers
    js2 = tmp_path / "r2.json"
    assert main(["eval", "--checkpoint", str(run_dir), "--robustness", "noise", "--seeds", "1", "2",
                 "--out", str(js2), "--reference", str(js)]) == 0
    r2 = json.load(open(js2))
    assert (tmp_path / "r2.png").exists() and "missing" not in r2
    assert r2["noise"]["targets"]["all"]["effective_robustness"] == \
        r["noise"]["targets"]["all"]["effective_robustness"]
    table = R.markdown_table([str(js), str(js2)])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| lf_dnn | " + DATA)
    assert lines[3].count("—") == 4  # r2 has no missing / drop
    capsys.readouterr()
    assert main(["robustness", "table", str(js)]) == 0
    assert capsys.readouterr().out.strip() == R.markdown_table([str(js)])


def test_cli_robustness_user_errors(run_dir, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path), "--robustness", "drop"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msa-fast: error: no checkpoint in") and err.count("\n") == 1
    assert main(["eval", "--checkpoint", str(run_dir.parent), "--robustness", "drop"]) == 2
    assert "pass one seed's directory: seed_1" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_dir), "--robustness", "drop", "--drop-rate", "0.5"]) == 2
    assert "do not combine" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_dir), "--robustness", "blur"]) == 2
    assert "invalid choice" in capsys.readouterr().err
