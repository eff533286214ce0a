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


@pytest.mark.parametrize("flag,stored", [("bf16", "bf16"), ("off", False), ("auto", True)])
def test_train_amp_flag(tmp_path, flag, stored):
    out = tmp_path / "run"
    assert main(["train", "--model", "lf_dnn", *TINY, "--seeds", "1", "--epochs", "1", "--amp", flag,
                 "--out", str(out)]) == 0
    res = json.load(open(out / "results.json"))
    assert res["config"]["amp"] == stored and res["per_seed"][0]["test"]["MAE"] == res["per_seed"][0]["test"]["MAE"]


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

    from msa_fast.cli import build_parser, config_from_args
    from msa_fast.models import register_model

    @register_model("_with_presets")
    class _M(nn.Module):
        presets = {"mosi": {"train": {"lr": 5e-4, "batch_size": 24}, "model": {"hidden": 12, "k_cl": 10}}}

    args = build_parser().parse_args(["train", "--model", "_with_presets", "--preset", "mosi",
                                 "--batch-size", "8", "--model-cfg", '{"hidden": 20}'])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.batch_size) == (5e-4, 8)
    assert cfg.model_cfg == {"hidden": 20, "k_cl": 10}


def test_unknown_preset_is_one_line(capsys):
    assert main(["train", "--model", "lf_dnn", "--preset", "mosei", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--preset" in err and "no preset 'mosei'" in err


def _one_line(capsys) -> str:
    err = [e for e in capsys.readouterr().err.strip().splitlines()
           if "non-finite feature values" not in e]
    assert len(err) == 1 and err[0].startswith("msa-fast: error:") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], "epochs (--epochs): expected an integer >= 1, got 0"),
        (["--epochs", "-3"], "epochs (--epochs): expected an integer >= 1, got -3"),
        (["--batch-size", "0"], "batch_size (--batch-size): expected an integer >= 1"),
        (["--batch-size", "-16"], "batch_size (--batch-size): expected an integer >= 1"),
        (["--limit", "-1"], "limit (--limit): expected an integer or None >= 1"),
        (["--patience", "-1"], "patience (--patience): expected an integer >= 0"),
        (["--grad-clip", "nan"], "grad_clip (--grad-clip): expected a number >= 0 and finite"),
        (["--lr", "inf"], "lr (--lr): expected a number > 0 and finite"),
        (["--seeds", "1", "1"], "expected distinct seeds"),
        (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    ],
)
def test_bad_flag_values_are_one_line_before_training(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", "--model", "lf_dnn", *TINY, "--out", str(out), *flags]) == 2
    assert message in _one_line(capsys)
    assert not out.exists()  # nothing trained, nothing written


@pytest.mark.parametrize(
    "text, message",
    [
        ('epochs: "two"\n', "epochs (--epochs): expected an integer >= 1, got 'two' (str)"),
        ("lr: 1e-3\n", "YAML 1.1 reads an exponent without a dot"),
        ('lr: "1e-3"\n', "lr (--lr): expected a number > 0 and finite, got '1e-3'"),
        ("batch_size: 16.5\n", "batch_size (--batch-size): expected an integer >= 1, got 16.5"),
        ("model_cfg: [1, 2]\n", "model_cfg (--model-cfg): expected a mapping"),
        ("seeds: [1, x]\n", "seeds (--seeds): expected a list of integers"),
        ("resume: 3\nout: somewhere\n", "resume (--resume): expected a bool"),
        ("amp: 1\n", "amp (--amp): expected a bool or a string in (true, false, \"bf16\")"),
        ("amp: fp16\n", "amp (--amp): expected a bool or a string in (true, false, \"bf16\"), got 'fp16'"),
    ],
)
def test_config_file_with_wrong_types_is_one_line(tmp_path, capsys, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: lf_dnn\n" + text)
    assert main(["train", "--config", str(cfg), "--data", "synthetic:tiny:limit=48"]) == 2
    assert message in _one_line(capsys)


def test_model_cfg_types_and_keys_are_checked_for_every_model(capsys):
    from msa_fast.models import available_models

    base = ["train", "--data", "synthetic:tiny:limit=48", "--epochs", "1", "--no-progress"]
    for name in [m for m in available_models() if not m.startswith("_")]:  # not the tests' own
        assert main([*base, "--model", name, "--model-cfg", '{"hidden": "big"}']) == 2
        err = _one_line(capsys)
        assert f"{name} hidden expected int" in err and "'big'" in err, err
        assert main([*base, "--model", name, "--model-cfg", '{"hidden": 16.5}']) == 2
        assert "16.5" in _one_line(capsys)
        assert main([*base, "--model", name, "--model-cfg", '{"dropuot": 0.1}']) == 2
        err = _one_line(capsys)
        assert "no hyper-parameter 'dropuot'" in err and "did you mean 'dropout'" in err, err
        assert main([*base, "--model", name, "--model-cfg", '{"text_model": "/no/such/bert"}']) == 2
        assert "text_model '/no/such/bert' is not a directory" in _one_line(capsys)


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    assert main(["train", "--model", "lf_dnn", *TINY, "--out", str(f)]) == 2
    assert f"--out: {f} is a file" in _one_line(capsys)
    assert f.read_text() == "x"


def _pickle_with(tmp_path, **edits):
    from msa_fast.data import synthetic

    pkl = synthetic.generate("tiny", limit=12)
    for split, fn in edits.items():
        pkl[split] = fn(pkl[split])
    p = tmp_path / "edited.pkl"
    p.write_bytes(pickle.dumps(pkl))
    return str(p)


def test_empty_valid_split_and_label_strings_are_one_line(tmp_path, capsys):
    empty = _pickle_with(tmp_path, valid=lambda s: {k: v[:0] for k, v in s.items()})
    assert main(["train", "--model", "lf_dnn", *TINY[2:], "--data", empty, "--out",
                 str(tmp_path / "r")]) == 2
    assert "the valid split" in _one_line(capsys) and not (tmp_path / "r").exists()
    strings = _pickle_with(tmp_path, train=lambda s: dict(
        s, regression_labels=[f"{v:.1f}" for v in s["regression_labels"]]))
    assert main(["data", "inspect", strings]) == 2
    err = _one_line(capsys)
    assert "'regression_labels' expected numbers" in err and "split 'train'" in err


def test_synthetic_limit_zero_is_one_line_and_leaves_no_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MSA_FAST_CACHE", str(tmp_path / "cache"))
    assert main(["data", "inspect", "synthetic:tiny:limit=0"]) == 2
    assert "limit must be a positive integer" in _one_line(capsys)
    assert not (tmp_path / "cache").exists() or not any(
        f for _, _, files in os.walk(tmp_path / "cache") for f in files)


def test_bugs_are_not_dressed_as_user_errors(monkeypatch, tmp_path, capsys):
    """A RuntimeError raised inside a library (a bug, out of memory) prints its traceback and
    exits 1; msa_fast's own RuntimeError (an unavailable device) stays one line, exit 2;
    --traceback and MSA_FAST_DEBUG=1 show the traceback of any error."""
    import msa_fast.cli.data as cli_data

    def library_bug(args):
        import torch

        torch.empty(2, 3) @ torch.empty(4, 5)  # RuntimeError from inside torch
    monkeypatch.setattr(cli_data, "run_inspect", library_bug)
    assert main(["data", "inspect", "x.pkl"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "msa-fast: internal error: RuntimeError" in err
    assert main(["train", "--model", "lf_dnn", *TINY, "--device", "cuda", "--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0], err
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        main(["--traceback", "train", "--model", "lf_dnn", *TINY, "--device", "cuda", "--out", str(tmp_path / "r2")])
    monkeypatch.setenv("MSA_FAST_DEBUG", "1")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        main(["train", "--model", "lf_dnn", *TINY, "--device", "cuda", "--out", str(tmp_path / "r3")])
