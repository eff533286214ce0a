"""Several seeds of one configuration -> mean ± std table and ``results.json``.

``results.json`` (in ``out``): ``model``, ``data``, ``config``, ``seeds``, ``per_seed`` (test
and valid metrics with MMSA's keys, best epoch, per-epoch history, throughput),
``mean`` / ``std`` of the test metrics over seeds (population std, ``ddof=0``, as MMSA's
``np.std``), ``wall_s``. Each seed checkpoints into ``out/seed_<seed>/``. Under ``torchrun``
(:mod:`msa_fast.train.distributed`) rank 0 claims ``out``, logs and writes; every rank trains. A metric that is
undefined (Pearson's r of constant predictions) is ``null``: the file never holds NaN.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import numpy as np

from msa_fast.data.mmsa import MMSAData
from msa_fast.data.source import load_data
from msa_fast.metrics import METRIC_KEYS
from msa_fast.train.checkpoint import save_json
from msa_fast.train.config import TrainConfig
from msa_fast.train.distributed import current
from msa_fast.train.run_dir import RunDirError, claim
from msa_fast.train.trainer import check_splits, train_seed


def summarize(per_seed: list[dict]) -> tuple[dict, dict]:
    mean, std = {}, {}
    for k in METRIC_KEYS:
        vals = np.array([r["test"][k] for r in per_seed], dtype=np.float64)
        mean[k] = round(float(vals.mean()), 4)
        std[k] = round(float(vals.std()), 4)
    return mean, std


def format_table(model: str, mean: dict, std: dict, n: int) -> str:
    """MMSA-style result table, one metric per line, ``mean ± std`` over ``n`` seeds."""
    lines = [f"{model}: test metrics over {n} seed(s)"]
    for k in METRIC_KEYS:
        v = mean[k]
        cell = "nan" if v is None or math.isnan(v) else f"{v:.4f}"
        sd = "nan" if std[k] is None or math.isnan(std[k]) else f"{std[k]:.4f}"
        lines.append(f"  {k:<14} {cell}" + (f" ± {sd}" if n > 1 else ""))
    return "\n".join(lines)


def run_experiment(cfg: TrainConfig, log=print, data: MMSAData | None = None) -> dict:
    """Train every seed of ``cfg``; with ``cfg.out``, in a run directory claimed for this run
    (:func:`msa_fast.train.run_dir.claim`: refused if it holds another run, locked).
    ``data``: ``cfg.data`` already loaded (with ``cfg.limit``), else it is loaded here."""
    dist = current()
    if not dist.is_main:
        log = _quiet
    if not cfg.out:
        return _run(cfg, log, data)
    if not dist.active:
        with claim(cfg, log):
            return _run(cfg, log, data)
    # data-parallel: rank 0 claims the directory and every rank learns how that went
    with contextlib.ExitStack() as stack:
        error = None
        if dist.is_main:
            try:
                stack.enter_context(claim(cfg, log, world=dist.world))
            except RunDirError as e:
                error = str(e)
        error = dist.broadcast_object(error)
        if error:
            raise RunDirError(error)
        return _run(cfg, log, data)


def _quiet(*_):
    pass


def _run(cfg: TrainConfig, log, data: MMSAData | None) -> dict:
    t0 = time.perf_counter()
    if data is None:
        data = load_data(cfg.data, limit=cfg.limit)
    check_splits(data)
    per_seed = []
    for seed in cfg.seeds:
        run_dir = os.path.join(cfg.out, f"seed_{seed}") if cfg.out else None
        res = train_seed(cfg, data, seed, run_dir)
        res.pop("model_obj", None)
        if res.get("interrupted"):
            log(f"seed {seed}: stopped after epoch {res['epoch']} (stop_after_epoch)")
            continue
        per_seed.append(res)
    results = {"model": cfg.model, "data": cfg.data, "aligned": data.aligned, "dims": data.dims,
               "config": cfg.to_dict(), "seeds": [r["seed"] for r in per_seed],
               "per_seed": per_seed, "wall_s": round(time.perf_counter() - t0, 2)}
    if per_seed:
        results["mean"], results["std"] = summarize(per_seed)
        log(format_table(cfg.model, results["mean"], results["std"], len(per_seed)))
    if cfg.out and current().is_main:
        save_json(os.path.join(cfg.out, "results.json"), results)
    return results
