"""The ``msa-fast`` command line.

- ``msa-fast train --model lf_dnn --data synthetic:mosi [--seeds 1111 1112] [--out DIR]``
  trains, prints MMSA's test metrics (mean ± std over seeds) and writes ``DIR/results.json``.
- ``msa-fast eval --checkpoint DIR/seed_1111 [--data ...] [--split test]`` evaluates the
  best weights of a run directory.
- ``msa-fast data synth --preset mosi|mosei|tiny --out PATH [--unaligned] [--seed N] [--pid]``.
- ``msa-fast data inspect PATH|synthetic:...``: splits, shapes, label histogram, NaN/-inf.
- ``torchrun --nproc_per_node=N -m msa_fast train ...``: data-parallel training
  (:mod:`msa_fast.train.distributed`); ``--batch-size`` is the global batch.
- ``msa-fast eval --checkpoint DIR --robustness missing|drop|noise|all [--seeds ...] [--out
  FILE.json] [--plot FILE.png] [--reference RUN_DIR]``: the sweeps of :mod:`msa_fast.robustness`.
- ``msa-fast analyze --checkpoint DIR --what gates|tsne|location-error --out DIR``: the
  analyses of :mod:`msa_fast.analysis` (JSON + PNG).

Errors the user can fix (bad path, wrong schema, an unsafe pickle, unknown model or
hyper-parameter, bad config, a run directory that holds another run or is locked, a
truncated checkpoint) print one line ``msa-fast: error: ...`` on stderr and exit with status
2; a non-finite training loss or a non-finite / diverged valid loss exits with 3, the last
good checkpoint intact; no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

from msa_fast.data.schema import SPLITS, SchemaError

_FLAG_KEYS = ("model", "data", "limit", "seeds", "epochs", "patience", "batch_size", "lr",
              "weight_decay", "grad_clip", "device", "backend", "out", "resume", "missing_rate",
              "drop_rate", "num_workers", "threads", "stop_after_epoch", "overwrite", "allow_data_change")


class UserError(Exception):
    """A problem with the user's input; reported in one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in the one-line form of every other error (``--help`` and
    ``msa-fast train -h`` still print the usage)."""

    def error(self, message):
        self.exit(2, f"msa-fast: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _number(kind, lo: float, lo_name: str, hi: float | None = None):
    """An argparse ``type``: ``kind`` (int / float) in [lo, hi], finite; the error names the
    range (argparse puts the flag in front of it), so ``--max-length -5`` or ``--limit 0``
    is a one-line error, never a silent default or a server that refuses every request."""
    def convert(text: str):
        bad = argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} "
                                         f"{lo_name}, got {text!r}")
        try:
            v = kind(text)
        except ValueError:
            raise bad from None
        if v != v or v in (float("inf"), float("-inf")) or v < lo or (hi is not None and v > hi):
            raise bad
        return v
    convert.__name__ = kind.__name__  # argparse's "invalid <name> value" wording for other failures
    return convert


_POSITIVE = _number(int, 1, ">= 1")
_SECONDS = _number(float, 0.0, ">= 0 (seconds, finite)")
_PORT = _number(int, 1, "in [1, 65535]", 65535)


def _parser() -> argparse.ArgumentParser:
    from msa_fast.inference.runtimes import RUNTIMES

    p = _Parser(prog="msa-fast", description=__doc__.split("\n\n")[0])
    p.add_argument("--traceback", action="store_true",
                   help="show the full traceback of an error (also MSA_FAST_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a model over one or more seeds")
    t.add_argument("--model", help="registered model name (text_only, lf_dnn, ...)")
    t.add_argument("--data", help="MMSA pickle path or synthetic:<preset>[:unaligned][:seed=N]")
    t.add_argument("--limit", type=int, help="keep the first N samples of every split")
    t.add_argument("--backend", choices=("auto", "eager", "triton", "cuda", "cpp"))
    t.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    t.add_argument("--amp", choices=("auto", "bf16", "off"),
                   help="bf16 autocast: auto = on CUDA only (default), bf16 = on every device "
                        "(the CPU too), off = fp32")
    t.add_argument("--seeds", type=int, nargs="+")
    t.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    t.add_argument("--patience", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--grad-clip", type=float)
    t.add_argument("--out", help="run directory: checkpoints and results.json")
    t.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out (its configuration must match)")
    t.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the run already in --out")
    t.add_argument("--allow-data-change", action="store_true", default=None,
                   help="with --resume: continue although the data (or the number of ranks) changed")
    t.add_argument("--config", help="YAML or JSON file whose keys mirror these flags")
    t.add_argument("--missing-rate", type=float, nargs="+",
                   help="MMSA token/frame missing rate: one value or three (t a v)")
    t.add_argument("--drop-rate", type=float, help="MPLMM whole-modality drop rate")
    t.add_argument("--preset", help="the model's named hyper-parameter set (e.g. FD-CMDIE's "
                   "Table 2: mosi, mosei); flags and --model-cfg win over it")
    t.add_argument("--model-cfg", help='model hyper-parameters as JSON, e.g. \'{"hidden": 64}\'')
    t.add_argument("--num-workers", type=int)
    t.add_argument("--threads", type=int, help="CPU threads while training (default 1; 0 = torch's)")
    t.add_argument("--stop-after-epoch", type=int, help=argparse.SUPPRESS)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a run directory's best weights on a split")
    e.add_argument("--checkpoint", required=True, help="run directory (out/seed_<seed>)")
    e.add_argument("--data", help="data to evaluate on (default: the training data)")
    e.add_argument("--split", default="test", choices=SPLITS)
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=_POSITIVE)
    e.add_argument("--missing-rate", type=float, nargs="+")
    e.add_argument("--drop-rate", type=float)
    e.add_argument("--weights", choices=("best", "last"), default="best")
    e.add_argument("--robustness", choices=("missing", "drop", "noise", "all"),
                   help="robustness sweep (contract §11): LNLN missing rates, MPLMM drop patterns, "
                   "Gaussian noise; writes --out JSON and --plot PNG")
    e.add_argument("--seeds", type=int, nargs="+",
                   help="protocol seeds of --robustness (default: the checkpoint's seed)")
    e.add_argument("--out", help="robustness JSON (default: CHECKPOINT/robustness.json); an existing "
                   "one of this checkpoint is merged into by protocol")
    e.add_argument("--overwrite", action="store_true", help="replace --out instead of merging into it")
    e.add_argument("--plot", help="robustness PNG (default: the --out path with .png)")
    e.add_argument("--reference", help="run directory (or robustness JSON) of a reference "
                   "model, e.g. lf_dnn: adds effective robustness to the noise sweep")

    a = sub.add_parser("analyze", help="gate weights, t-SNE or location-error of a trained model")
    a.add_argument("--checkpoint", required=True, help="run directory (out/seed_<seed>)")
    a.add_argument("--what", required=True, choices=("gates", "tsne", "location-error"))
    a.add_argument("--out", required=True, help="directory for the JSON and the PNG")
    a.add_argument("--overwrite", action="store_true", help="replace an earlier <what>.json / .png in --out")
    a.add_argument("--data", help="data to analyse (default: the training data)")
    a.add_argument("--split", default="test", choices=SPLITS)
    a.add_argument("--device", default="auto")
    a.add_argument("--batch-size", type=_POSITIVE)
    a.add_argument("--limit", type=_POSITIVE, help="tsne: at most N samples of the split (default 500)")

    pr = sub.add_parser("predict", help="predict a split with a run directory's weights (CSV)")
    pr.add_argument("--checkpoint", required=True, help="run directory (out/seed_<seed>)")
    pr.add_argument("--data", help="data to predict (default: the training data)")
    pr.add_argument("--split", default="test", choices=SPLITS)
    pr.add_argument("--out", help="CSV file: id, prediction, label")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--weights", choices=("best", "last"), default="best")
    pr.add_argument("--max-batch", type=_POSITIVE, default=64, help="largest batch bucket")
    pr.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile on the CPU (default: the per-model table)")
    pr.add_argument("--runtime", choices=RUNTIMES, default="auto",
                    help="how the model runs (default: the fastest measured for the model and batch)")

    ex = sub.add_parser("export", help="export a run's model: ONNX or an AOTInductor package, checked against eager")
    ex.add_argument("--checkpoint", required=True, help="run directory (out/seed_<seed>)")
    ex.add_argument("--format", required=True, choices=("onnx", "aoti"))
    ex.add_argument("--out", required=True, help="output file (.onnx / .pt2); its metadata also in <out>.json")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.add_argument("--weights", choices=("best", "last"), default="best")
    ex.add_argument("--layout", choices=("auto", "aligned", "unaligned"), default="auto",
                    help="one length for all modalities (aligned) or three (default: the run's data)")

    sv = sub.add_parser("serve", help="HTTP inference server: KServe v2 (binary tensors) and JSON (the serve extra)")
    sv.add_argument("--checkpoint", required=True, help="run directory (out/seed_<seed>)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_PORT, default=8000)
    sv.add_argument("--max-batch", type=_POSITIVE, default=64, help="dynamic batching: most samples per batch")
    sv.add_argument("--batch-timeout", type=_SECONDS, default=0.005,
                    help="dynamic batching: most seconds a batch waits for requests still arriving")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--max-length", type=_POSITIVE, help="longest sequence accepted (default 512)")
    sv.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile on the CPU (default: the per-model table)")
    sv.add_argument("--runtime", choices=RUNTIMES, default="auto",
                    help="how the model runs (default: the fastest measured for the model and batch)")
    sv.add_argument("--name", help="the model's name in /v2/models/{name} (default: the checkpoint's model)")
    sv.add_argument("--workers", type=_POSITIVE, default=1,
                    help="processes accepting on the port, each with its own Predictor (many-core hosts)")
    sv.add_argument("--max-body", type=_POSITIVE,
                    help="largest request body in bytes, refused (413) before reading (default: from "
                         "--max-length, --max-batch and the widths)")
    sv.add_argument("--warmup", default="1,max",
                    help="buckets run before /v2/health/ready: 'none' or comma-separated B, BxL or "
                         "BxLt/La/Lv (B a number or 'max'; default 1,max at the checkpoint's data lengths)")

    d = sub.add_parser("data", help="synthetic data and pickle inspection")
    dsub = d.add_subparsers(dest="data_cmd", required=True, parser_class=_Parser)
    s = dsub.add_parser("synth", help="write a synthetic MMSA pickle")
    s.add_argument("--preset", default="mosi")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--unaligned", action="store_true")
    s.add_argument("--limit", type=_POSITIVE)
    s.add_argument("--pid", action="store_true",
                   help="the redundant/unique/synergy generator (synthetic:<preset>:pid)")
    i = dsub.add_parser("inspect", help="summarise a pickle (splits, shapes, labels, NaN/-inf)")
    i.add_argument("path")
    return p


def _config_from_args(args) -> TrainConfig:  # noqa: F821 - lazy import below
    from msa_fast.train.config import TrainConfig, read_config_file

    d = read_config_file(args.config) if args.config else {}
    preset = getattr(args, "preset", None)
    if preset:
        d = _apply_preset(d, args.model or d.get("model") or TrainConfig.model, preset)
    for key in _FLAG_KEYS:
        val = getattr(args, key, None)
        if val is not None:
            d[key] = val
    if args.model_cfg:
        try:
            d["model_cfg"] = dict(d.get("model_cfg") or {}, **json.loads(args.model_cfg))
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"--model-cfg: not a JSON object ({e})") from None
    if args.no_progress:
        d["progress"] = False
    if getattr(args, "amp", None) is not None:
        d["amp"] = {"auto": True, "bf16": "bf16", "off": False}[args.amp]
    if isinstance(d.get("missing_rate"), list) and len(d["missing_rate"]) == 1:
        d["missing_rate"] = d["missing_rate"][0]
    if isinstance(d.get("seeds"), int):
        d["seeds"] = [d["seeds"]]
    if isinstance(d.get("data"), str) and not d["data"].startswith("synthetic:") and os.path.isfile(d["data"]):
        d["data"] = os.path.abspath(d["data"])  # eval / predict / resume from any folder
    if d.get("resume") and not d.get("out"):
        raise UserError("--resume needs --out (the run directory to resume)")
    return TrainConfig.from_dict(d)


def _apply_preset(d: dict, model: str, preset: str) -> dict:
    """A model class may define ``presets = {name: {"train": {...}, "model": {...}}}``:
    ``train`` keys are TrainConfig keys (lr, batch_size ...), ``model`` keys go to model_cfg.
    The preset is the base; the config file's and the command line's values win."""
    from msa_fast.models import _lookup

    try:
        presets = getattr(_lookup(model), "presets", {}) or {}
    except ValueError as e:
        raise UserError(str(e)) from None
    if preset not in presets:
        have = ", ".join(sorted(presets)) or "none"
        raise UserError(f"--preset: model {model!r} has no preset {preset!r} (presets: {have})")
    p = presets[preset]
    out = dict(p.get("train", {}), **d)
    out["model_cfg"] = dict(p.get("model", {}), **(d.get("model_cfg") or {}))
    return out


def _check_model(name: str) -> None:
    from msa_fast.models import _lookup

    _lookup(name)


def cmd_train(args) -> int:
    from msa_fast.train import distributed

    cfg = _config_from_args(args)
    dist = distributed.init(cfg.device)  # torchrun: join the group (one process: nothing)
    try:
        return _train(cfg, dist)
    finally:
        distributed.shutdown()


def _train(cfg, dist) -> int:
    from msa_fast.data.source import load_data
    from msa_fast.models import build_model, check_model_cfg
    from msa_fast.train.experiment import run_experiment
    from msa_fast.train.trainer import check_splits

    _check_model(cfg.model)
    check_model_cfg(cfg.model, cfg.model_cfg)
    if cfg.out and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UserError(f"--out: {cfg.out} is a file, expected a run directory")
    data = load_data(cfg.data, limit=cfg.limit)  # fail early on a bad path / schema
    check_splits(data)
    build_model(cfg.model, data.dims, **cfg.model_cfg)  # the model's own checks, before training
    results = run_experiment(cfg, data=data)
    if cfg.out and dist.is_main:
        print(f"results: {os.path.join(cfg.out, 'results.json')}")
    return 0 if results["per_seed"] or cfg.stop_after_epoch else 1


def cmd_eval(args) -> int:
    if args.robustness:
        return cmd_eval_robustness(args)
    import torch

    from msa_fast.data.source import load_data
    from msa_fast.metrics import format_metrics
    from msa_fast.models import build_model
    from msa_fast.train.checkpoint import load_weights, read_state
    from msa_fast.train.config import TrainConfig
    from msa_fast.train.trainer import evaluate, resolve_device

    state_path = os.path.join(args.checkpoint, "state.json")
    if not os.path.isfile(state_path):
        raise UserError(f"no checkpoint in {args.checkpoint} (state.json not found)")
    state = read_state(args.checkpoint)
    weights = os.path.join(args.checkpoint,
                           "best.safetensors" if args.weights == "best" else state["weights"])
    if not os.path.isfile(weights):
        raise UserError(f"checkpoint weights not found: {weights}")
    cfg = TrainConfig.from_dict(state["config"])
    cfg.data = args.data or state["data"]
    for key in ("batch_size", "drop_rate", "device"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.missing_rate:
        cfg.missing_rate = args.missing_rate[0] if len(args.missing_rate) == 1 else args.missing_rate
    cfg.validate()
    data = load_data(cfg.data, limit=cfg.limit if not args.data else None)
    if data.dims != state["dims"]:
        raise UserError(f"data widths {data.dims} differ from the checkpoint's {state['dims']}")
    device = resolve_device(cfg.device)
    model = build_model(state["model"], state["dims"], **state["model_cfg"]).to(device)
    load_weights(weights, model)  # a CheckpointError names the file
    with torch.no_grad():
        m = evaluate(model, data, args.split, cfg, device, state["seed"])
    print(f"{state['model']} on {cfg.data} [{args.split}]: {format_metrics(m)}")
    print(json.dumps(m))
    return 0


def cmd_eval_robustness(args) -> int:
    from msa_fast import robustness as R
    from msa_fast.train.trainer import resolve_device

    if args.missing_rate or args.drop_rate is not None:
        raise UserError("--robustness: --missing-rate / --drop-rate do not combine with a sweep")
    out = args.out or os.path.join(args.checkpoint, "robustness.json")
    png = args.plot or os.path.splitext(out)[0] + ".png"
    inputs = [*_data_inputs(args.checkpoint, args.data),
              args.reference if args.reference and os.path.isfile(args.reference) else None]
    # an existing sweep file is merged into (by protocol), never replaced wholesale
    check_output("--out", out, inputs, exists_ok=True)
    check_output("--plot", png, inputs, exists_ok=True)
    previous = _previous_sweep(out, args.checkpoint, args.overwrite)
    model, state, data, cfg = R.load_run(args.checkpoint, args.data, args.weights, args.device,
                                         args.batch_size)
    protocols = R.PROTOCOLS if args.robustness == "all" else (args.robustness,)
    seeds = args.seeds or [state["seed"]]
    device = resolve_device(args.device)
    kw = dict(split=args.split, protocols=protocols, seeds=seeds, batch_size=cfg.batch_size,
              device=device, amp=cfg.amp)
    result = {"checkpoint": os.path.abspath(args.checkpoint), "model": state["model"],
              "model_cfg": state["model_cfg"], "data": cfg.data, "weights": args.weights,
              **R.run_robustness(model, data, **kw)}
    if args.reference and "noise" in protocols:
        if args.reference.endswith(".json") and os.path.isfile(args.reference):
            with open(args.reference) as f:
                ref = json.load(f)
        else:
            rmodel, rstate, _, _ = R.load_run(args.reference, data, "best", args.device, args.batch_size)
            ref = {"checkpoint": os.path.abspath(args.reference), "model": rstate["model"],
                   **R.run_robustness(rmodel, data, **dict(kw, protocols=("noise",)))}
        R.add_effective_robustness(result, ref)
        result["reference"] = {k: ref[k] for k in ("checkpoint", "model", "noise") if k in ref}
    kept = [p for p in R.PROTOCOLS if p in previous and p not in result]
    result = {**{p: previous[p] for p in kept}, **result}
    if kept:
        result["merged_from_earlier_sweeps"] = kept
    R.save_json(out, result)
    R.plot(result, png)
    name = f"{state['model']} on {cfg.data} [{args.split}], seeds {seeds}"
    if "missing" in result:
        print(f"{name}: LNLN mean over rates {R._fmt(result['missing']['mean_over_rates'], R.AUC_METRIC)} "
              f"{R.AUC_METRIC}")
    if "drop" in result:
        print(f"{name}: MPLMM mean over patterns "
              f"{R._fmt(result['drop']['mean_over_patterns'], R.AUC_METRIC)} {R.AUC_METRIC}")
    if "noise" in result:
        for t, r in result["noise"]["targets"].items():
            er = r.get("effective_robustness", {}).get(R.AUC_METRIC)
            print(f"{name}: noise on {t}: AUC {R._fmt(r['relative_robustness'][R.AUC_METRIC])}"
                  + (f", effective robustness {R._fmt(er)}" if er else ""))
    print(f"wrote {out} and {png} ({result['params']['wall_s']} s)")
    return 0


def _previous_sweep(out: str, checkpoint: str, overwrite: bool) -> dict:
    """The sweeps already in ``out`` to merge with (another protocol run before, e.g. ``drop``
    then ``missing``); ``{}`` when there is none or ``--overwrite``. A JSON of another
    checkpoint, or not a sweep, is refused rather than mixed in."""
    if overwrite or not os.path.exists(out):
        return {}
    try:
        with open(out) as f:
            prev = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--out: {out} exists and is not a robustness JSON ({type(e).__name__}); "
                        "pass --overwrite to replace it") from None
    if not isinstance(prev, dict) or "checkpoint" not in prev:
        raise UserError(f"--out: {out} exists and is not a robustness JSON; pass --overwrite to replace it")
    if os.path.abspath(prev["checkpoint"]) != os.path.abspath(checkpoint):
        raise UserError(f"--out: {out} holds the sweeps of another checkpoint ({prev['checkpoint']}); "
                        "pass --overwrite to replace it")
    return prev


def cmd_analyze(args) -> int:
    from msa_fast import analysis

    if _is_run_file(os.path.join(args.out, "state.json")):
        raise UserError(f"--out: {args.out} is a run directory; write the analysis elsewhere")
    for ext in (".json", ".png"):  # analysis.analyze writes OUT/<what>.json and .png
        check_output("--out", os.path.join(args.out, args.what + ext), _data_inputs(args.checkpoint, args.data),
                     overwrite=args.overwrite)
    paths = analysis.analyze(args.checkpoint, args.what, args.out, data=args.data, split=args.split,
                             device=args.device, batch_size=args.batch_size, limit=args.limit)
    print("wrote " + " and ".join(paths))
    return 0


# the files that make a run directory (msa_fast.train.checkpoint / run_dir): never an output
_RUN_FILES = ("state.json", "run.json", "results.json", "best.safetensors", ".lock")


def _is_run_file(path: str) -> bool:
    name = os.path.basename(path)
    d = os.path.dirname(os.path.abspath(path))
    is_run_dir = any(os.path.exists(os.path.join(d, f)) for f in ("state.json", "run.json"))
    return is_run_dir and (name in _RUN_FILES or name.endswith((".safetensors", ".optim.pt"))
                           or name.startswith("epoch"))


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_output(flag: str, path: str, inputs=(), overwrite: bool = False, exists_ok: bool = False) -> None:
    """Refuse an output ``path`` that would destroy an input (issue 27): one of ``inputs``
    (the data pickle, a reference file), a file of a run directory (weights, ``state.json``,
    ``run.json``, ``results.json``), or -- unless ``overwrite`` / ``exists_ok`` -- an existing
    file. One-line :class:`UserError` naming the file."""
    for src in inputs:
        if src and os.path.exists(src) and os.path.exists(path) and _same_file(path, src):
            raise UserError(f"{flag}: {path} is an input of this command ({src}); choose another output path")
    if _is_run_file(path):
        raise UserError(f"{flag}: {path} is a file of the run directory {os.path.dirname(os.path.abspath(path))}; "
                        "writing it would break the run (choose another output path)")
    if os.path.isdir(path) and not exists_ok:
        raise UserError(f"{flag}: {path} is a directory, expected a file path")
    if os.path.exists(path) and not (overwrite or exists_ok):
        raise UserError(f"{flag}: {path} exists; pass --overwrite to replace it")


def _data_path(spec: str | None) -> str | None:
    """The file behind a data spec (``synthetic:...`` names none)."""
    return spec if spec and not spec.startswith("synthetic:") else None


def _data_inputs(checkpoint: str, data: str | None) -> list[str | None]:
    """The data file a command on ``checkpoint`` reads: ``--data``, else the run's own (from its
    ``state.json``; a missing or unreadable one is left to the command's load to report)."""
    if data is None:
        from msa_fast.train.checkpoint import read_state

        try:
            data = read_state(checkpoint)["data"]
        except (OSError, ValueError, KeyError):
            return []
    return [_data_path(data)]


