"""``msa-fast eval --checkpoint DIR/seed_1111 [--data ...] [--split test]``: evaluates the
best (or ``--weights last``) weights of a run directory, read by the one run loader
(:func:`msa_fast.train.checkpoint.load_run`); with ``--robustness missing|drop|noise|all`` the
sweeps of :mod:`msa_fast.robustness` (:mod:`msa_fast.cli.robustness`)."""

from __future__ import annotations

from msa_fast.cli._common import add_run_inputs, print_metrics


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a run directory's best weights on a split")
    add_run_inputs(e, "evaluate on")
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
    e.set_defaults(func=run)


def run(args) -> int:
    if args.robustness:
        from msa_fast.cli.robustness import run_sweep

        return run_sweep(args)
    import torch

    from msa_fast.train.checkpoint import load_run
    from msa_fast.train.trainer import evaluate

    r = load_run(args.checkpoint, args.weights, args.device)  # one-line errors naming the path
    cfg = r.config
    cfg.data = args.data or r.data_spec
    for key in ("batch_size", "drop_rate", "device"):
        if getattr(args, key, None) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.missing_rate:
        cfg.missing_rate = args.missing_rate[0] if len(args.missing_rate) == 1 else args.missing_rate
    cfg.validate()
    data = r.load_data(args.data)
    with torch.no_grad():
        m = evaluate(r.model, data, args.split, cfg, r.device, r.seed)
    print_metrics(r.model_name, cfg.data, args.split, m)
    return 0
