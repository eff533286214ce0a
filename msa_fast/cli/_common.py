"""What the subcommands of ``msa-fast`` share: :class:`UserError`, the one-line argparse
parser, argument types, the merge of a config file, a preset and the flags into a
:class:`~msa_fast.train.config.TrainConfig`, the output-path checks, the metrics printer and
the CSV writer. Robustness summaries are formatted by :func:`msa_fast.metrics.format_mean_std`
(the one formatter, shared with :func:`msa_fast.robustness.markdown_table`)."""

from __future__ import annotations

import argparse
import csv
import json
import os

FLAG_KEYS = ("model", "data", "limit", "seeds", "epochs", "patience", "batch_size", "lr",
             "weight_decay", "grad_clip", "device", "backend", "out", "resume", "missing_rate",
             "drop_rate", "num_workers", "threads", "stop_after_epoch", "overwrite", "allow_data_change")


class UserError(Exception):
    """A problem with the user's input; reported in one line."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors in the one-line form of every other error (``--help`` and
    ``msa-fast train -h`` still print the usage)."""

    def error(self, message):
        self.exit(2, f"msa-fast: error: {self.prog}: {message} (see {self.prog} --help)\n")


def number(kind, lo: float, lo_name: str, hi: float | None = None):
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


POSITIVE = number(int, 1, ">= 1")
SECONDS = number(float, 0.0, ">= 0 (seconds, finite)")
PORT = number(int, 1, "in [1, 65535]", 65535)


def add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="run directory (out/seed_<seed>), its state.json or a weights file")


def add_run_inputs(p: argparse.ArgumentParser, verb: str, batch_size: bool = True) -> None:
    """``--checkpoint``, ``--data``, ``--split``, ``--device`` (and ``--batch-size``): what a
    subcommand that reads a trained run and a split of data takes."""
    from msa_fast.data.schema import SPLITS

    add_checkpoint(p)
    p.add_argument("--data", help=f"data to {verb} (default: the training data)")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--device", default="auto")
    if batch_size:
        p.add_argument("--batch-size", type=POSITIVE)


def run_dir_of(checkpoint: str) -> str:
    """The seed directory of a ``--checkpoint`` given as a file of it (its ``state.json`` or a
    weights file); a directory, or a path that does not exist, as it is (the loader reports
    what is wrong with it)."""
    return os.path.dirname(os.path.abspath(checkpoint)) if os.path.isfile(checkpoint) else checkpoint


def compile_flag(value):
    return "auto" if value is None else bool(value)


# -- configuration ----------------------------------------------------------------------------


def config_from_args(args):
    """The :class:`~msa_fast.train.config.TrainConfig` of ``msa-fast train``: the model's
    ``--preset``, then the ``--config`` file, then the flags (each wins over the one before)."""
    from msa_fast.train.config import TrainConfig, read_config_file

    d = read_config_file(args.config) if args.config else {}
    preset = getattr(args, "preset", None)
    if preset:
        d = apply_preset(d, args.model or d.get("model") or TrainConfig.model, preset)
    for key in FLAG_KEYS:
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


def apply_preset(d: dict, model: str, preset: str) -> dict:
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


# -- outputs ----------------------------------------------------------------------------------

# the files that make a run directory (msa_fast.train.checkpoint / run_dir): never an output
RUN_FILES = ("state.json", "run.json", "results.json", "best.safetensors", ".lock")


def is_run_file(path: str) -> bool:
    name = os.path.basename(path)
    d = os.path.dirname(os.path.abspath(path))
    is_run_dir = any(os.path.exists(os.path.join(d, f)) for f in RUN_FILES[:2])
    return is_run_dir and (name in RUN_FILES or name.endswith((".safetensors", ".optim.pt"))
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
    if is_run_file(path):
        raise UserError(f"{flag}: {path} is a file of the run directory {os.path.dirname(os.path.abspath(path))}; "
                        "writing it would break the run (choose another output path)")
    if os.path.isdir(path) and not exists_ok:
        raise UserError(f"{flag}: {path} is a directory, expected a file path")
    if os.path.exists(path) and not (overwrite or exists_ok):
        raise UserError(f"{flag}: {path} exists; pass --overwrite to replace it")


def data_path(spec: str | None) -> str | None:
    """The file behind a data spec (``synthetic:...`` names none)."""
    return spec if spec and not spec.startswith("synthetic:") else None


def data_inputs(checkpoint: str, data: str | None) -> list[str | None]:
    """The data file a command on ``checkpoint`` reads: ``--data``, else the run's own (from its
    ``state.json``; a missing or unreadable one is left to the command's load to report)."""
    if data is None:
        from msa_fast.train.checkpoint import read_run_state

        try:
            data = read_run_state(checkpoint)["data"]
        except (OSError, ValueError, KeyError):
            return []
    return [data_path(data)]


def print_metrics(model: str, data: str, split: str, metrics: dict) -> None:
    """The two lines of ``eval`` and ``predict``: ``<model> on <data> [<split>]: <metrics>``
    (MMSA's order) and the metrics as JSON."""
    from msa_fast.metrics import format_metrics

    print(f"{model} on {data} [{split}]: {format_metrics(metrics)}")
    print(json.dumps(metrics))


def write_csv(flag: str, path: str, header, rows) -> None:
    """Write ``rows`` under ``header`` to the CSV file ``path`` (its directory made); an
    unwritable path is a one-line :class:`UserError` naming ``flag``."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    except OSError as e:
        raise UserError(f"{flag}: cannot write {path} ({e.strerror or type(e).__name__})") from None
