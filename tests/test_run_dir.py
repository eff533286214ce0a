"""A run directory belongs to one run (contract §7): refuse / --overwrite / --resume with the same
configuration, epochs extension, missing state.json, the lock file, kill -9 + resume."""

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast.cli import main  # noqa: E402

TINY = ["--model", "lf_dnn", "--data", "synthetic:tiny:limit=48", "--batch-size", "16",
        "--no-progress", "--seeds", "1", "--model-cfg", '{"hidden": 16, "av_hidden": 8}']


def _err(capsys) -> str:
    lines = [e for e in capsys.readouterr().err.strip().splitlines()
             if "non-finite feature values" not in e]
    assert len(lines) == 1 and lines[0].startswith("msa-fast: error:"), lines
    return lines[0]


def _history(out):
    return json.load(open(os.path.join(out, "results.json")))["per_seed"][0]["history"]


def test_second_run_refuses_and_overwrite_replaces(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--epochs", "1", "--out", out]) == 0
    before = open(os.path.join(out, "results.json")).read()
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--out", out]) == 2
    err = _err(capsys)
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert open(os.path.join(out, "results.json")).read() == before  # untouched
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(["train", *TINY, "--epochs", "2", "--out", out, "--overwrite"]) == 0
    assert len(_history(out)) == 2 and (tmp_path / "run" / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--out", out, "--overwrite", "--resume"]) == 2
    assert "exclude each other" in _err(capsys)


def test_resume_with_a_different_configuration_names_the_keys(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--epochs", "2", "--out", out, "--stop-after-epoch", "1"]) == 0
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--out", out, "--resume", "--lr", "0.01"]) == 2
    err = _err(capsys)
    assert "lr: stored 0.001, now 0.01" in err and "batch_size" not in err
    assert main(["train", *TINY, "--epochs", "2", "--out", out, "--resume", "--batch-size", "8",
                 "--model-cfg", '{"hidden": 8, "av_hidden": 8}']) == 2
    err = _err(capsys)
    assert "batch_size" in err and "model_cfg" in err
    # what does not change the result may change: the device, the progress bar, threads
    assert main(["train", *TINY, "--epochs", "2", "--out", out, "--resume", "--threads", "2"]) == 0
    assert len(_history(out)) == 2


def test_extending_epochs_continues_a_capped_run_not_an_early_stopped_one(tmp_path, capsys, caplog):
    out = str(tmp_path / "capped")
    assert main(["train", *TINY, "--epochs", "1", "--out", out]) == 0
    assert main(["train", *TINY, "--epochs", "3", "--out", out, "--resume"]) == 0
    assert [h["epoch"] for h in _history(out)] == [1, 2, 3]
    ref = str(tmp_path / "straight")
    assert main(["train", *TINY, "--epochs", "3", "--out", ref]) == 0
    assert ([h["valid_loss"] for h in _history(out)] == [h["valid_loss"] for h in _history(ref)])
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--out", out, "--resume"]) == 2
    assert "below the 3 epochs" in _err(capsys)

    early = str(tmp_path / "early")
    assert main(["train", *TINY, "--epochs", "2", "--patience", "0", "--out", early]) == 0
    assert len(_history(early)) == 1  # patience 0: stops after the first epoch
    with caplog.at_level("WARNING", logger="msa_fast.train"):
        assert main(["train", *TINY, "--epochs", "4", "--patience", "0", "--out", early,
                     "--resume"]) == 0
    assert len(_history(early)) == 1 and "does not continue it" in caplog.text


def test_resume_without_state_json_does_not_restart_over_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--stop-after-epoch", "1"]) == 0
    (out / "seed_1" / "state.json").unlink()
    left = sorted(os.listdir(out / "seed_1"))
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 2
    err = _err(capsys)
    assert "state.json is missing" in err and "epoch1.safetensors" in err
    assert sorted(os.listdir(out / "seed_1")) == left  # nothing deleted


@pytest.mark.parametrize("damage", ["state", "weights", "optim"])
def test_truncated_checkpoint_names_the_file(tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--stop-after-epoch", "1"]) == 0
    name = {"state": "state.json", "weights": "epoch1.safetensors", "optim": "epoch1.optim.pt"}[damage]
    path = out / "seed_1" / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    capsys.readouterr()
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 2
    err = _err(capsys)
    assert name in err and "Traceback" not in err
    if damage != "optim":  # eval reads state.json and the weights
        weights = "--weights" if damage == "weights" else None
        argv = ["eval", "--checkpoint", str(out / "seed_1")] + ([weights, "last"] if weights else [])
        assert main(argv) == 2
        assert name in _err(capsys)


def test_eval_names_a_truncated_best_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    best = out / "seed_1" / "best.safetensors"
    best.write_bytes(best.read_bytes()[:100])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "seed_1")]) == 2
    assert "best.safetensors" in _err(capsys)


@pytest.mark.parametrize("name", ["best.safetensors", "epoch1.safetensors"])
def test_flipped_weight_bytes_are_refused_on_load(tmp_path, capsys, name):
    """Bytes flipped behind an intact safetensors header used to load and predict nonsense
    (exit 0): state.json records every weights file's SHA-256 and a load verifies it."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    state = json.load(open(out / "seed_1" / "state.json"))
    assert set(state["checksums"]) == {"best.safetensors", "epoch1.safetensors"}
    path = out / "seed_1" / name
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # the last float's bytes: the header stays valid
    path.write_bytes(bytes(data))
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(out / "seed_1")] + (["--weights", "last"] if name.startswith("epoch") else [])
    assert main(argv) == 2
    err = _err(capsys)
    assert name in err and "checksum" in err and "Traceback" not in err
    if name.startswith("epoch"):
        assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--resume"]) == 2
        assert name in _err(capsys)


def test_weights_that_do_not_fit_name_the_model_and_keys(tmp_path):
    from torch import nn

    from msa_fast.train.checkpoint import CheckpointError, load_weights, save_weights

    save_weights(str(tmp_path / "w.safetensors"), nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match=r"weights do not fit the model Sequential \(missing 2 keys: "
                                              r"0\.weight, 0\.bias; unexpected 2 keys: bias, weight\)"):
        load_weights(str(tmp_path / "w.safetensors"), nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(CheckpointError, match=r"other shapes \(file vs model\): weight \(2, 3\) vs \(4, 3\)"):
        load_weights(str(tmp_path / "w.safetensors"), nn.Linear(3, 4))


_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"pid {os.getpid()} on here".encode())
print("held", flush=True)
time.sleep(60)
"""


def test_lock_file_stops_a_second_writer_and_a_stale_one_does_not(tmp_path, capsys):
    from msa_fast.train.run_dir import RunDirError, RunLock

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 2
        err = _err(capsys)
        assert f"pid {holder.pid}" in err and "in use by another msa-fast process" in err
        with pytest.raises(RunDirError, match=str(holder.pid)):
            RunLock(str(out)).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its pid is still in the file, but the lock went with it
    assert str(holder.pid) in (out / ".lock").read_text()
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "msa_fast", "train", *TINY, "--epochs", "4", "--out", str(out),
            *extra]