def _compile_flag(value):
    return "auto" if value is None else bool(value)


def cmd_predict(args) -> int:
    import csv

    import torch

    from msa_fast.data.loader import make_loader
    from msa_fast.data.missing import MissingProtocol
    from msa_fast.data.source import load_data
    from msa_fast.inference import Predictor
    from msa_fast.metrics import format_metrics, mosi_regression_metrics
    from msa_fast.train.config import TrainConfig

    if args.out:  # before any work
        check_output("--out", args.out, _data_inputs(args.checkpoint, args.data), overwrite=args.overwrite)
    pred = Predictor.from_checkpoint(args.checkpoint, device=args.device, weights=args.weights,
                                     max_batch=args.max_batch, compile=_compile_flag(args.compile),
                                     runtime=args.runtime)
    state = pred.state
    cfg = TrainConfig.from_dict(state["config"])
    data = load_data(args.data or state["data"], limit=cfg.limit if not args.data else None)
    if data.dims != state["dims"]:
        raise UserError(f"data widths {data.dims} differ from the checkpoint's {state['dims']}")
    split = data[args.split]
    if len(split) == 0:
        raise UserError(f"--split: split {args.split!r} of {args.data or state['data']} is empty")
    # the loader and missing-modality protocol of `msa-fast eval`, so the metrics are its own
    loader = make_loader(split, cfg.batch_size, shuffle=False, seed=state["seed"],
                         aligned=data.aligned, protocol=MissingProtocol(cfg.missing_rate, cfg.drop_rate),
                         name=args.split)
    preds, labels, index = [], [], []
    for batch in loader:
        preds.append(pred.predict(batch))
        labels.append(batch["labels"].float())
        index.append(batch["index"])
    p, y, idx = torch.cat(preds), torch.cat(labels), torch.cat(index)
    if args.out:
        try:
            d = os.path.dirname(os.path.abspath(args.out))
            os.makedirs(d, exist_ok=True)
            with open(args.out, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "prediction", "label"])
                for i, pv, yv in zip(idx.tolist(), p.tolist(), y.tolist()):
                    w.writerow([split.ids[i] if split.ids else i, repr(pv), repr(yv)])
        except OSError as e:
            raise UserError(f"--out: cannot write {args.out} ({e.strerror or type(e).__name__})") from None
    m = mosi_regression_metrics(p, y)
    m["Loss"] = round(float((p - y).abs().mean()), 4)
    print(f"{state['model']} on {args.data or state['data']} [{args.split}]: {format_metrics(m)}")
    print(json.dumps(m))
    if args.out:
        print(f"predictions: {args.out} ({len(p)} rows)")
    return 0


