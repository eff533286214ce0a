"""ProMMA vs its own backbone as the MPLMM modality-drop rate rises (issue 4, paper 002).

For each drop rate (default 0, 0.1, 0.3, 0.5, 0.7) trains and evaluates, at that rate
(``TrainConfig.drop_rate`` applies to train, valid and test batches), two models through
``msa_fast.train.run_experiment``:

- ``promma``: the default ProMMA (prompts, evaluator, disentanglement, dynamic weighting,
  multi-level connection);
- ``backbone``: the same network with ``prompts=False`` (no prompts and none of the four
  modules; dropped modalities are seen as the zeroed features the protocol leaves).

    python experiments/fidelity_promma_drop.py                 # synthetic:mosi, 1 seed
    python experiments/fidelity_promma_drop.py --seeds 1111 1112 1113
    python experiments/fidelity_promma_drop.py --quick         # CI smoke: tiny data, 1 epoch, 2 rates

Reading the result on synthetic data: the generator draws the three latent contents
``z_t, z_a, z_v`` independently (``msa_fast/data/synthetic.py``), so a dropped modality
carries information that no present modality holds; imputation has nothing to recover
there, and the backbone can also tell a dropped modality by its zeroed features. A gain
from the prompts is therefore not expected on this data; real MOSI/MOSEI, whose
modalities are correlated, is the test that matters.

Writes ``benchmarks/results/promma_drop.json`` (per rate and model: mean / std / per-seed
test metrics, wall time; the environment) and ``promma_drop.png`` (test MAE and
Non0_acc_2 against the drop rate, one line per model, error bars = std over seeds when
there are several). ``--quick`` writes under ``benchmarks/results/quick/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

import torch

from benchmarks._common import RESULTS, environment
from msa_fast._io import figure, save_json
from msa_fast.train import TrainConfig, run_experiment

VARIANTS = {"promma": {}, "backbone": {"prompts": False}}
SHOWN = ("MAE", "Non0_acc_2")


def _plot(payload: dict, path: str) -> None:
    rates = payload["rates"]
    with figure(path, 1, 2, figsize=(10, 3.6), dpi=120) as (fig, axes):
        for ax, key, better in zip(axes, SHOWN, ("lower", "higher")):
            for name, style in (("promma", "o-"), ("backbone", "s--")):
                rows = [payload["results"][str(r)][name] for r in rates]
                ax.errorbar(rates, [r["mean"][key] for r in rows], yerr=[r["std"][key] for r in rows],
                            fmt=style, capsize=3, label="ProMMA" if name == "promma" else "backbone (prompts off)")
            ax.set_xlabel("MPLMM drop rate (train = valid = test)")
            ax.set_title(f"test {key} ({better} is better)")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{payload['data']}, {len(payload['seeds'])} seed(s)", fontsize=9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="synthetic:mosi")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5, 0.7])
    p.add_argument("--seeds", type=int, nargs="+", default=[1111])
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: TrainConfig's)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, 2 rates, 1 seed (smoke)")
    p.add_argument("--out", default=RESULTS, help="directory of the JSON / PNG outputs")
    args = p.parse_args(argv)
    extra = {}
    if args.quick:
        args.data, args.rates, args.seeds = "synthetic:tiny:limit=48", [0.0, 0.5], [1]
        extra = {"epochs": 1, "batch_size": 16}
        if args.out == RESULTS:
            args.out = os.path.join(RESULTS, "quick")
    if args.epochs is not None:
        extra["epochs"] = args.epochs
    os.makedirs(args.out, exist_ok=True)

    import msa_fast

    msa_fast.set_backend(args.backend)
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    for rate in args.rates:
        results[str(rate)] = {}
        for name, model_cfg in VARIANTS.items():
            t0 = time.perf_counter()
            cfg = TrainConfig(model="promma", data=args.data, seeds=args.seeds, drop_rate=rate,
                              model_cfg=model_cfg, progress=False, backend=args.backend, **extra)
            res = run_experiment(cfg, log=lambda s: None)
            results[str(rate)][name] = {
                "mean": res["mean"], "std": res["std"], "wall_s": round(time.perf_counter() - t0, 1),
                "per_seed": [{"seed": r["seed"], "test": r["test"], "best_epoch": r["best_epoch"],
                              "epochs_run": r["epochs_run"]} for r in res["per_seed"]]}
            m = res["mean"]
            print(f"drop_rate {rate:.2f} {name:<8} MAE {m['MAE']:.4f}  Non0_acc_2 {m['Non0_acc_2']:.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    payload = {"data": args.data, "rates": args.rates, "seeds": args.seeds, "backend": args.backend,
               "train_config": {k: v for k, v in TrainConfig(**extra).to_dict().items()
                                if k in ("epochs", "patience", "batch_size", "lr", "weight_decay")},
               "variants": VARIANTS, "command": "python experiments/fidelity_promma_drop.py "
               + " ".join(sys.argv[1:] if argv is None else argv),
               "wall_s": round(time.perf_counter() - t_all, 1),
               "environment": environment(torch.device("cpu")), "results": results}
    stem = os.path.join(args.out, "promma_drop")
    save_json(stem + ".json", payload)
    _plot(payload, stem + ".png")
    wins = [r for r in args.rates if results[str(r)]["promma"]["mean"]["MAE"] < results[str(r)]["backbone"]["mean"]["MAE"]]
    print(f"ProMMA has the lower test MAE at {len(wins)} of {len(args.rates)} drop rates: {wins}")
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
