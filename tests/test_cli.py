"""msa-fast command line: smoke runs on tiny synthetic data, and one clean line per bad input."""

import json
import os
import pickle
import tempfile

import pytest

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast.cli import main  # noqa: E402

TINY = ["--data", "synthetic:tiny:limit=48", "--epochs", "2", "--batch-size", "16", "--no-progress",
        "--model-cfg", '{"hidden": 16, "av_hidden": 8}']


def test_train_eval_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "lf_dnn", *TINY, "--seeds", "1", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for key in ("Has0_acc_2", "Non0_F1_score", "Mult_acc_7", "MAE", "Corr", "±"):
        assert key in printed
    res = json.load(open(out / "results.json"))
    assert res["seeds"] == [1, 2] and "Non0_acc_2" in res["mean"]
    assert main(["eval", "--checkpoint", str(out / "seed_1"), "--split", "valid"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert json.loads(line)["MAE"] == res["per_seed"][0]["valid"]["MAE"]


def test_train_config_file_missing_protocols_and_resume(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: text_only\nseeds: [3]\nmissing-rate: 0.2\ndrop_rate: 0.3\nlr: 0.002\n")
    out = tmp_path / "run"
    args = ["train", "--config", str(cfg), *TINY, "--model-cfg", '{"hidden": 16}', "--out", str(out)]
    assert main([*args, "--stop-after-epoch", "1"]) == 0
    assert json.load(open(out / "seed_3" / "state.json"))["epoch"] == 1
    assert main([*args, "--resume"]) == 0
    res = json.load(open(out / "results.json"))
    assert res["config"]["model"] == "text_only" and res["config"]["missing_rate"] == 0.2
    assert res["config"]["drop_rate"] == 0.3 and res["per_seed"][0]["epochs_run"] == 2
    jcfg = tmp_path / "cfg.json"
    jcfg.write_text(json.dumps({"model": "text_only", "seeds": 4}))
    assert main(["train", "--config", str(jcfg), *TINY, "--model-cfg", "{}", "--epochs", "1"]) == 0


def test_data_synth_and_inspect(tmp_path, capsys):
    path = tmp_path / "syn.pkl"
    assert main(["data", "synth", "--preset", "tiny", "--out", str(path), "--limit", "20", "--unaligned"]) == 0
    assert main(["data", "inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "unaligned" in text and "train: N=20" in text and "audio (20, 375, 5)" in text
    assert "histogram" in text and ("neginf" in text or "none" in text)


def _bad_pickle(tmp_path):
    p = tmp_path / "bad.pkl"
    p.write_bytes(pickle.dumps({"train": {"audio": [1]}, "valid": {}, "test": {}}))
    return str(p)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model", "nope", *TINY], "unknown model 'nope'"),
        (["train", "--model", "lf_dnn", "--data", "/no/such.pkl"], "data file not found"),
        (["train", "--model", "lf_dnn", "--data", "BAD"], "missing key 'vision'"),
        (["train", "--model", "lf_dnn", "--data", "DIR"], "is a directory"),
        (["train", "--model", "lf_dnn", "--data", "synthetic:huge"], "unknown synthetic preset"),
        (["train", "--config", "/no/cfg.yaml"], "config file not found"),
        (["train", "--config", "CFG", *TINY], "unknown keys ['colour']"),
        (["train", "--model", "lf_dnn", "--resume", *TINY], "--resume needs --out"),
        (["train", "--model", "lf_dnn", "--missing-rate", "2", *TINY], "missing_rate"),
        (["eval", "--checkpoint", "/no/run"], "no checkpoint"),
        (["data", "inspect", "/no/such.pkl"], "data file not found"),
        (["data", "synth", "--preset", "huge", "--out", "X"], "unknown preset"),
    ],
)
def test_bad_input_one_line(tmp_path, capsys, argv, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("colour: red\n")
    subst = {"BAD": _bad_pickle(tmp_path), "DIR": str(tmp_path), "CFG": str(cfg),
             "X": str(tmp_path / "x.pkl")}
    argv = [subst.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if "non-finite feature values" not in e]
    assert len(err) == 1 and err[0].startswith("msa-fast: error:"), err
    assert message in err[0] and "Traceback" not in err[0]


def test_preset_is_the_base_and_flags_win(tmp_path):
    from torch import nn

    from msa_fast.cli import _config_from_args, _parser
    from msa_fast.models import register_model

    @register_model("_with_presets")
    class _M(nn.Module):
        presets = {"mosi": {"train": {"lr": 5e-4, "batch_size": 24}, "model": {"hidden": 12, "k_cl": 10}}}

    args = _parser().parse_args(["train", "--model", "_with_presets", "--preset", "mosi",
                                 "--batch-size", "8", "--model-cfg", '{"hidden": 20}'])
    cfg = _config_from_args(args)
    assert (cfg.lr, cfg.batch_size) == (5e-4, 8)
    assert cfg.model_cfg == {"hidden": 20, "k_cl": 10}


def test_unknown_preset_is_one_line(capsys):
    assert main(["train", "--model", "lf_dnn", "--preset", "mosei", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--preset" in err and "no preset 'mosei'" in err