def cmd_export(args) -> int:
    from msa_fast.data.source import load_data
    from msa_fast.inference import Predictor
    from msa_fast.inference import export as E
    from msa_fast.train.checkpoint import atomic_write_bytes
    from msa_fast.train.config import TrainConfig

    check_output("--out", args.out, _data_inputs(args.checkpoint, None), overwrite=args.overwrite)
    check_output("--out", args.out + ".json", overwrite=args.overwrite)
    if args.format == "aoti":
        check_output("--out", args.out + ".ops.py", overwrite=args.overwrite)
    pred = Predictor.from_checkpoint(args.checkpoint, device="cpu", weights=args.weights, runtime="eager")
    state = pred.state
    want = {"aligned": True, "unaligned": False}.get(args.layout)
    aligned, real = want, None
    try:  # the run's own test samples are the real inputs the export is checked on
        cfg = TrainConfig.from_dict(state["config"])
        data = load_data(state["data"], limit=cfg.limit)
        split = data["test"] if len(data["test"]) else data["train"]
        got = [pred.export_inputs(split, n) for n in (1, min(8, len(split)))]
        if aligned is None:
            aligned = got[0][0]
        real = [inputs for is_aligned, inputs in got if is_aligned == aligned] or None
    except (OSError, ValueError, KeyError) as e:
        if aligned is None:
            raise UserError(f"--layout: the run's data cannot be read ({str(e).splitlines()[0]}); pass "
                            "--layout aligned or unaligned") from None
        print(f"msa-fast: note: checked on random inputs only (the run's data: {str(e).splitlines()[0]})",
              file=sys.stderr)
    common = {"model_name": state["model"], "aligned": aligned, "length_buckets": pred.length_buckets, "real": real}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.format == "onnx":
        data_bytes, meta = E.export_onnx(pred.model, state["dims"], **common)
        atomic_write_bytes(args.out, data_bytes)
    else:
        meta = E.export_aoti(pred.model, state["dims"], args.out, **common)
        with open(E.LSTM_OP_SOURCE, "rb") as f:  # the one op the package calls by name
            atomic_write_bytes(args.out + ".ops.py", f.read())
    meta["msa_fast.checked_on"] = "random and the run's test samples" if real else "random inputs"
    atomic_write_bytes(args.out + ".json", (json.dumps(meta, indent=2) + "\n").encode())
    print(f"{state['model']} -> {args.out} ({args.format}, {'aligned' if aligned else 'unaligned'}, "
          f"inputs {meta['msa_fast.inputs']}; max |exported - eager| {meta['msa_fast.checked_max_abs_diff']})")
    return 0


