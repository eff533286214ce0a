"""msa_fast.analysis: gates, t-SNE and location-error against independent computations on
stub models, and the ``msa-fast analyze`` CLI on tiny trained AGFN / FD-CMDIE checkpoints."""

import json
import os
import tempfile

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast import analysis  # noqa: E402
from msa_fast.cli import main  # noqa: E402
from msa_fast.data.loader import gather_batch  # noqa: E402
from msa_fast.data.source import load_data  # noqa: E402

DATA = "synthetic:tiny:limit=48"


@pytest.fixture(scope="module")
def data():
    return load_data(DATA)


class GateStub(nn.Module):
    """Gate weights that are a known function of the inputs, as a 3-tuple (e, g, H)."""

    def __init__(self):
        super().__init__()
        self.fusion = nn.Identity()
        self.fusion.last_weights = None

    def forward(self, batch):
        z = torch.stack([batch["text"][:, 1, :4].sum(-1), batch["audio"][:, 0].sum(-1),
                         batch["vision"][:, 0].sum(-1)], 1)
        e, g = z.softmax(1), torch.sigmoid(z)
        self.fusion.last_weights = (e, g, torch.zeros_like(e))
        return {"pred": z.sum(1)}


class LocStub(nn.Module):
    """The fused vector is the first audio frame; the prediction its sum."""

    def __init__(self):
        super().__init__()
        self.fusion = nn.Identity()

    def forward(self, batch):
        return {"pred": self.fusion(batch["audio"][:, 0]).sum(-1)}


def test_gates_against_independent_means(data):
    split = data["test"]
    stub = GateStub()
    stub(gather_batch(split, torch.arange(len(split))))
    e, g, _ = stub.fusion.last_weights
    corrupted = torch.zeros(len(split), 3, dtype=torch.bool)
    corrupted[::3, 0] = True
    corrupted[1::5, 2] = True
    split.extra["corrupted"] = corrupted
    try:
        res, fig = analysis.gates(GateStub(), data, batch_size=7)
    finally:
        del split.extra["corrupted"]
    assert res["clean"]["e"] == pytest.approx(e.mean(0).tolist(), abs=1e-6)
    assert res["clean"]["g"] == pytest.approx(g.mean(0).tolist(), abs=1e-6)
    clean = ~corrupted.any(1)
    c = res["corrupted"]
    assert c["n_clean"] == int(clean.sum()) and c["text"]["n_corrupted"] == len(range(0, len(split), 3))
    assert c["text"]["e_corrupted"] == pytest.approx(float(e[corrupted[:, 0], 0].mean()), abs=1e-6)
    assert c["vision"]["g_clean"] == pytest.approx(float(g[clean, 2].mean()), abs=1e-6)
    assert c["audio"]["n_corrupted"] == 0 and np.isnan(c["audio"]["e_corrupted"])
    for mod in ("text", "audio", "vision"):  # noise on a modality moves its gate, not the clean mean
        n = res["noise"][mod]
        assert n["e_clean"] == pytest.approx(res["clean"]["e"][("text", "audio", "vision").index(mod)])
        assert n["e_noised"] != pytest.approx(n["e_clean"], abs=1e-6)
    # the figure plots these numbers: the first bar group of each panel is the clean mean
    (ax_e, ax_g) = fig.axes
    for ax, key in ((ax_e, "e"), (ax_g, "g")):
        heights = [p.get_height() for p in ax.patches[:3]]
        assert heights == pytest.approx(res["clean"][key], abs=1e-6)


def test_location_error_against_independent_pearson(data):
    res, _ = analysis.location_error(LocStub(), data, batch_size=10)
    c = data["train"].audio[:, 0].double().mean(0)
    f = data["test"].audio[:, 0].double()
    dist = (f - c).norm(dim=1).numpy()
    err = (f.float().sum(-1) - data["test"].labels).abs().double().numpy()
    assert res["n"] == len(data["test"])
    assert res["pearson_r"] == pytest.approx(float(np.corrcoef(dist, err)[0, 1]), abs=1e-5)
    assert res["distance"] == pytest.approx(dist.tolist(), abs=1e-4)
    assert -1 <= res["spearman_rho"] <= 1


def test_missing_features_name_the_model(data):
    with pytest.raises(ValueError, match="model 'stub'.*_vectors"):
        analysis.tsne(LocStub(), data, name="stub")
    with pytest.raises(ValueError, match="model 'stub'.*last_weights"):
        analysis.gates(LocStub(), data, name="stub")
    with pytest.raises(ValueError, match="model 'stub'.*fusion"):
        analysis.location_error(nn.Linear(2, 2), data, name="stub")


# -- CLI on trained checkpoints --------------------------------------------------------------


def _train(tmp_path_factory, model, cfg):
    out = tmp_path_factory.mktemp(model) / "run"
    assert main(["train", "--model", model, "--data", DATA, "--seeds", "1", "--epochs", "1",
                 "--batch-size", "16", "--out", str(out), "--no-progress", "--model-cfg", cfg]) == 0
    return out / "seed_1"


@pytest.fixture(scope="module")
def agfn_run(tmp_path_factory):
    return _train(tmp_path_factory, "agfn", '{"d": 16, "heads": 2, "ffn_dim": 16, "hidden": 16, "av_hidden": 8}')


@pytest.fixture(scope="module")
def fd_run(tmp_path_factory):
    return _train(tmp_path_factory, "fd_cmdie", '{"d": 16, "heads": 2}')


def test_cli_gates_and_location_error(agfn_run, tmp_path, capsys):
    out = tmp_path / "an"
    assert main(["analyze", "--checkpoint", str(agfn_run), "--what", "gates", "--out", str(out)]) == 0
    r = json.load(open(out / "gates.json"))
    assert r["model"] == "agfn" and r["what"] == "gates" and len(r["clean"]["e"]) == 3
    assert sum(r["clean"]["e"]) == pytest.approx(1.0, abs=1e-4)  # a softmax over modalities
    assert "skipped" in r["corrupted"] and set(r["noise"]) >= {"text", "audio", "vision", "level"}
    assert (out / "gates.png").stat().st_size > 1000
    assert main(["analyze", "--checkpoint", str(agfn_run), "--what", "location-error", "--out", str(out)]) == 0
    r = json.load(open(out / "location-error.json"))
    assert -1 <= r["pearson_r"] <= 1 and r["n"] == len(r["distance"]) == len(r["abs_error"])
    assert (out / "location-error.png").exists()
    capsys.readouterr()
    assert main(["analyze", "--checkpoint", str(agfn_run), "--what", "tsne", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msa-fast: error: analyze --what tsne: model 'agfn'") and err.count("\n") == 1


def test_cli_tsne(fd_run, tmp_path, capsys):
    out = tmp_path / "an"
    assert main(["analyze", "--checkpoint", str(fd_run), "--what", "tsne", "--out", str(out),
                 "--limit", "20"]) == 0
    r = json.load(open(out / "tsne.json"))
    assert r["model"] == "fd_cmdie" and r["n_samples"] == 20 and r["points"] == 120
    assert len(r["coordinates"]) == 120 and len(r["coordinates"][0]) == 2
    assert r["group"] == sorted(r["group"]) and set(r["group"]) == set(range(6))
    assert set(r["silhouette"]["embedding"]) == {"group", "kind", "class"}
    assert (out / "tsne.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["analyze", "--checkpoint", str(fd_run), "--what", "gates", "--out", str(out)]) == 2
    assert "model 'fd_cmdie' exposes no dual-gate weights" in capsys.readouterr().err
