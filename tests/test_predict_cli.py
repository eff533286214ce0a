"""msa-fast predict: one CSV row per sample, and the metrics of msa-fast eval on the same split
(same loader, same missing-modality protocol); user errors in one line."""

import csv
import json
import os
import tempfile

import pytest

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast.cli import main  # noqa: E402

TINY = ["--data", "synthetic:tiny:limit=48", "--epochs", "1", "--batch-size", "16", "--no-progress",
        "--model-cfg", '{"hidden": 16, "av_hidden": 8}', "--seeds", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict_run")
    # a missing rate: eval applies the run's protocol to the test split, and so must predict
    assert main(["train", "--model", "lf_dnn", *TINY, "--out", str(out), "--missing-rate", "0.3"]) == 0
    return out / "seed_1"


@pytest.mark.parametrize("split", ["test", "valid"])
def test_predict_metrics_equal_eval(run_dir, tmp_path, capsys, split):
    assert main(["eval", "--checkpoint", str(run_dir), "--split", split]) == 0
    ev = json.loads(capsys.readouterr().out.splitlines()[-1])
    csv_path = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(run_dir), "--split", split, "--out", str(csv_path),
                 "--no-compile"]) == 0
    lines = capsys.readouterr().out.splitlines()
    pr = json.loads(lines[-2])
    ev.pop("samples_per_s")
    assert pr == ev
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 48 and list(rows[0]) == ["id", "prediction", "label"]
    assert rows[0]["id"].startswith("tiny_") and len({r["id"] for r in rows}) == 48
    preds = [float(r["prediction"]) for r in rows]
    labels = [float(r["label"]) for r in rows]
    mae = sum(abs(p - y) for p, y in zip(preds, labels)) / len(rows)
    assert abs(mae - pr["MAE"]) < 1e-4


def test_predict_other_data(run_dir, capsys):
    assert main(["predict", "--checkpoint", str(run_dir), "--data", "synthetic:tiny:limit=20:seed=5",
                 "--no-compile"]) == 0
    assert "MAE" in json.loads(capsys.readouterr().out.splitlines()[-1])


@pytest.mark.parametrize("argv, message", [
    (["predict", "--checkpoint", "/nonexistent/run"], "no checkpoint in /nonexistent/run"),
    (["predict", "--checkpoint", "RUN", "--data", "synthetic:mosei:limit=8"], "data widths"),
    (["predict", "--checkpoint", "RUN", "--max-batch", "0"], "--max-batch"),
    (["predict", "--checkpoint", "RUN", "--out", "/proc/nope/preds.csv", "--no-compile"], "--out"),
    (["serve", "--checkpoint", "/nonexistent/run"], "no checkpoint in /nonexistent/run"),
    (["serve", "--checkpoint", "RUN", "--batch-timeout", "-1"], "--batch-timeout"),
    # contract §10: every number flag checked, no silent 0 = default (issue 27)
    (["serve", "--checkpoint", "RUN", "--max-length", "-5"], "argument --max-length: expected an integer >= 1, got '-5'"),
    (["serve", "--checkpoint", "RUN", "--max-length", "0"], "argument --max-length: expected an integer >= 1, got '0'"),
    (["serve", "--checkpoint", "RUN", "--batch-timeout", "nan"], "argument --batch-timeout: expected a number >= 0"),
    (["serve", "--checkpoint", "RUN", "--port", "70000"], "argument --port: expected an integer in [1, 65535]"),
    (["serve", "--checkpoint", "RUN", "--max-batch", "x"], "argument --max-batch: expected an integer >= 1, got 'x'"),
    (["analyze", "--checkpoint", "RUN", "--what", "tsne", "--out", "o", "--limit", "0"], "argument --limit"),
    (["analyze", "--checkpoint", "RUN", "--what", "tsne", "--out", "o", "--limit", "-3"], "argument --limit"),
    (["eval", "--checkpoint", "RUN", "--batch-size", "0"], "argument --batch-size"),
    (["data", "synth", "--out", "o.pkl", "--limit", "0"], "argument --limit"),
])
def test_bad_input_one_line(run_dir, capsys, argv, message):
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msa-fast: error:") and message in err[0], err
