"""Data-parallel training (contract §7, distributed) with 2 gloo ranks on the CPU: 2 ranks x half
a batch equal 1 rank x the batch (weights, metrics, mined pairs), resume after a kill under
torchrun, and a dead rank ends the run with a non-zero exit in bounded time."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast.cli import main  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

# psutil finds torchrun's ranks to kill; only the two kill tests need it, so its absence
# (an image without it) skips those two rather than the whole module
try:
    import psutil
except ImportError:
    psutil = None
needs_psutil = pytest.mark.skipif(psutil is None, reason="needs psutil to find and kill torchrun's ranks")

DATA = "synthetic:tiny:limit=48"


def _args(model, out, epochs=2, *extra, data=DATA):
    # dropout 0: dropout masks are per rank, so only a dropout-free model can match one process
    return ["train", "--model", model, "--data", data, "--batch-size", "16", "--epochs", str(epochs),
            "--seeds", "1", "--no-progress", "--model-cfg", '{"dropout": 0.0}', "--out", str(out),
            *extra]


def _torchrun(argv, env_extra=None, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "msa_fast", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


# Adam divides each gradient by its running RMS, so where a gradient is at rounding-noise
# level -- exactly 0 in exact arithmetic (attention key biases and the GAP score bias b2a:
# a softmax does not see a constant added to its logits) or cancelling to ~1e-9 (a nearly
# dead unit) -- the two summation orders give steps of up to lr in either direction. So:
# every element within 1e-5 but such noise elements (at most 1 in 500 of all elements, and
# not one of a weight matrix's rows of signal), which stay within Adam's 2 x lr x steps.
ADAM_BOUND = 2 * 1e-3 * 6  # lr 1e-3, 3 batches x 2 epochs
@pytest.mark.parametrize("model, data, extra", [
    # unaligned: the length-bucketed sampler; with both missing-modality protocols
    ("lf_dnn", DATA + ":unaligned", ["--missing-rate", "0.2", "--drop-rate", "0.3"]),
    ("agfn", DATA, []),
    ("fd_cmdie", DATA, []),
])
def test_two_ranks_reproduce_one_process(tmp_path, model, data, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = _torchrun(_args(model, two, 2, *extra, data=data))
    assert main(_args(model, one, 2, *extra, data=data)) == 0
    printed = _finish(proc)
    a, b = load_file(str(one / "seed_1" / "epoch2.safetensors")), load_file(str(two / "seed_1" / "epoch2.safetensors"))
    assert a.keys() == b.keys()
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max() <= ADAM_BOUND, float(diffs.max())
    assert (diffs > 1e-5).float().mean() <= 1 / 500, [
        (k, float((a[k] - b[k]).abs().max())) for k in a if (a[k] - b[k]).abs().max() > 1e-5]
    ra, rb = (json.load(open(d / "results.json"))["per_seed"][0] for d in (one, two))
    timing = ("samples_per_s",)
    for split in ("valid", "test"):
        assert {k: v for k, v in ra[split].items() if k not in timing} == \
            {k: v for k, v in rb[split].items() if k not in timing}, split
    assert [h["epoch"] for h in ra["history"]] == [h["epoch"] for h in rb["history"]]
    for ha, hb in zip(ra["history"], rb["history"]):
        assert abs(ha["valid_loss"] - hb["valid_loss"]) <= 1e-5
        assert abs(ha["train_loss"] - hb["train_loss"]) <= 1e-5
    assert printed.count("MAE") == 1  # rank 0 alone prints the table
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mine_on_rank(rank, world, port, out_dir):
    import torch.distributed as dist

    from msa_fast.data import load_data
    from msa_fast.models import build_model
    from msa_fast.train.distributed import Dist
    from msa_fast.train.seed import set_seed
    from msa_fast.train.trainer import EpochContext

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = load_data(DATA)
        set_seed(3)
        model = build_model("fd_cmdie", data.dims, k_cl=5, mine_batch_size=7)
        ctx = EpochContext(1, 3, data["train"], data.aligned, 7, torch.device("cpu"), False, False,
                           Dist(world, rank))
        model.on_epoch_start(ctx)
        torch.save(tuple(model.mined), os.path.join(out_dir, f"mined_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_mining_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    from msa_fast.data import load_data
    from msa_fast.models import build_model
    from msa_fast.train.seed import set_seed
    from msa_fast.train.trainer import EpochContext

    mp.spawn(_mine_on_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    data = load_data(DATA)
    set_seed(3)
    model = build_model("fd_cmdie", data.dims, k_cl=5, mine_batch_size=7)
    model.on_epoch_start(EpochContext(1, 3, data["train"], data.aligned, 7, torch.device("cpu"),
                                      False, False))
    want = tuple(model.mined)
    for rank in range(2):
        got = torch.load(tmp_path / f"mined_{rank}.pt")
        for w, g in zip(want, got):
            assert torch.equal(w, g) or torch.allclose(w, g, equal_nan=True, rtol=0, atol=0)


def _wait_for_epoch(state, proc, epoch, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                if json.loads(state.read_text())["epoch"] >= epoch:
                    return
            except (ValueError, KeyError):
                pass  # being replaced: os.replace is atomic, but read it again
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} appeared (rc {proc.poll()})")


def test_resume_after_a_kill_under_torchrun(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    n = ["--patience", "12"]
    ref_proc = _torchrun(_args("lf_dnn", ref, 12, *n))  # the uninterrupted run, alongside
    # both ranks kill themselves (SIGKILL) once epoch 2's checkpoint is on disk: a crash at a
    # known point, not a race between a poll and the training loop
    proc = _torchrun(_args("lf_dnn", run, 12, *n), env_extra={"MSA_FAST_KILL_AFTER_EPOCH": "2"})
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0, out[-2000:]
    assert json.loads((run / "seed_1" / "state.json").read_text())["epoch"] == 2
    assert not (run / "results.json").exists()
    _finish(_torchrun(_args("lf_dnn", run, 12, *n, "--resume")))
    _finish(ref_proc)
    a = load_file(str(ref / "seed_1" / "epoch12.safetensors"))
    b = load_file(str(run / "seed_1" / "epoch12.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.load(open(d / "results.json"))["per_seed"][0] for d in (ref, run))
    assert ra["test"]["MAE"] == rb["test"]["MAE"] and ra["best_epoch"] == rb["best_epoch"]


@needs_psutil
def test_a_dead_rank_ends_the_run_non_zero_in_bounded_time(tmp_path):
    run = tmp_path / "run"
    proc = _torchrun(_args("lf_dnn", run, 200, "--patience", "200"))
    _wait_for_epoch(run / "seed_1" / "state.json", proc, 1)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if p.environ().get("RANK") == "1"]
    assert len(workers) == 1
    workers[0].kill()
    # bounded: far below the process group's 1800 s timeout, which a hang would wait out
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.kill()
        proc.communicate()
        pytest.fail("rank 1 died but the run was still going 120 s later (a surviving rank hangs)")
    assert proc.returncode != 0, out[-2000:]
