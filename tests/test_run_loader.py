"""One run loader (issue 26): :func:`msa_fast.train.checkpoint.load_run` is the only code that
reads a trained run; the CLI, :func:`msa_fast.robustness.load_run` and
:meth:`msa_fast.inference.Predictor.from_checkpoint` go through it and get the same model; its
errors are one line naming the path. And one CLI: every subcommand of ``msa-fast`` is a module
of ``msa_fast/cli/`` wired by ``set_defaults(func=...)``."""

import argparse
import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

os.environ.setdefault("MSA_FAST_CACHE", os.path.join(tempfile.gettempdir(), "msa_fast_test_cache"))

from msa_fast.cli import SUBCOMMANDS, build_parser, main  # noqa: E402
from msa_fast.train.checkpoint import CheckpointError, Run, load_run, resolve_run  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "msa_fast"
TINY = ["--data", "synthetic:tiny:limit=48", "--epochs", "2", "--batch-size", "16", "--no-progress",
        "--model-cfg", '{"hidden": 16, "av_hidden": 8}', "--seeds", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "run"
    assert main(["train", "--model", "lf_dnn", *TINY, "--out", str(out)]) == 0
    return out / "seed_1"


def _state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_three_callers_read_the_same_run(run_dir):
    from msa_fast import robustness as R
    from msa_fast.inference import Predictor

    run = load_run(str(run_dir), device="cpu")
    assert isinstance(run, Run) and not run.model.training
    assert (run.model_name, run.seed, run.weights) == ("lf_dnn", 1, "best")
    assert run.weights_path == os.path.join(str(run_dir), "best.safetensors")
    assert run.dims == json.load(open(run_dir / "state.json"))["dims"]
    assert run.config.model == "lf_dnn" and run.model_cfg == {"hidden": 16, "av_hidden": 8}

    model, state, data, cfg = R.load_run(str(run_dir), device="cpu")
    pred = Predictor.from_checkpoint(str(run_dir), device="cpu", compile=False)
    _same(_state(run.model), _state(model))
    _same(_state(run.model), _state(pred.model))
    assert state == run.state == pred.state
    assert pred.run.weights_path == run.weights_path and pred.run.model is None
    assert cfg.data == run.data_spec and data.dims == run.dims

    last = load_run(str(run_dir), weights="last", device="cpu")
    assert last.weights_path == os.path.join(str(run_dir), run.state["weights"])
    assert _state(Predictor.from_checkpoint(str(run_dir), device="cpu", weights="last",
                                            compile=False).model).keys() == _state(last.model).keys()


def test_path_forms(run_dir):
    d = str(run_dir)
    assert resolve_run(d) == (d, None)
    assert resolve_run(os.path.join(d, "state.json")) == (d, None)
    assert resolve_run(os.path.join(d, "best.safetensors")) == (d, "best.safetensors")
    by_state = load_run(os.path.join(d, "state.json"), device="cpu")
    by_file = load_run(os.path.join(d, "best.safetensors"), weights="last", device="cpu")  # the file wins
    assert by_state.run_dir == by_file.run_dir == d and by_file.weights == "best.safetensors"
    _same(_state(by_state.model), _state(by_file.model))
    # the CLI takes every form too
    assert main(["eval", "--checkpoint", os.path.join(d, "best.safetensors")]) == 0


def _copy(run_dir, tmp_path) -> pathlib.Path:
    dst = tmp_path / "copy" / "seed_1"
    shutil.copytree(run_dir, dst)
    return dst


@pytest.mark.parametrize("case", ["missing_dir", "parent_dir", "no_best", "truncated_weights",
                                  "flipped_byte", "corrupt_state", "state_without_model",
                                  "other_model", "bad_weights_arg", "not_a_run_file"])
def test_one_line_errors(run_dir, tmp_path, capsys, case):
    d = _copy(run_dir, tmp_path)
    kw, path, expect = {}, d, None
    if case == "missing_dir":
        path, expect = tmp_path / "nope", f"no checkpoint in {tmp_path / 'nope'} (state.json not found)"
    elif case == "parent_dir":
        path, expect = d.parent, "pass one seed's directory: seed_1"
    elif case == "no_best":
        (d / "best.safetensors").unlink()
        expect = f"checkpoint weights not found: {d / 'best.safetensors'}"
    elif case == "truncated_weights":
        data = (d / "best.safetensors").read_bytes()
        (d / "best.safetensors").write_bytes(data[: len(data) // 2])
        expect = str(d / "best.safetensors")
    elif case == "flipped_byte":
        data = bytearray((d / "best.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (d / "best.safetensors").write_bytes(bytes(data))
        expect = "do not match the checksum"
    elif case == "corrupt_state":
        (d / "state.json").write_text('{"epoch": 1, "weig')
        expect = f"{d / 'state.json'}: cannot read the checkpoint state"
    elif case == "state_without_model":
        state = json.loads((d / "state.json").read_text())
        del state["model"]
        (d / "state.json").write_text(json.dumps(state))
        expect = f"{d / 'state.json'}: not the state of a trained run (missing ['model'])"
    elif case == "other_model":
        kw, expect = {"model": "agfn"}, "expected a checkpoint of model 'agfn', got one of 'lf_dnn'"
    elif case == "bad_weights_arg":
        kw, expect = {"weights": "first"}, "weights: expected 'best' or 'last', got 'first'"
    elif case == "not_a_run_file":
        path = tmp_path / "x.txt"
        path.write_text("x")
        expect = f"no checkpoint in {path}"
    with pytest.raises(ValueError) as info:
        load_run(str(path), device="cpu", **kw)
    msg = str(info.value)
    assert expect in msg and "\n" not in msg, msg
    if case not in ("other_model", "bad_weights_arg"):
        assert isinstance(info.value, CheckpointError)
        # the same line from every command that reads a run
        for argv in (["eval"], ["predict"], ["eval", "--robustness", "drop", "--out", str(tmp_path / "r.json")]):
            capsys.readouterr()
            assert main([*argv, "--checkpoint", str(path)]) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            err = [e for e in err if "non-finite feature values" not in e]
            assert len(err) == 1 and err[0].startswith("msa-fast: error: ") and expect in err[0], (argv, err)


# --------------------------------------------------------------------------- #
# Only the loader reads a run
# --------------------------------------------------------------------------- #

# reading a run's files: only the checkpoint module (the loader) and the trainer (resuming
# and finishing its own run) may
READERS = {"read_state", "load_weights", "load_checkpoint", "load_state_dict", "st_load", "load_file"}
MAY_READ = {"msa_fast/train/checkpoint.py", "msa_fast/train/trainer.py"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            yield node.lineno, name


def _code_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that are not docstrings."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_no_module_but_the_loader_reads_a_run():
    bad = []
    for p in sorted(PKG.rglob("*.py")):
        rel = str(p.relative_to(ROOT))
        tree = ast.parse(p.read_text(), rel)
        if rel not in MAY_READ:
            bad += [f"{rel}:{line}: calls {name}" for line, name in _calls(tree) if name in READERS]
        # the inference and analysis layers name no file of a run directory
        if rel.startswith(("msa_fast/inference/", "msa_fast/robustness.py", "msa_fast/analysis.py")):
            bad += [f"{rel}:{line}: names {s!r}" for line, s in _code_strings(tree)
                    if s in ("state.json", "best.safetensors", "run.json")]
    assert not bad, "read a run through msa_fast.train.checkpoint.load_run:\n" + "\n".join(bad)


@pytest.mark.parametrize("path, func", [("msa_fast/inference/predictor.py", "from_checkpoint"),
                                        ("msa_fast/robustness.py", "load_run"),
                                        ("msa_fast/cli/eval.py", "run")])
def test_the_callers_call_the_loader(path, func):
    tree = ast.parse((ROOT / path).read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == func)
    assert {name for _, name in _calls(fn)} & {"load_run", "_load_run"}, f"{path}::{func}"


# --------------------------------------------------------------------------- #
# One CLI, one module per subcommand
# --------------------------------------------------------------------------- #


def _leaves(parser: argparse.ArgumentParser, prefix=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, p in subs[0].choices.items():
        yield from _leaves(p, (*prefix, name))


def test_every_subcommand_is_wired_by_set_defaults(capsys):
    leaves = dict(_leaves(build_parser()))
    assert {("train",), ("eval",), ("analyze",), ("predict",), ("export",), ("serve",),
            ("data", "synth"), ("data", "inspect"), ("robustness", "table")} == set(leaves)
    owners = {mod.__name__ for mod in SUBCOMMANDS}
    for argv, p in leaves.items():
        func = p.get_default("func")
        assert callable(func) and func.__module__ in owners, argv
        assert func.__module__ == f"msa_fast.cli.{argv[0]}", (argv, func.__module__)
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*argv, "--help"])
        assert e.value.code == 0
        assert "usage: msa-fast " + " ".join(argv) in capsys.readouterr().out
    for mod in SUBCOMMANDS:
        assert callable(mod.add_parser)
    # main dispatches by args.func alone: no chain of `args.cmd == ...`
    tree = ast.parse((PKG / "cli" / "__init__.py").read_text())
    compares = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Compare) and "cmd" in ast.unparse(n)]
    assert not compares, compares
    assert not (PKG / "cli.py").exists()


def test_robustness_has_no_second_cli():
    import msa_fast.robustness as R

    assert not hasattr(R, "main")
    src = (PKG / "robustness.py").read_text()
    assert "argparse" not in src and "__main__" not in src


def test_robustness_table_subcommand(tmp_path, capsys):
    js = tmp_path / "a.json"
    js.write_text(json.dumps({"model": "m", "data": "d", "params": {}}))
    assert main(["robustness", "table", str(js)]) == 0
    assert capsys.readouterr().out.startswith("| model | data |")
    assert main(["robustness", "table", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msa-fast: error: ") and "none.json" in err[0], err
    (tmp_path / "bad.json").write_text("{")
    assert main(["robustness", "table", str(tmp_path / "bad.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_python_m_and_the_console_script_entry():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "msa_fast", "robustness", "table", "--help"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "usage: msa-fast robustness table" in r.stdout, r.stderr
    setup = (ROOT / "setup.py").read_text()
    assert '"msa-fast=msa_fast.cli:main"' in setup
    import msa_fast.cli

    assert callable(msa_fast.cli.main)


def test_format_mean_std_is_the_one_formatter():
    from msa_fast.metrics import format_mean_std

    assert format_mean_std({"mean": {"a": 0.5}, "std": {"a": 0.25}}, "a") == "0.5000 ± 0.2500"
    assert format_mean_std({"mean": 0.5, "std": 0.0}) == "0.5000"
    assert format_mean_std({"mean": None, "std": None}) == "nan"
    assert format_mean_std(None) == "—"
    for rel in ("msa_fast/robustness.py", "msa_fast/cli/robustness.py"):
        src = (ROOT / rel).read_text()
        assert "format_mean_std" in src and "_fmt(" not in src, rel


def test_a_run_records_its_hyper_parameters_and_old_runs_keep_old_defaults(tmp_path):
    """A default that changes (AGFN's tau, 0.5 -> 0.05) cannot change how a run loads: a run
    states every hyper-parameter it was built with; one written before that loads with the
    defaults of its time (models.PREVIOUS_DEFAULTS)."""
    from msa_fast.models import PREVIOUS_DEFAULTS, model_hparams, run_hparams

    out = tmp_path / "agfn"
    cfg = '{"d": 8, "heads": 2, "ffn_dim": 0, "hidden": 8, "av_hidden": 4}'
    assert main(["train", "--model", "agfn", *TINY[:-4], "--model-cfg", cfg, "--seeds", "1",
                 "--out", str(out)]) == 0
    seed_dir = out / "seed_1"
    state = json.loads((seed_dir / "state.json").read_text())
    assert state["model_hparams"]["tau"] == 0.05 and state["model_hparams"]["d"] == 8
    assert state["model_hparams"] == model_hparams("agfn", json.loads(cfg))
    assert load_run(str(seed_dir)).model.fusion.tau == 0.05
    # the same run as written before model_hparams existed: the defaults of that time
    del state["model_hparams"]
    (seed_dir / "state.json").write_text(json.dumps(state))
    assert PREVIOUS_DEFAULTS["agfn"]["tau"] == 0.5
    assert run_hparams("agfn", state)["tau"] == 0.5
    assert load_run(str(seed_dir)).model.fusion.tau == 0.5
    # its own model_cfg still wins over an old default
    state["model_cfg"] = {**json.loads(cfg), "tau": 0.2}
    (seed_dir / "state.json").write_text(json.dumps(state))
    assert load_run(str(seed_dir)).model.fusion.tau == 0.2