def cmd_serve(args) -> int:
    if not os.path.isfile(os.path.join(args.checkpoint, "state.json")):
        raise UserError(f"no checkpoint in {args.checkpoint} (state.json not found)")
    missing = [m for m in ("uvicorn", "starlette", "prometheus_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"serve needs {', '.join(missing)}: pip install 'msa_fast[serve]'")
    from msa_fast.inference.server import serve

    return serve(args.checkpoint, host=args.host, port=args.port, max_batch=args.max_batch,
                 batch_timeout=args.batch_timeout, device=args.device,
                 compile=_compile_flag(args.compile), max_length=args.max_length, runtime=args.runtime,
                 name=args.name, workers=args.workers, max_body=args.max_body, warmup=args.warmup)


def cmd_data_synth(args) -> int:
    from msa_fast.data import synthetic, synthetic_pid

    if args.preset not in synthetic.PRESETS:
        raise UserError(f"unknown preset {args.preset!r} (choose from {sorted(synthetic.PRESETS)})")
    gen = synthetic_pid if getattr(args, "pid", False) else synthetic
    check_output("--out", args.out, overwrite=args.overwrite)
    try:
        gen.write(args.out, args.preset, args.seed, not args.unaligned, args.limit)
    except OSError as e:
        raise UserError(f"--out: cannot write {args.out} ({e.strerror or type(e).__name__})") from None
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return 0


def inspect_text(data) -> str:
    lines = [f"{data.source}: {'aligned' if data.aligned else 'unaligned'}, dims {data.dims}"]
    for name in SPLITS:
        s = data[name]
        shapes = {k: tuple(getattr(s, k).shape) for k in ("text", "text_bert", "audio", "vision")
                  if getattr(s, k) is not None}
        y = s.labels.numpy()
        hist, _ = np.histogram(np.clip(np.round(y), -3, 3), bins=7, range=(-3.5, 3.5))
        lines.append(f"{name}: N={len(s)}  " + "  ".join(f"{k} {v}" for k, v in shapes.items()))
        if len(s) == 0:
            lines.append("  empty split")
            continue
        lines.append(f"  lengths text {int(s.text_lengths.min())}-{int(s.text_lengths.max())}, "
                     f"audio {int(s.audio_lengths.min())}-{int(s.audio_lengths.max())}, "
                     f"vision {int(s.vision_lengths.min())}-{int(s.vision_lengths.max())}")
        lines.append(f"  labels mean {y.mean():+.3f} std {y.std():.3f} zeros {int((y == 0).sum())}; "
                     f"histogram of round(y) -3..3: {hist.tolist()}")
        bad = {m: c for m, c in data.report[name].items() if sum(c.values())}
        lines.append("  non-finite (set to 0): " + (", ".join(
            f"{m} " + "/".join(f"{v} {k}" for k, v in c.items() if v) for m, c in bad.items())
            or "none"))
        if "corrupted" in s.extra:
            frac = s.extra["corrupted"].float().mean(0).tolist()
            lines.append("  corrupted fraction text/audio/vision: "
                         + " / ".join(f"{f:.3f}" for f in frac))
    if data.meta.get("kind") == "pid":  # v1's summary stays as it was
        sh = data.meta.get("shares", {})
        lines.insert(1, "pid shares of var(h): " + ", ".join(f"{k} {v:.2f}" for k, v in sh.items())
                     + f"; corruption rate {data.meta.get('corrupt_rate')}")
    return "\n".join(lines)


def cmd_data_inspect(args) -> int:
    from msa_fast.data.source import load_data

    print(inspect_text(load_data(args.path)))
    return 0


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a flag error already printed in one line
        return e.code if isinstance(e.code, int) else 2
    from msa_fast.models import UnknownModelError
    from msa_fast.train.trainer import NonFiniteLossError

    try:
        if args.cmd == "train":
            return cmd_train(args)
        if args.cmd == "eval":
            return cmd_eval(args)
        if args.cmd == "analyze":
            return cmd_analyze(args)
        if args.cmd == "predict":
            return cmd_predict(args)
        if args.cmd == "serve":
            return cmd_serve(args)
        if args.cmd == "export":
            return cmd_export(args)
        if args.data_cmd == "synth":
            return cmd_data_synth(args)
        return cmd_data_inspect(args)
    except KeyboardInterrupt:
        print("msa-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        if args.traceback or os.environ.get("MSA_FAST_DEBUG") == "1":
            raise
        if isinstance(e, NonFiniteLossError):
            print(f"msa-fast: error: {e}", file=sys.stderr)
            return 3
        if _is_user_error(e, (UserError, SchemaError, UnknownModelError)):
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if isinstance(e, OSError) and e.filename and e.strerror:
                msg = f"{e.filename}: {e.strerror}"
            print(f"msa-fast: error: {msg}", file=sys.stderr)
            return 2
        # a bug or a resource failure (out of memory, a library's internal error): never
        # dressed as a user error
        import traceback

        traceback.print_exc()
        print(f"msa-fast: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(the traceback above; please report it)", file=sys.stderr)
        return 1


def _is_user_error(e: BaseException, ours: tuple) -> bool:
    """Bad input or a bad environment, said in one line: our own error types, every
    ``ValueError`` (the project's convention for bad input: it names the argument) and
    ``OSError`` (a missing or unwritable file), and a ``RuntimeError`` that a ``raise`` of
    msa_fast itself threw (a backend or device that is not available); a ``RuntimeError``
    from inside torch or another library is not, even when its innermost Python frame is ours
    (a C++ error surfaces at the line that called the op): that is a bug or out of memory."""
    import linecache

    if isinstance(e, (*ours, ValueError, OSError)):
        return True
    if isinstance(e, RuntimeError):
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None:
            return False
        module = tb.tb_frame.f_globals.get("__name__", "")
        line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
        return (module == "msa_fast" or module.startswith("msa_fast.")) and line.startswith("raise")
    return False


if __name__ == "__main__":
    sys.exit(main())
