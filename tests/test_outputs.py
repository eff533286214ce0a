"""Issue 27: no output path destroys an input. Every writing command refuses an output that is
one of its inputs or a file of a run directory (exit 2, one line naming it, the file
byte-identical afterwards), replaces an existing output only with --overwrite, and robustness
sweeps merge into the existing JSON by protocol."""

import hashlib
import json
import os
import tempfile

import pytest

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast.cli import main  # noqa: E402


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _one_line(capsys) -> str:
    err = [e for e in capsys.readouterr().err.strip().splitlines() if "non-finite feature values" not in e]
    assert len(err) == 1 and err[0].startswith("msa-fast: error:") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A pickle on disk and a run trained on it."""
    root = tmp_path_factory.mktemp("outputs")
    pkl = root / "tiny.pkl"
    assert main(["data", "synth", "--preset", "tiny", "--limit", "40", "--out", str(pkl)]) == 0
    out = root / "run"
    assert main(["train", "--model", "lf_dnn", "--data", str(pkl), "--epochs", "1", "--seeds", "1",
                 "--batch-size", "16", "--no-progress", "--out", str(out)]) == 0
    return pkl, out


def test_predict_refuses_its_data_as_out(tiny, capsys):
    pkl, out = tiny
    before = _digest(pkl)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out / "seed_1"), "--out", str(pkl), "--no-compile"]) == 2
    assert f"{pkl} is an input of this command" in _one_line(capsys)
    assert main(["predict", "--checkpoint", str(out / "seed_1"), "--out", str(pkl), "--no-compile",
                 "--overwrite", "--data", str(pkl)]) == 2  # --overwrite never covers an input
    assert f"{pkl} is an input of this command" in _one_line(capsys)
    # the run's own data is an input of eval --robustness too, with or without --data
    assert main(["eval", "--checkpoint", str(out / "seed_1"), "--robustness", "drop", "--out", str(pkl),
                 "--overwrite"]) == 2
    assert f"{pkl} is an input of this command" in _one_line(capsys)
    assert _digest(pkl) == before


@pytest.mark.parametrize("name", ["seed_1/state.json", "seed_1/best.safetensors", "results.json", "run.json"])
def test_outputs_refuse_a_run_directorys_files(tiny, capsys, name):
    pkl, out = tiny
    target = out / name
    if not target.exists():
        pytest.skip(f"{name} is not written by this run layout")
    before = _digest(target)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "seed_1"), "--robustness", "drop", "--out", str(target)]) == 2
    assert "is a file of the run directory" in _one_line(capsys)
    assert main(["predict", "--checkpoint", str(out / "seed_1"), "--out", str(target), "--no-compile"]) == 2
    assert "is a file of the run directory" in _one_line(capsys)
    assert main(["export", "--checkpoint", str(out / "seed_1"), "--format", "onnx", "--out", str(target)]) == 2
    assert "is a file of the run directory" in _one_line(capsys)
    assert main(["data", "synth", "--preset", "tiny", "--out", str(target), "--overwrite"]) == 2
    assert "is a file of the run directory" in _one_line(capsys)
    assert _digest(target) == before
    assert main(["eval", "--checkpoint", str(out / "seed_1")]) == 0  # the run still works


def test_existing_outputs_need_overwrite(tiny, tmp_path, capsys):
    pkl, out = tiny
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("mine\n")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out / "seed_1"), "--out", str(csv_path), "--no-compile"]) == 2
    assert "exists; pass --overwrite" in _one_line(capsys)
    assert csv_path.read_text() == "mine\n"
    assert main(["predict", "--checkpoint", str(out / "seed_1"), "--out", str(csv_path), "--no-compile",
                 "--overwrite"]) == 0
    assert csv_path.read_text().startswith("id,prediction,label")
    other = tmp_path / "other.pkl"
    other.write_bytes(b"keep")
    assert main(["data", "synth", "--preset", "tiny", "--limit", "8", "--out", str(other)]) == 2
    assert "exists; pass --overwrite" in _one_line(capsys) and other.read_bytes() == b"keep"
    assert main(["data", "synth", "--preset", "tiny", "--limit", "8", "--out", str(other), "--overwrite"]) == 0


def test_sweeps_merge_into_the_default_json(tiny, capsys):
    pkl, out = tiny
    run = out / "seed_1"
    assert main(["eval", "--checkpoint", str(run), "--robustness", "drop"]) == 0
    assert main(["eval", "--checkpoint", str(run), "--robustness", "missing"]) == 0
    res = json.load(open(run / "robustness.json"))
    assert "drop" in res and "missing" in res and res["merged_from_earlier_sweeps"] == ["drop"]
    assert main(["eval", "--checkpoint", str(run), "--robustness", "missing", "--overwrite"]) == 0
    res = json.load(open(run / "robustness.json"))
    assert "missing" in res and "drop" not in res


def test_analyze_refuses_a_run_directory_and_needs_overwrite(tiny, tmp_path, capsys):
    pkl, out = tiny
    capsys.readouterr()
    argv = ["analyze", "--checkpoint", str(out / "seed_1"), "--what", "location-error"]
    assert main([*argv, "--out", str(out / "seed_1")]) == 2
    assert "is a run directory" in _one_line(capsys)
    earlier = tmp_path / "a" / "location-error.json"
    earlier.parent.mkdir()
    earlier.write_text('{"an": "earlier analysis"}')
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "location-error.json exists; pass --overwrite" in _one_line(capsys)
    assert earlier.read_text() == '{"an": "earlier analysis"}'
    # with --overwrite the analysis itself runs (and says lf_dnn has no fused feature to analyse)
    assert main([*argv, "--out", str(tmp_path / "a"), "--overwrite"]) == 2
    assert "no fusion module" in _one_line(capsys)
