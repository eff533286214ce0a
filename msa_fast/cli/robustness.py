"""The robustness commands of ``msa-fast`` (contract §11, :mod:`msa_fast.robustness`):

- ``msa-fast eval --checkpoint DIR --robustness missing|drop|noise|all [--seeds ...] [--out
  FILE.json] [--plot FILE.png] [--reference RUN_DIR]``: the sweeps (:func:`run_sweep`);
- ``msa-fast robustness table A.json B.json ...``: one markdown table of several sweep JSONs
  (:func:`msa_fast.robustness.markdown_table`).
"""

from __future__ import annotations

import json
import os

from msa_fast.cli._common import Parser, UserError, check_output, data_inputs, run_dir_of
from msa_fast.metrics import format_mean_std


def add_parser(sub) -> None:
    r = sub.add_parser("robustness", help="robustness JSON helpers (the sweeps: eval --robustness)")
    rsub = r.add_subparsers(dest="robustness_cmd", required=True, parser_class=Parser)
    t = rsub.add_parser("table", help="one markdown table from several robustness JSONs")
    t.add_argument("paths", nargs="+", help="robustness JSONs (msa-fast eval --robustness --out)")
    t.set_defaults(func=run_table)


def run_table(args) -> int:
    from msa_fast.robustness import markdown_table

    try:
        print(markdown_table(args.paths))
    except KeyError as e:  # a JSON that is no sweep; OSError / ValueError are one line already
        raise UserError(f"not a robustness JSON (no {e})") from None
    return 0


def run_sweep(args) -> int:
    """``msa-fast eval --robustness ...``."""
    from msa_fast import robustness as R
    from msa_fast.train.trainer import resolve_device

    if args.missing_rate or args.drop_rate is not None:
        raise UserError("--robustness: --missing-rate / --drop-rate do not combine with a sweep")
    out = args.out or os.path.join(run_dir_of(args.checkpoint), "robustness.json")
    png = args.plot or os.path.splitext(out)[0] + ".png"
    inputs = [*data_inputs(args.checkpoint, args.data),
              args.reference if args.reference and os.path.isfile(args.reference) else None]
    # an existing sweep file is merged into (by protocol), never replaced wholesale
    check_output("--out", out, inputs, exists_ok=True)
    check_output("--plot", png, inputs, exists_ok=True)
    previous = _previous_sweep(out, run_dir_of(args.checkpoint), args.overwrite)
    model, state, data, cfg = R.load_run(args.checkpoint, args.data, args.weights, args.device,
                                         args.batch_size)
    protocols = R.PROTOCOLS if args.robustness == "all" else (args.robustness,)
    seeds = args.seeds or [state["seed"]]
    device = resolve_device(args.device)
    kw = dict(split=args.split, protocols=protocols, seeds=seeds, batch_size=cfg.batch_size,
              device=device, amp=cfg.amp)
    result = {"checkpoint": os.path.abspath(run_dir_of(args.checkpoint)), "model": state["model"],
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
    _print_summary(result, f"{state['model']} on {cfg.data} [{args.split}], seeds {seeds}", R.AUC_METRIC)
    print(f"wrote {out} and {png} ({result['params']['wall_s']} s)")
    return 0


def _print_summary(result: dict, name: str, metric: str) -> None:
    if "missing" in result:
        print(f"{name}: LNLN mean over rates {format_mean_std(result['missing']['mean_over_rates'], metric)} "
              f"{metric}")
    if "drop" in result:
        print(f"{name}: MPLMM mean over patterns "
              f"{format_mean_std(result['drop']['mean_over_patterns'], metric)} {metric}")
    if "noise" in result:
        for t, r in result["noise"]["targets"].items():
            er = r.get("effective_robustness", {}).get(metric)
            print(f"{name}: noise on {t}: AUC {format_mean_std(r['relative_robustness'][metric])}"
                  + (f", effective robustness {format_mean_std(er)}" if er else ""))


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
