"""What limits the models on ``synthetic:<preset>:pid`` (issue 22, deliverable 1): measured.

Every seed model sits near the text-only ceiling on ``synthetic:mosi:pid``
(``fidelity_pid.py``): audio and vision add little of what they could. This script separates
the candidate causes with numbers, the test split read once per fitted predictor:

- **ceilings** (:func:`msa_fast.data.synthetic_pid.ceilings`): the best MAE any predictor can
  reach with each modality set, audio only and vision only included;
- **probes**: one small fusion head (a 2-hidden-layer MLP, L1 loss, Adam, early stopping on
  the valid split's MAE) on per-modality pooled features, for text / audio / vision / all,
  pooled two ways: ``mean`` over the valid frames (what a model sees before it has found the
  cue) and ``window`` over the cue's true window (``split.extra["window"]``, an oracle of
  where to look). ``window`` much better than ``mean`` = *finding the cue in time* is a
  bottleneck; ``window`` still far from the ceiling = the head (or the data) is;
- **learning curve** (``--curve``, default on ``synthetic:mosei:pid``, 16k training
  samples): the ``all`` probes trained on the first n training samples -- is it data?
- **latent shares**: for every probe (and every trained run under ``--runs``, see
  ``fidelity_pid.py train``), the least-squares coefficients of its test predictions on the
  latents ``[rho, u_t, u_a, u_v, s_a s_v]`` divided by the same coefficients of the labels:
  1.0 = that share of the label is fully used, 0 = ignored. The synergy's ratio answers
  whether the ``s_a * s_v`` share is learned at all;
- **runs** (when ``--runs`` holds ``fidelity_pid.py`` runs): each model's best epoch, epochs
  run, and train vs valid L1 at the best epoch and at the last (how fast it overfits), with
  the latent shares of its test predictions.

    python experiments/pid_diagnose.py                     # probes, ceilings, curve, runs if any
    python experiments/pid_diagnose.py --quick             # smoke: tiny data, 1 seed
    python experiments/pid_diagnose.py --no-curve --seeds 1111

Outputs ``diagnose.{json,md}`` under ``--out`` (default ``benchmarks/results/pid``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

import numpy as np
import torch
from torch import nn

from benchmarks._common import RESULTS, environment
from msa_fast._io import save_json

MODS = ("text", "audio", "vision")
SETS = {"text": ("text",), "audio": ("audio",), "vision": ("vision",), "all": MODS}
CEILING_OF = {"text": "text only", "audio": "audio only", "vision": "vision only", "all": "all"}
LATENT_NAMES = ("redundant", "unique_text", "unique_audio", "unique_vision", "synergy")


def pooled(split, how: str) -> dict[str, torch.Tensor]:
    """Per-modality ``(N, d)`` features: the mean over the valid frames (``how="mean"``) or
    over the cue's true window (``how="window"``, from ``split.extra["window"]``)."""
    out = {}
    for mi, m in enumerate(MODS):
        x = getattr(split, m)
        pos = torch.arange(x.shape[1])
        if how == "mean":
            keep = pos[None] < getattr(split, f"{m}_lengths")[:, None]
        elif how == "window":
            start, length = split.extra["window"][:, mi, 0], split.extra["window"][:, mi, 1]
            keep = (pos[None] >= start[:, None]) & (pos[None] < (start + length)[:, None])
        else:
            raise ValueError(f"how: expected 'mean' or 'window', got {how!r}")
        w = keep.to(x.dtype)
        out[m] = (x * w[..., None]).sum(1) / w.sum(1).clamp_min(1)[:, None]
    return out


def latent_design(split) -> np.ndarray:
    """``(N, 5)``: ``rho, u_t, u_a, u_v, s_a * s_v`` of the split's samples."""
    lat = split.extra["latent"].double().numpy()
    return np.concatenate([lat[:, :4], (lat[:, 4] * lat[:, 5])[:, None]], axis=1)


def latent_shares(pred, split) -> dict[str, float]:
    """Least-squares coefficients of ``pred`` on the latents over those of the labels: the
    fraction of each latent's effect on the label that the predictions carry."""
    X = np.concatenate([latent_design(split), np.ones((len(split.labels), 1))], axis=1)
    coef_p = np.linalg.lstsq(X, np.asarray(pred, dtype=np.float64), rcond=None)[0]
    coef_y = np.linalg.lstsq(X, split.labels.double().numpy(), rcond=None)[0]
    return {name: round(float(coef_p[i] / coef_y[i]), 4) for i, name in enumerate(LATENT_NAMES)}


