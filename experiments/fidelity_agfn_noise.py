"""AGFN noise robustness (issue 4): does the entropy gate turn away from a noised modality?

Trains AGFN (default configuration, the trainer of ``msa-fast train``) on ``synthetic:mosi``,
then evaluates the best epoch on the test split with Gaussian noise added to ONE modality at
a time: ``x_m <- x_m + k * std_m * N(0, I)`` on valid (non-padding) positions, ``std_m`` the
per-channel standard deviation of modality m over the valid positions of the test split,
``k`` in ``--levels`` (default 0, 0.5, 1, 2, 4). For each (noised modality, k) it records
the mean entropy-gate weights ``e_t, e_a, e_v``, importance gates ``g_t, g_a, g_v`` and
normalised entropies ``H_t, H_a, H_v`` (``DualGateFusion.last_weights = (e, g, H)``), MAE and Corr, averaged over ``--seeds``. On the clean
test split it also records the Pearson correlation between each modality's ``e_m`` and the
generator's planted per-sample noise level ``r_m`` (``noise_level``; synthetic data only).
The noise is drawn from a fixed generator, the same for every seed.

    python experiments/fidelity_agfn_noise.py               # synthetic:mosi, 1 seed
    python experiments/fidelity_agfn_noise.py --seeds 1111 1112 1113
    python experiments/fidelity_agfn_noise.py --quick       # CI smoke: tiny data, 1 epoch
    python experiments/fidelity_agfn_noise.py --replot benchmarks/results/agfn_noise.json

Writes ``benchmarks/results/agfn_noise.json`` (environment, settings, per-seed and mean
rows) and ``agfn_noise.png`` (one panel per noised modality: e_t, e_a, e_v vs k, and MAE
on a second axis). ``--quick`` writes to ``benchmarks/results/quick/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

import numpy as np
import torch

from benchmarks._common import RESULTS, environment, write
from msa_fast._io import figure
from msa_fast.data import load_data, make_loader
from msa_fast.metrics import mosi_regression_metrics
from msa_fast.train import TrainConfig, train_seed

MODALITIES = ("text", "audio", "vision")
SHORT = ("t", "a", "v")


def channel_std(split, m: str) -> torch.Tensor:
    """Per-channel std of modality ``m`` over the valid positions of ``split``: ``(d_m,)``."""
    x = getattr(split, m)
    lengths = getattr(split, f"{m}_lengths")
    valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    return x[valid].std(dim=0)


@torch.no_grad()
def noisy_eval(model, split, m: str | None, level: float, std: torch.Tensor | None,
               batch_size: int, noise_seed: int) -> dict:
    """Mean gate weights and metrics on ``split`` with noise ``level * std`` on modality ``m``."""
    model.eval()
    gen = torch.Generator().manual_seed(noise_seed)
    preds, labels, es, gs, hs = [], [], [], [], []
    for batch in make_loader(split, batch_size, shuffle=False):
        if m is not None and level > 0:
            x = batch[m]
            noise = torch.randn(x.shape, generator=gen) * (level * std)
            batch = dict(batch, **{m: x + noise.masked_fill(batch[f"{m}_mask"][..., None], 0.0)})
        preds.append(model(batch)["pred"].float())
        labels.append(batch["labels"].float())
        e, g, ent = model.fusion.last_weights
        es.append(e.float())
        gs.append(g.float())
        hs.append(ent.float())
    p, y, e, g, ent = torch.cat(preds), torch.cat(labels), torch.cat(es), torch.cat(gs), torch.cat(hs)
    met = mosi_regression_metrics(p, y)
    return {"MAE": met["MAE"], "Corr": met["Corr"], "Non0_acc_2": met["Non0_acc_2"],
            **{f"e_{s}": float(e[:, i].mean()) for i, s in enumerate(SHORT)},
            **{f"g_{s}": float(g[:, i].mean()) for i, s in enumerate(SHORT)},
            **{f"H_{s}": float(ent[:, i].mean()) for i, s in enumerate(SHORT)},
            "_e": e}


def gate_noise_correlation(e: torch.Tensor, split) -> dict | None:
    r = split.extra.get("noise_level")
    if r is None:
        return None
    out = {}
    for i, s in enumerate(SHORT):
        out[f"corr_e_{s}_vs_r_{s}"] = round(float(np.corrcoef(e[:, i].numpy(), r[:, i].numpy())[0, 1]), 4)
    return out


def _plot(payload: dict, path: str) -> None:
    levels = payload["levels"]
    with figure(path, 1, 3, figsize=(13, 3.8), sharey=True, dpi=120) as (fig, axes):
        colors = {"t": "#3b75af", "a": "#ef8636", "v": "#519e3e"}
        for ax, m in zip(axes, MODALITIES):
            rows = [r for r in payload["mean"] if r["noised"] == m]
            for s in SHORT:
                lw = 2.6 if s == m[0] else 1.4
                ax.plot(levels, [r[f"e_{s}"] for r in rows], "o-", color=colors[s], lw=lw, label=f"e_{s}")
            ax.axhline(1 / 3, color="0.6", lw=0.8, ls=":")  # uniform weights
            ax.set_title(f"noise on {m}")
            ax.set_xlabel("noise std / feature std")
            ax.grid(alpha=0.3)
            ax2 = ax.twinx()
            ax2.plot(levels, [r["MAE"] for r in rows], "k--", lw=1, label="MAE")
            ax2.set_ylabel("test MAE", fontsize=8)
            if m == MODALITIES[0]:
                ax.set_ylabel("mean entropy-gate weight e")
                lines = ax.get_legend_handles_labels()
                lines2 = ax2.get_legend_handles_labels()
                ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")
        seeds = payload["seeds"]
        fig.suptitle(f"AGFN on {payload['data']} (test split), seeds {seeds}: entropy-gate weights "
                     "under Gaussian noise on one modality (y axis zoomed; dotted: 1/3)", fontsize=9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="synthetic:mosi")
    p.add_argument("--seeds", type=int, nargs="+", default=[1111])
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    p.add_argument("--model-cfg", default="{}", help="AGFN hyper-parameters as JSON")
    p.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, 1 seed (smoke)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/agfn_noise.json)")
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNG of an existing JSON")
    args = p.parse_args(argv)
    import json

    if args.replot:
        with open(args.replot) as fh:
            _plot(json.load(fh), os.path.splitext(args.replot)[0] + ".png")
        return 0

    extra = {}
    out = args.out or os.path.join(RESULTS, "agfn_noise.json")
    if args.quick:
        args.data, args.seeds = "synthetic:tiny:limit=48", args.seeds[:1]
        extra = {"epochs": 1, "batch_size": 16}
        out = args.out or os.path.join(RESULTS, "quick", "agfn_noise.json")
    if args.epochs is not None:
        extra["epochs"] = args.epochs
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_data(args.data)
    cfg = TrainConfig(model="agfn", data=args.data, seeds=args.seeds, progress=False, device="cpu",
                      threads=args.threads, model_cfg=json.loads(args.model_cfg), **extra)
    test = data["test"]
    stds = {m: channel_std(test, m) for m in MODALITIES}

    per_seed = []
    for seed in args.seeds:
        res = train_seed(cfg, data, seed, None)
        model = res["model_obj"]
        rows = []
        clean_corr = None
        for m in MODALITIES:
            for k in args.levels:
                r = noisy_eval(model, test, m, k, stds[m], cfg.batch_size, noise_seed=12345)
                e = r.pop("_e")
                if k == 0 and clean_corr is None:
                    clean_corr = gate_noise_correlation(e, test)
                rows.append({"noised": m, "level": k, **{a: round(b, 4) for a, b in r.items()}})
                print(f"seed {seed} noise on {m:<6} x{k:<4}: MAE {r['MAE']:.4f}  "
                      + "  ".join(f"e_{s} {r[f'e_{s}']:.3f}" for s in SHORT)
                      + "  " + "  ".join(f"g_{s} {r[f'g_{s}']:.3f}" for s in SHORT))
        per_seed.append({"seed": seed, "best_epoch": res["best_epoch"], "clean_test_MAE": res["test"]["MAE"],
                         "clean_gate_vs_planted_noise": clean_corr, "rows": rows})
        if clean_corr:
            print(f"seed {seed}: clean test, corr(e_m, planted noise r_m): {clean_corr}")

    keys = [k for k in per_seed[0]["rows"][0] if k not in ("noised", "level")]
    mean = []
    for i, row in enumerate(per_seed[0]["rows"]):
        vals = {k: round(float(np.mean([s["rows"][i][k] for s in per_seed])), 4) for k in keys}
        mean.append({"noised": row["noised"], "level": row["level"], **vals})
    payload = {"what": "AGFN entropy-gate weights and MAE under Gaussian noise on one modality",
               "env": environment(torch.device("cpu")), "data": args.data, "seeds": args.seeds,
               "levels": args.levels, "train_config": cfg.to_dict(),
               "noise": "x + level * per-channel test std * N(0, I) on valid positions, one modality",
               "command": "python experiments/fidelity_agfn_noise.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "per_seed": per_seed, "mean": mean, "wall_s": round(time.perf_counter() - t0, 1)}
    path = write("agfn_noise", payload, out)
    png = os.path.splitext(path)[0] + ".png"
    _plot(payload, png)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
