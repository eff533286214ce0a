"""Fidelity table (issue 4): every seed model against the baselines on synthetic data.

Trains ``text_only``, ``lf_dnn``, ``agfn``, ``fd_cmdie`` and ``promma`` with their default
configurations (``msa-fast train --model NAME --data DATA``, 3 seeds, MMSA early stopping)
and reports the test metrics as mean ± std over the seeds, with each model's wall time.

    python experiments/fidelity_models.py                    # synthetic:mosi, 3 seeds
    python experiments/fidelity_models.py --quick            # CI smoke: tiny data, 1 epoch
    python experiments/fidelity_models.py --amp bf16         # the same under bf16 autocast (CPU too)

``--amp bf16`` writes ``fidelity_models_bf16.*`` and, when ``fidelity_models.json`` (fp32)
of the same data and seeds is beside it, a comparison per model and metric: whether the
bf16 mean lies within the fp32 mean +- 2 seed standard deviations (``within_fp32_spread``).

Writes ``benchmarks/results/fidelity_models.json`` (per-model mean/std/per-seed metrics and
the environment), ``fidelity_models.png`` (MAE and Non0_acc_2 per model, error bars = std)
and ``fidelity_models.md`` (the README table). A model that fails is recorded with its error
and the others still run; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

if not __package__:  # run as a file, not with -m: import from the repository root, as -m does
    sys.path[0] = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

import torch

from benchmarks._common import RESULTS, environment
from msa_fast._io import figure, save_json
from msa_fast.train import TrainConfig, run_experiment

MODELS = ("text_only", "lf_dnn", "agfn", "fd_cmdie", "promma")
SHOWN = ("MAE", "Corr", "Non0_acc_2", "Has0_acc_2", "Mult_acc_7")


def _table(rows: dict, data: str, seeds: list[int], command: str) -> str:
    head = "| model | " + " | ".join(SHOWN) + " | wall s |"
    lines = [f"Test split of `{data}`, mean ± std over seeds {seeds}; made by `{command}`.", "",
             head, "|" + "---|" * (len(SHOWN) + 2)]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * len(SHOWN))
            continue
        cells = [f"{r['mean'][k]:.4f} ± {r['std'][k]:.4f}" for k in SHOWN]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _plot(rows: dict, path: str, title: str | None = None) -> None:
    """MAE and Acc-2 bars (mean, seed std as error bars) of the rows without an error; the
    baselines (text_only, lf_dnn) grey. Also drawn by ``fidelity_pid.py``."""
    ok = {n: r for n, r in rows.items() if "error" not in r}
    with figure(path, 1, 2, figsize=(10, 3.6), dpi=120) as (fig, axes):
        for ax, key, better in zip(axes, ("MAE", "Non0_acc_2"), ("lower", "higher")):
            names = list(ok)
            ax.bar(names, [ok[n]["mean"][key] for n in names], yerr=[ok[n]["std"][key] for n in names],
                   color=["#999999" if n in ("text_only", "lf_dnn") else "#3b75af" for n in names], capsize=4)
            ax.set_title(f"{key} ({better} is better)")
            ax.tick_params(axis="x", rotation=20)
        if title:
            fig.suptitle(title, fontsize=9)


def _compare(rows: dict, fp32: dict, args) -> dict:
    """Per model and metric: the bf16 mean against the fp32 runs' mean +- 2 std."""
    if (fp32["data"], fp32["seeds"]) != (args.data, args.seeds):
        return {"skipped": f"fp32 JSON holds {fp32['data']} seeds {fp32['seeds']}"}
    out = {}
    for name, r in rows.items():
        ref = fp32["models"].get(name)
        if "mean" not in r or not ref or "mean" not in ref:
            continue
        per = {}
        for key in SHOWN:
            delta = r["mean"][key] - ref["mean"][key]
            band = 2 * ref["std"][key] + 1e-4  # + the metrics' 4-place rounding
            per[key] = {"bf16": r["mean"][key], "fp32": ref["mean"][key], "fp32_std": ref["std"][key],
                        "delta": round(delta, 4), "within_fp32_spread": abs(delta) <= band}
        out[name] = {"metrics": per, "all_within": all(v["within_fp32_spread"] for v in per.values()),
                     "wall_s_bf16": r["wall_s"], "wall_s_fp32": ref["wall_s"]}
        print(f"{name}: bf16 within the fp32 spread on {sum(v['within_fp32_spread'] for v in per.values())}"
              f"/{len(per)} metrics; wall {r['wall_s']:.0f} s vs {ref['wall_s']:.0f} s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--data", default="synthetic:mosi")
    p.add_argument("--seeds", type=int, nargs="+", default=[1111, 1112, 1113])
    p.add_argument("--backend", default="auto")
    p.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 autocast: auto = CUDA only (the trainer's default), bf16 = every device")
    p.add_argument("--quick", action="store_true", help="tiny data, 1 epoch, 1 seed (smoke)")
    p.add_argument("--out", default=RESULTS, help="directory of the JSON / PNG / MD outputs")
    p.add_argument("--merge", action="store_true",
                   help="keep the other models' rows of an existing JSON (same data and seeds)")
    args = p.parse_args(argv)
    extra = {}
    if args.quick:
        args.data, args.seeds = "synthetic:tiny:limit=48", [1]
        extra = {"epochs": 1, "batch_size": 16}
        if args.out == RESULTS:
            args.out = os.path.join(RESULTS, "quick")
    os.makedirs(args.out, exist_ok=True)

    import msa_fast

    msa_fast.set_backend(args.backend)
    amp = {"auto": True, "bf16": "bf16", "off": False}[args.amp]
    stem = os.path.join(args.out, "fidelity_models" + ("_bf16" if args.amp == "bf16" else ""))
    rows: dict[str, dict] = {}
    if args.merge and os.path.exists(stem + ".json"):
        old = json.load(open(stem + ".json"))
        if (old["data"], old["seeds"]) != (args.data, args.seeds):
            p.error(f"--merge: {stem}.json holds {old['data']} seeds {old['seeds']}")
        rows = {n: r for n, r in old["models"].items() if n not in args.models}
    for name in args.models:
        t0 = time.perf_counter()
        try:
            cfg = TrainConfig(model=name, data=args.data, seeds=args.seeds, progress=False,
                              backend=args.backend, amp=amp, **extra)
            res = run_experiment(cfg, log=lambda s: print(s, flush=True))
            rows[name] = {"mean": res["mean"], "std": res["std"],
                          "per_seed": [{"seed": r["seed"], "test": r["test"],
                                        "best_epoch": r["best_epoch"]} for r in res["per_seed"]],
                          "wall_s": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # one failing model must not hide the others' results
            traceback.print_exc()
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)

    command = "python experiments/fidelity_models.py" + (" --quick" if args.quick else "") + (
        f" --amp {args.amp}" if args.amp != "auto" else "")
    payload = {"data": args.data, "seeds": args.seeds, "backend": args.backend, "amp": args.amp,
               "environment": environment(torch.device("cpu")), "models": rows}
    fp32_path = os.path.join(args.out, "fidelity_models.json")
    if args.amp == "bf16" and os.path.exists(fp32_path):
        payload["vs_fp32"] = _compare(rows, json.load(open(fp32_path)), args)
    rows = {n: rows[n] for n in MODELS if n in rows} | {n: r for n, r in rows.items() if n not in MODELS}
    save_json(stem + ".json", payload)
    with open(stem + ".md", "w") as f:
        f.write(_table(rows, args.data, args.seeds, command))
    _plot(rows, stem + ".png")
    print(open(stem + ".md").read())
    base = rows.get("text_only", {}).get("mean", {}).get("MAE")
    if base is not None:
        for name, r in rows.items():
            if name != "text_only" and "mean" in r:
                verdict = "beats" if r["mean"]["MAE"] < base else "does NOT beat"
                print(f"{name} {verdict} text_only on MAE ({r['mean']['MAE']:.4f} vs {base:.4f})")
    return 1 if any("error" in r for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