def test_kill_9_and_resume_is_bit_identical(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_train_cmd(ref), check=True, env=env, capture_output=True)
    # the trainer kills itself (SIGKILL) right after epoch 1's checkpoint: no race with a poll
    proc = subprocess.run(_train_cmd(run), env=dict(env, MSA_FAST_KILL_AFTER_EPOCH="1"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run / "seed_1" / "state.json").read_text())["epoch"] == 1
    assert not (run / "results.json").exists()
    subprocess.run(_train_cmd(run, "--resume"), check=True, env=env, capture_output=True)
    a, b = load_file(str(ref / "seed_1" / "epoch4.safetensors")), load_file(
        str(run / "seed_1" / "epoch4.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    ra, rb = (json.load(open(d / "results.json"))["per_seed"][0] for d in (ref, run))
    assert ra["test"]["MAE"] == rb["test"]["MAE"] and ra["best_epoch"] == rb["best_epoch"]


def test_the_kill_hook_takes_an_epoch_and_is_off_when_unset(monkeypatch):
    from msa_fast.train.trainer import KILL_ENV, _kill_after_epoch

    monkeypatch.delenv(KILL_ENV, raising=False)
    assert _kill_after_epoch() is None
    monkeypatch.setenv(KILL_ENV, "3")
    assert _kill_after_epoch() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(KILL_ENV, bad)
        with pytest.raises(ValueError, match=KILL_ENV):
            _kill_after_epoch()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_run_files_follow_the_umask(tmp_path, umask, mode):
    """Atomic writes (temp file + rename) keep the mode a plain open() would give."""
    from msa_fast.train.checkpoint import atomic_write_bytes, save_json

    old = os.umask(umask)
    try:
        atomic_write_bytes(str(tmp_path / "w.bin"), b"x")
        save_json(str(tmp_path / "s.json"), {"a": 1})
    finally:
        os.umask(old)
    for name in ("w.bin", "s.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


def test_a_runs_files_are_0644_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["train", "--model", "lf_dnn", "--data", "synthetic:tiny:limit=48", "--seeds", "1",
                     "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "run") for f in fs]
    assert any(f.endswith(".safetensors") for f in files) and any(f.endswith("state.json") for f in files)
    for f in files:
        assert os.stat(f).st_mode & 0o777 == 0o644, f


def test_implausible_predictions_warn_once(tmp_path, capsys):
    """Weights that load (a run from before checksums, or edited) but predict far outside the
    training labels: eval and the Predictor warn once each, naming the scale."""
    import warnings as W

    from safetensors.torch import load_file, save_file

    from msa_fast import metrics
    from msa_fast.inference import Predictor

    out = tmp_path / "run"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    run = out / "seed_1"
    state = json.load(open(run / "state.json"))
    assert 0 < state["label_absmax"] <= 3
    del state["checksums"]  # as a run written before checksums were recorded
    (run / "state.json").write_text(json.dumps(state))
    w = load_file(str(run / "best.safetensors"))
    w = {k: v * 1e4 for k, v in w.items()}  # every weight scaled: the output explodes
    save_file(w, str(run / "best.safetensors"))
    metrics._warned_implausible.clear()
    with pytest.warns(RuntimeWarning, match="over 100x the largest training") as rec:
        assert main(["eval", "--checkpoint", str(run)]) == 0
        assert main(["eval", "--checkpoint", str(run)]) == 0  # once per process
    assert len([r for r in rec if "largest training" in str(r.message)]) == 1
    pred = Predictor.from_checkpoint(str(run), compile=False)
    from msa_fast.data import load_data

    with pytest.warns(RuntimeWarning, match="Predictor of lf_dnn"):
        pred.predict(load_data("synthetic:tiny:limit=48")["test"])
    with W.catch_warnings():
        W.simplefilter("error")
        assert not metrics.warn_if_implausible([0.5, -2.9], 3.0, "fine")


def test_resume_on_regenerated_data_is_refused(tmp_path, capsys):
    """run.json records the data's identity; a resume after `data synth` rewrote the pickle
    (another seed) is refused naming it, the same data resumes bit-identically, and
    --allow-data-change continues deliberately. The stored path is absolute."""
    pkl = tmp_path / "tinyA.pkl"
    assert main(["data", "synth", "--preset", "tiny", "--limit", "40", "--seed", "1", "--out", str(pkl)]) == 0
    out = tmp_path / "run"
    base = ["train", "--model", "lf_dnn", "--data", os.path.relpath(pkl), "--seeds", "1", "--epochs", "2",
            "--batch-size", "16", "--no-progress", "--out", str(out)]
    assert main([*base, "--stop-after-epoch", "1"]) == 0
    run = json.load(open(out / "run.json"))
    assert run["config"]["data"] == str(pkl) and run["data"]["path"] == str(pkl) and run["world_size"] == 1
    assert run["data"]["size"] == os.path.getsize(pkl) and len(run["data"]["sha256"]) == 64
    import shutil

    shutil.copy(pkl, tmp_path / "keep.pkl")
    assert main(["data", "synth", "--preset", "tiny", "--limit", "40", "--seed", "7", "--out", str(pkl),
                 "--overwrite"]) == 0
    capsys.readouterr()
    assert main([*base, "--resume"]) == 2
    err = _err(capsys)
    assert "trained on other data" in err and "sha256" in err and "--allow-data-change" in err
    assert main([*base, "--resume", "--allow-data-change"]) == 0
    # the same data: resumes as before, bit-identical to an uninterrupted run
    shutil.copy(tmp_path / "keep.pkl", pkl)
    out2, full = tmp_path / "run2", tmp_path / "full"
    b2 = [a if a != str(out) else str(out2) for a in base]
    assert main([*b2, "--stop-after-epoch", "1"]) == 0
    assert main([*b2, "--resume"]) == 0
    assert main([a if a != str(out) else str(full) for a in base]) == 0
    a, b = load_file(str(out2 / "seed_1" / "best.safetensors")), load_file(str(full / "seed_1" / "best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_world_size_is_refused(tmp_path):
    from msa_fast.train.config import TrainConfig
    from msa_fast.train.run_dir import RunDirError, claim

    cfg = TrainConfig(model="lf_dnn", data="synthetic:tiny:limit=48", seeds=[1], out=str(tmp_path / "r"),
                      progress=False)
    with claim(cfg, world=2):
        pass
    (tmp_path / "r" / "seed_1").mkdir()  # a run is there now
    resume = TrainConfig(**dict(cfg.to_dict(), resume=True))
    with pytest.raises(RunDirError, match="data-parallel ranks: stored 2, now 1"), claim(resume, world=1):
        pass
    notes = []
    with claim(TrainConfig(**dict(cfg.to_dict(), resume=True, allow_data_change=True)), notes.append, world=1):
        pass
    assert any("allow-data-change" in n for n in notes)
