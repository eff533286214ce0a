"""``msa-fast predict --checkpoint DIR [--data ...] [--split test] [--out FILE.csv]``: the
predictions of a run's model on a split (CSV: id, prediction, label) through the
:class:`~msa_fast.inference.Predictor`, and the metrics ``eval`` prints."""

from __future__ import annotations

import argparse

from msa_fast.cli._common import (
    POSITIVE,
    UserError,
    add_run_inputs,
    check_output,
    compile_flag,
    data_inputs,
    print_metrics,
    write_csv,
)


def add_parser(sub) -> None:
    from msa_fast.inference.runtimes import RUNTIMES

    pr = sub.add_parser("predict", help="predict a split with a run directory's weights (CSV)")
    add_run_inputs(pr, "predict", batch_size=False)
    pr.add_argument("--out", help="CSV file: id, prediction, label")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    pr.add_argument("--weights", choices=("best", "last"), default="best")
    pr.add_argument("--max-batch", type=POSITIVE, default=64, help="largest batch bucket")
    pr.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile on the CPU (default: the per-model table)")
    pr.add_argument("--runtime", choices=RUNTIMES, default="auto",
                    help="how the model runs (default: the fastest measured for the model and batch)")
    pr.set_defaults(func=run)


def run(args) -> int:
    import torch

    from msa_fast.data.loader import make_loader
    from msa_fast.data.missing import MissingProtocol
    from msa_fast.inference import Predictor
    from msa_fast.metrics import mosi_regression_metrics

    if args.out:  # before any work
        check_output("--out", args.out, data_inputs(args.checkpoint, args.data), overwrite=args.overwrite)
    pred = Predictor.from_checkpoint(args.checkpoint, device=args.device, weights=args.weights,
                                     max_batch=args.max_batch, compile=compile_flag(args.compile),
                                     runtime=args.runtime)
    run, cfg = pred.run, pred.run.config
    data = run.load_data(args.data)
    split = data[args.split]
    where = args.data or run.data_spec
    if len(split) == 0:
        raise UserError(f"--split: split {args.split!r} of {where} is empty")
    # the loader and missing-modality protocol of `msa-fast eval`, so the metrics are its own
    loader = make_loader(split, cfg.batch_size, shuffle=False, seed=run.seed,
                         aligned=data.aligned, protocol=MissingProtocol(cfg.missing_rate, cfg.drop_rate),
                         name=args.split)
    preds, labels, index = [], [], []
    for batch in loader:
        preds.append(pred.predict(batch))
        labels.append(batch["labels"].float())
        index.append(batch["index"])
    p, y, idx = torch.cat(preds), torch.cat(labels), torch.cat(index)
    if args.out:
        write_csv("--out", args.out, ["id", "prediction", "label"],
                  ([split.ids[i] if split.ids else i, repr(pv), repr(yv)]
                   for i, pv, yv in zip(idx.tolist(), p.tolist(), y.tolist())))
    m = mosi_regression_metrics(p, y)
    m["Loss"] = round(float((p - y).abs().mean()), 4)
    print_metrics(run.model_name, where, args.split, m)
    if args.out:
        print(f"predictions: {args.out} ({len(p)} rows)")
    return 0
