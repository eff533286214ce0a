"""``msa-fast train --model lf_dnn --data synthetic:mosi [--seeds 1111 1112] [--out DIR]``:
trains, prints MMSA's test metrics (mean ± std over seeds) and writes ``DIR/results.json``;
``torchrun --nproc_per_node=N -m msa_fast train ...`` trains data-parallel
(:mod:`msa_fast.train.distributed`; ``--batch-size`` is the global batch)."""

from __future__ import annotations

import argparse
import os

from msa_fast.cli._common import UserError, config_from_args


def add_parser(sub) -> None:
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
    t.set_defaults(func=run)


def run(args) -> int:
    from msa_fast.train import distributed

    cfg = config_from_args(args)
    dist = distributed.init(cfg.device)  # torchrun: join the group (one process: nothing)
    try:
        return _train(cfg, dist)
    finally:
        distributed.shutdown()


def _train(cfg, dist) -> int:
    from msa_fast.data.source import load_data
    from msa_fast.models import _lookup, build_model, check_model_cfg
    from msa_fast.train.experiment import run_experiment
    from msa_fast.train.trainer import check_splits

    _lookup(cfg.model)  # an unknown model: UnknownModelError, before any data is read
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
