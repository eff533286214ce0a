"""FD-CMDIE ablations (paper Table 7) on synthetic data: the full model and w/o CL, CMDIE, GAP,
CrossAtt-2, each trained like ``msa-fast train --model fd_cmdie`` (default TrainConfig: max 20
epochs, MMSA early stopping, batch 32) over seeds.

    python experiments/fidelity_fd_cmdie_ablations.py                 # synthetic:mosi, 3 seeds
    python experiments/fidelity_fd_cmdie_ablations.py --seeds 1111    # one seed
    python experiments/fidelity_fd_cmdie_ablations.py --quick         # CI smoke: tiny data, 1 epoch

Writes ``benchmarks/results/fd_cmdie_ablations.json`` (per-variant mean / std / per-seed test
metrics, CPU seconds and wall seconds, the environment and the exact command) and
``fd_cmdie_ablations.png`` (MAE and Non0_acc_2 per variant, error bars = std over seeds).
"w/o NeoBERT" of Table 7 is not run: synthetic data has no text to re-encode.
The synthetic data tests whether each part helps on a planted signal; it says nothing about
the paper's MOSI / MOSEI numbers.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

import torch

from benchmarks._common import RESULTS, environment
from msa_fast._io import figure, save_json
from msa_fast.train import TrainConfig, run_experiment

VARIANTS = {
    "FD-CMDIE": {},
    "w/o CL": {"no_cl": True},
    "w/o CMDIE": {"no_cmdie": True},
    "w/o GAP": {"no_gap": True},
    "w/o CrossAtt-2": {"no_crossatt2": True},
}
SHOWN = ("MAE", "Corr", "Non0_acc_2", "Non0_F1_score", "Has0_acc_2", "Mult_acc_7")


def _plot(rows: dict, path: str, title: str) -> None:
    names = list(rows)
    with figure(path, 1, 2, figsize=(10, 3.8), dpi=120) as (fig, axes):
        for ax, key, better in zip(axes, ("MAE", "Non0_acc_2"), ("lower", "higher")):
            vals = [rows[n]["mean"][key] for n in names]
            ax.bar(names, vals, yerr=[rows[n]["std"][key] for n in names], capsize=4,
                   color=["#3b75af" if n == "FD-CMDIE" else "#999999" for n in names])
            lo, hi = min(vals), max(vals)
            pad = max(0.02, (hi - lo) * 0.6)
            ax.set_ylim(max(0.0, lo - pad), hi + pad)
            ax.set_title(f"{key} ({better} is better)")
            ax.tick_params(axis="x", rotation=20)
        fig.suptitle(title, fontsize=9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="synthetic:mosi")
    p.add_argument("--seeds", type=int, nargs="+", default=[1111, 1112, 1113])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: TrainConfig's)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--model-cfg", default="{}", help="JSON model config shared by every variant")
    p.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, 1 seed (smoke)")
    p.add_argument("--out", default=RESULTS, help="directory of the JSON / PNG outputs")
    args = p.parse_args(argv)
    extra = {} if args.epochs is None else {"epochs": args.epochs}
    base_cfg = json.loads(args.model_cfg)
    if args.quick:
        args.data, args.seeds = "synthetic:tiny:limit=48", [1]
        extra = {"epochs": 1, "batch_size": 16}
        base_cfg = dict({"d": 8, "hidden": 8, "k_cl": 3}, **base_cfg)
        if args.out == RESULTS:
            args.out = os.path.join(RESULTS, "quick")
    os.makedirs(args.out, exist_ok=True)

    import msa_fast

    msa_fast.set_backend(args.backend)
    rows: dict[str, dict] = {}
    for name in args.variants:
        t0, c0 = time.perf_counter(), time.process_time()
        cfg = TrainConfig(model="fd_cmdie", data=args.data, seeds=args.seeds, progress=False,
                          backend=args.backend, model_cfg=dict(base_cfg, **VARIANTS[name]), **extra)
        print(f"== {name}", flush=True)
        res = run_experiment(cfg, log=lambda s: print(s, flush=True))
        rows[name] = {"model_cfg": cfg.model_cfg, "mean": res["mean"], "std": res["std"],
                      "per_seed": [{"seed": r["seed"], "test": r["test"], "best_epoch": r["best_epoch"],
                                    "epochs_run": r["epochs_run"]} for r in res["per_seed"]],
                      "wall_s": round(time.perf_counter() - t0, 1),
                      "cpu_s": round(time.process_time() - c0, 1)}
        print(f"{name}: wall {rows[name]['wall_s']:.0f} s, cpu {rows[name]['cpu_s']:.0f} s", flush=True)

    command = "python experiments/fidelity_fd_cmdie_ablations.py " + " ".join(argv if argv is not None
                                                                             else sys.argv[1:])
    from msa_fast.models.fd_cmdie import FDCMDIE

    defaults = {k: v.default for k, v in inspect.signature(FDCMDIE.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}
    payload = {"data": args.data, "model_defaults": defaults, "seeds": args.seeds, "backend": args.backend, "command": command.strip(),
               "train_config": {k: v for k, v in TrainConfig(**extra).to_dict().items()
                                if k in ("epochs", "patience", "batch_size", "lr", "weight_decay", "threads")},
               "environment": environment(torch.device("cpu")), "variants": rows}
    stem = os.path.join(args.out, "fd_cmdie_ablations")
    save_json(stem + ".json", payload)
    _plot(rows, stem + ".png", f"FD-CMDIE ablations, test split of {args.data}, seeds {args.seeds}")
    print(f"| variant | {' | '.join(SHOWN)} |")
    for name, r in rows.items():
        cells = [f"{r['mean'][k]:.4f} ± {r['std'][k]:.4f}" for k in SHOWN]
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