def fit_probe(train: tuple, valid: tuple, test_x: torch.Tensor, seed: int, *, hidden: int = 128,
              dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 1e-4,
              max_epochs: int = 300, patience: int = 25, batch: int = 64) -> dict:
    """A 2-hidden-layer MLP fitted with L1 loss; the valid split picks the epoch; returns the
    test predictions, the best epoch and the train / valid MAE there."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    (xtr, ytr), (xva, yva) = train, valid
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)  # standardised on the training split only
    xtr, xva, xte = (xtr - mu) / sd, (xva - mu) / sd, (test_x - mu) / sd
    net = nn.Sequential(nn.Linear(xtr.shape[1], hidden), nn.ReLU(), nn.Dropout(dropout),
                        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_state, best_epoch, bad, train_mae = math.inf, None, 0, 0, math.nan
    for epoch in range(1, max_epochs + 1):
        net.train()
        for idx in torch.randperm(len(xtr), generator=g).split(batch):
            loss = (net(xtr[idx]).squeeze(-1) - ytr[idx]).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            v = float((net(xva).squeeze(-1) - yva).abs().mean())
        if v <= best - 1e-6:  # MMSA's rule, as the trainer
            best, best_epoch, bad = v, epoch, 0
            best_state = {k: t.clone() for k, t in net.state_dict().items()}
            with torch.no_grad():
                train_mae = float((net(xtr).squeeze(-1) - ytr).abs().mean())
        else:
            bad += 1
            if bad >= patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    with torch.no_grad():
        pred = net(xte).squeeze(-1)
    return {"pred": pred, "best_epoch": best_epoch, "epochs_run": epoch,
            "train_mae": round(train_mae, 4), "valid_mae": round(best, 4)}


def _ms(vals) -> dict:
    a = np.asarray(vals, dtype=np.float64)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std()), 4), "n": int(a.size)}


def pool_splits(data, hows=("mean", "window")) -> dict:
    """:func:`pooled` features of every split, per pooling: once per data set."""
    return {how: {s: pooled(data[s], how) for s in ("train", "valid", "test")} for how in hows}


def run_probes(data, seeds, n_train: int | None = None, sets=SETS, feats: dict | None = None) -> dict:
    from msa_fast.metrics import mosi_regression_metrics

    out = {}
    feats = feats or pool_splits(data)
    hows = tuple(feats)
    for how in hows:
        for set_name, mods in sets.items():
            cat = {s: torch.cat([feats[how][s][m] for m in mods], 1) for s in ("train", "valid", "test")}
            ytr = data["train"].labels
            xtr = cat["train"]
            if n_train is not None:
                xtr, ytr = xtr[:n_train], ytr[:n_train]
            rows = []
            for seed in seeds:
                t0 = time.perf_counter()
                fit = fit_probe((xtr, ytr), (cat["valid"], data["valid"].labels), cat["test"], seed)
                metrics = mosi_regression_metrics(fit["pred"], data["test"].labels)
                rows.append({"seed": seed, "MAE": metrics["MAE"], "Corr": metrics["Corr"],
                             "Non0_acc_2": metrics["Non0_acc_2"], **{k: fit[k] for k in
                             ("best_epoch", "epochs_run", "train_mae", "valid_mae")},
                             "shares": latent_shares(fit["pred"].numpy(), data["test"]),
                             "seconds": round(time.perf_counter() - t0, 2)})
            out[f"{set_name}/{how}"] = {
                "modalities": list(mods), "pooling": how, "n_train": len(xtr), "per_seed": rows,
                **{k: _ms([r[k] for r in rows]) for k in ("MAE", "Corr", "Non0_acc_2", "best_epoch",
                                                          "train_mae", "valid_mae")},
                "shares": {k: _ms([r["shares"][k] for r in rows])["mean"] for k in LATENT_NAMES}}
            print(f"probe {set_name:>6}/{how:<6} n={len(xtr):>6}: test MAE {out[f'{set_name}/{how}']['MAE']['mean']:.4f}"
                  f" +- {out[f'{set_name}/{how}']['MAE']['std']:.4f}", flush=True)
    return out


def report_runs(runs: str, data_spec: str) -> dict:
    """Overfitting and latent shares of the ``fidelity_pid.py`` runs found under ``runs``."""
    from msa_fast.robustness import load_run
    from msa_fast.train.trainer import predict

    out: dict = {}
    if not os.path.isdir(runs):
        return out
    for name in sorted(os.listdir(runs)):
        res_path = os.path.join(runs, name, "results.json")
        if not os.path.isfile(res_path):
            continue
        with open(res_path) as f:
            res = json.load(f)
        rows = []
        for seed_res in res.get("per_seed", []):
            hist = seed_res.get("history") or []
            if not hist:
                continue
            best = seed_res["best_epoch"]
            at_best = next((h for h in hist if h["epoch"] == best), hist[-1])
            row = {"seed": seed_res["seed"], "best_epoch": best, "epochs_run": len(hist),
                   "train_l1_at_best": at_best["train_loss"], "valid_l1_at_best": at_best["valid_loss"],
                   "train_l1_last": hist[-1]["train_loss"], "valid_l1_last": hist[-1]["valid_loss"],
                   "test_MAE": seed_res.get("test", {}).get("MAE")}
            seed_dir = os.path.join(runs, name, f"seed_{seed_res['seed']}")
            if os.path.isdir(seed_dir):
                from msa_fast.data.loader import make_loader

                model, _, data, cfg = load_run(seed_dir)
                loader = make_loader(data["test"], cfg.batch_size, shuffle=False, aligned=data.aligned,
                                     name="test")
                p, _ = predict(model, loader, torch.device("cpu"), False)
                row["shares"] = latent_shares(p.numpy(), data["test"])
            rows.append(row)
        if rows:
            out[name] = {"per_seed": rows, **{k: _ms([r[k] for r in rows if r.get(k) is not None])
                                              for k in ("best_epoch", "epochs_run", "train_l1_at_best",
                                                        "valid_l1_at_best", "test_MAE")}}
            if all("shares" in r for r in rows):
                out[name]["shares"] = {k: _ms([r["shares"][k] for r in rows])["mean"] for k in LATENT_NAMES}
    return out


def _fmt(ms: dict) -> str:
    return f"{ms['mean']:.3f} ± {ms['std']:.3f}" if ms["n"] > 1 else f"{ms['mean']:.3f}"


def markdown(res: dict, command: str) -> str:
    lines = [f"# What limits the models on `{res['data']}`", "",
             f"`{command}` ({res['seconds']:.0f} s, {res['env']['device']}, seeds {res['seeds']}; "
             "test split, mean ± std over seeds).", "",
             "## Ceilings and probes", "",
             "A probe is one 2-hidden-layer MLP on pooled features (L1, early stopping on valid). "
             "`mean`: mean over the valid frames; `window`: mean over the cue's true window (an "
             "oracle of where to look). Shares: least-squares coefficient of the predictions on "
             "each latent over the label's (1 = fully used).", "",
             "| modalities | ceiling MAE | probe `mean` MAE | probe `window` MAE | best epoch (mean / window) "
             "| synergy share (mean / window) | redundant share (mean / window) "
             "| unique t / a / v share (window) |",
             "|---|---|---|---|---|---|---|---|"]
    for set_name in SETS:
        m, w = res["probes"].get(f"{set_name}/mean"), res["probes"].get(f"{set_name}/window")
        if not (m and w):
            continue
        ceil = res["ceilings"][CEILING_OF[set_name]]["MAE"]
        lines.append(f"| {set_name} | {ceil:.3f} | {_fmt(m['MAE'])} | {_fmt(w['MAE'])} | "
                     f"{m['best_epoch']['mean']:.0f} / {w['best_epoch']['mean']:.0f} | "
                     f"{m['shares']['synergy']:.2f} / {w['shares']['synergy']:.2f} | "
                     f"{m['shares']['redundant']:.2f} / {w['shares']['redundant']:.2f} | "
                     f"{w['shares']['unique_text']:.2f} / {w['shares']['unique_audio']:.2f} / "
                     f"{w['shares']['unique_vision']:.2f} |")
    if res.get("curve"):
        lines += ["", f"## Learning curve (`{res['curve']['data']}`, the `all` probes)", "",
                  "| training samples | probe `mean` MAE | probe `window` MAE | synergy share (mean / window) "
                  "| unique a / v share (window) |",
                  "|---|---|---|---|---|"]
        for n, row in res["curve"]["points"].items():
            w = row["all/window"]["shares"]
            lines.append(f"| {n} | {_fmt(row['all/mean']['MAE'])} | {_fmt(row['all/window']['MAE'])} | "
                         f"{row['all/mean']['shares']['synergy']:.2f} / {w['synergy']:.2f} | "
                         f"{w['unique_audio']:.2f} / {w['unique_vision']:.2f} |")
        lines.append(f"\nCeiling (all modalities) on that preset: {res['curve']['ceiling_all_MAE']:.3f}.")
    if res.get("runs"):
        lines += ["", "## Trained models (`fidelity_pid.py` runs)", "",
                  "| run | test MAE | best epoch / epochs run | train L1 at best | valid L1 at best "
                  "| synergy share | redundant share | audio unique | vision unique |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in res["runs"].items():
            sh = r.get("shares", {})
            lines.append(f"| {name} | {_fmt(r['test_MAE'])} | {r['best_epoch']['mean']:.1f} / "
                         f"{r['epochs_run']['mean']:.1f} | {_fmt(r['train_l1_at_best'])} | "
                         f"{_fmt(r['valid_l1_at_best'])} | {sh.get('synergy', float('nan')):.2f} | "
                         f"{sh.get('redundant', float('nan')):.2f} | {sh.get('unique_audio', float('nan')):.2f} | "
                         f"{sh.get('unique_vision', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic:mosi:pid")
    p.add_argument("--curve-data", default="synthetic:mosei:pid")
    p.add_argument("--curve-n", type=int, nargs="+", default=[1284, 4000, 16000])
    p.add_argument("--no-curve", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=[1111, 1112, 1113])
    p.add_argument("--runs", default=os.path.join("runs", "pid"), help="fidelity_pid.py run directories")
    p.add_argument("--out", default=os.path.join(RESULTS, "pid"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny data, 1 seed, the curve at two small sizes")
    p.add_argument("--render", action="store_true", help="rewrite diagnose.md from diagnose.json, no fitting")
    p.add_argument("--update-runs", action="store_true",
                   help="re-read only the trained runs (--runs) into diagnose.json and .md, no probes")
    args = p.parse_args(argv)
    stem = os.path.join(args.out, "diagnose")
    if args.render or args.update_runs:
        with open(stem + ".json") as f:
            res = json.load(f)
        if args.update_runs:
            res["runs"] = report_runs(args.runs, res["data"])
            save_json(stem + ".json", res)
        with open(stem + ".md", "w") as f:
            f.write(markdown(res, res.get("command", "python experiments/pid_diagnose.py")))
        print(f"wrote {stem}.md")
        return 0
    torch.set_num_threads(args.threads)
    from msa_fast.data.source import load_data
    from msa_fast.data.synthetic_pid import ceilings

    if args.quick:
        args.data, args.curve_data, args.curve_n = "synthetic:tiny:pid", "synthetic:tiny:pid", [16, 32]
        args.seeds = args.seeds[:1]
    t0 = time.time()
    data = load_data(args.data)
    grid = 1 / 3 if ":mosei" in args.data else 0.2
    res = {"data": args.data, "seeds": args.seeds, "env": environment(torch.device("cpu")),
           "ceilings": ceilings(n=20_000 if args.quick else 200_000, label_step=grid),
           "probes": run_probes(data, args.seeds)}
    if not args.no_curve:
        cdata = load_data(args.curve_data)
        cfeats = pool_splits(cdata)
        points = {}
        for n in args.curve_n:
            n = min(n, len(cdata["train"].labels))
            points[str(n)] = run_probes(cdata, args.seeds, n_train=n, sets={"all": MODS}, feats=cfeats)
        cgrid = 1 / 3 if ":mosei" in args.curve_data else 0.2
        res["curve"] = {"data": args.curve_data, "points": points,
                        "ceiling_all_MAE": ceilings(n=20_000 if args.quick else 200_000,
                                                    label_step=cgrid)["all"]["MAE"]}
    res["runs"] = report_runs(args.runs, args.data)
    res["seconds"] = round(time.time() - t0, 1)
    command = "python experiments/pid_diagnose.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res["command"] = command.strip()
    os.makedirs(args.out, exist_ok=True)
    save_json(stem + ".json", res)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res, res["command"]))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
