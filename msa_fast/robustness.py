"""Robustness evaluation of a trained model (contract §11): missing rates, drop patterns, noise.

Three protocols, each applied to every batch of one split (``test`` by default) of a
trained model in eval mode, MMSA's metrics (:func:`msa_fast.metrics.mosi_regression_metrics`,
keys :data:`~msa_fast.metrics.METRIC_KEYS`) computed per condition:

- ``missing`` -- LNLN's protocol: the MMSA ``missing_rate`` masking of
  :func:`msa_fast.data.missing.apply_missing_rate` at rates ``0.0, 0.1, ..., 0.9`` on all
  three modalities at once (a valid token / frame is dropped iff ``u <= rate``,
  ``u ~ U[0, 1)``; text ids -> [UNK] = 100 with CLS/SEP kept, or text features zeroed;
  audio / vision frames zeroed). Summary: the mean of each metric over the ten rates
  (LNLN's number).
- ``drop`` -- MPLMM's seven test patterns: ``{T}``, ``{A}``, ``{V}``, ``{T,A}``, ``{T,V}``,
  ``{A,V}`` missing for every sample, and the complete pattern
  (:func:`msa_fast.data.missing.drop_modalities`: ``present`` cleared and the inputs zeroed
  exactly as the random drop does). Summary: the mean over the seven patterns.
- ``noise`` -- Gaussian noise ``x + s * std_c * n``, ``n ~ N(0, 1)``, of ``s = 0, 0.1, ...,
  1.0`` feature standard deviations, ``std_c`` per channel from the *train* split's valid
  (non-padded) positions (:func:`feature_std`), added on the valid positions only
  (:func:`msa_fast.data.missing.add_gaussian_noise`), on one modality at a time (``text``,
  ``audio``, ``vision``) and on ``all`` of them. Token ids cannot be noised: with
  ``text_bert`` input there is no ``text`` target and ``all`` means audio + vision (said in
  the JSON). Summary per target:

  * **relative robustness** (MultiBench, Liang et al. 2021, ``eval_scripts/robustness.py``,
    ``relative_robustness_helper``): the trapezoid area under the accuracy curve over the
    levels, ``sum_i (acc_i + acc_{i+1}) / 2 * (s_{i+1} - s_i)`` -- with levels 0..1 in steps
    of 0.1 exactly MultiBench's sum; a model at accuracy ``a`` everywhere scores ``a``.
    The accuracy is **``Non0_acc_2``** (binary accuracy on the non-zero labels, MMSA's
    ``Non0_acc_2``, MultiBench's MOSI accuracy); the AUC of ``Has0_acc_2`` is stored too.
  * **effective robustness** (with a reference run, e.g. ``lf_dnn``; MultiBench's
    ``effective_robustness_helper``): the reference curve ``r`` shifted to the model's clean
    accuracy predicts ``beta_i = r_i + (f_0 - r_0)``; ``ER = sum_i (f_i - beta_i)`` over all
    levels (unnormalised; MultiBench then min-max normalises over its methods, which a single
    pair cannot). ``ER > 0``: the model loses less accuracy to noise than the reference; a
    model equal to its reference scores 0.

Seeding: every condition has its own ``torch.Generator`` (:func:`condition_seed`) from
``(seed, protocol, condition)`` -- a missing rate, or a noise target (the same noise tensor
scaled by every level, so a curve is not jagged by redraws). Batches are taken in the split's
fixed order (aligned) or fixed length buckets (unaligned), and the generator is consumed
batch after batch, so masks depend on the batch size as well (it is in the JSON). Several
``seeds`` give the mean and the population std (``np.std``) of every metric over the seeds;
the drop patterns and noise level 0 are deterministic (std 0).

Output (:func:`save_json`, :func:`plot`): a JSON with the checkpoint, the model, the data,
the split, the seeds, the protocol parameters and, per condition, ``mean`` / ``std`` /
``per_seed`` metric dicts; a PNG of the curves (matplotlib, Agg). :func:`markdown_table`
(``msa-fast robustness table A.json B.json ...``) turns several JSONs into one
table: LNLN mean over rates, MPLMM mean over patterns, noise AUC.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from msa_fast.data.missing import add_gaussian_noise, apply_missing_rate, drop_modalities
from msa_fast.metrics import METRIC_KEYS, format_mean_std, mosi_regression_metrics

PROTOCOLS = ("missing", "drop", "noise")
MISSING_RATES = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0 .. 0.9
# MPLMM's seven test patterns: the modalities *missing* (t=0, a=1, v=2); () is complete.
DROP_PATTERNS = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), ())
NOISE_LEVELS = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0 .. 1.0
NOISE_TARGETS = ("text", "audio", "vision", "all")
AUC_METRIC = "Non0_acc_2"
_MODS = ("text", "audio", "vision")
_CODES = {"missing": 1, "drop": 2, "noise": 3}


def pattern_name(mods) -> str:
    """``(0, 1)`` -> ``"T,A"`` (the modalities missing); ``()`` -> ``"complete"``."""
    return ",".join("TAV"[m] for m in mods) or "complete"


def condition_seed(seed: int, protocol: str, condition: int) -> int:
    """The generator seed of one condition (protocol code 1/2/3, condition index)."""
    return (int(seed) * 1009 + _CODES[protocol]) * 100003 + int(condition)


def _need(module: str, extra: str = "analysis"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{module.split('.')[0]} is needed for this (pip install "
                         f"'msa-fast[{extra}]')") from None


# -- summaries ------------------------------------------------------------------------------


def relative_robustness(accuracy, levels=NOISE_LEVELS) -> float:
    """MultiBench's relative robustness: the trapezoid area under ``accuracy`` over ``levels``."""
    acc, x = np.asarray(accuracy, dtype=np.float64), np.asarray(levels, dtype=np.float64)
    if acc.shape != x.shape or acc.ndim != 1 or len(acc) < 2:
        raise ValueError(f"accuracy: expected one value per level ({len(x)}), got shape {acc.shape}")
    return float(np.sum((acc[1:] + acc[:-1]) / 2 * np.diff(x)))


def effective_robustness(accuracy, reference) -> float:
    """MultiBench's effective robustness: ``sum_i (f_i - (r_i + f_0 - r_0))`` -- the model's
    accuracy minus the reference's curve shifted to the model's clean accuracy."""
    f, r = np.asarray(accuracy, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if f.shape != r.shape or f.ndim != 1 or len(f) == 0:
        raise ValueError(f"reference: expected a curve of {f.shape} like the model's, got {r.shape}")
    # the same sum as (f_i - f_0) - (r_i - r_0): exactly 0 for a model equal to its reference
    return float(np.sum((f - f[0]) - (r - r[0])))


def _mean_std(rows: list[dict]) -> tuple[dict, dict]:
    keys = rows[0].keys()
    arr = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}
    return ({k: round(float(np.mean(v)), 4) for k, v in arr.items()},
            {k: round(float(np.std(v)), 4) for k, v in arr.items()})


def _summary(per_seed: list[dict]) -> dict:
    mean, std = _mean_std(per_seed)
    return {"mean": mean, "std": std, "per_seed": per_seed}


# -- evaluation -----------------------------------------------------------------------------


class _Transform:
    """A protocol for :class:`msa_fast.data.loader.EpochLoader`: ``fn(batch, generator)``
    with a generator seeded once per pass."""

    active = True

    def __init__(self, fn, seed: int):
        self.fn, self.seed = fn, seed

    def generator(self, *_):
        return torch.Generator().manual_seed(self.seed)

    def __call__(self, batch, generator):
        return self.fn(batch, generator)


def feature_std(split, modality: str) -> torch.Tensor:
    """Per-channel population std ``(D,)`` of ``modality`` over the valid positions of
    ``split`` (float64 sums in row chunks; a constant channel gets std 0)."""
    x = getattr(split, modality)
    if x is None:
        raise ValueError(f"modality: the split has no {modality!r} features")
    lengths = getattr(split, f"{modality}_lengths")
    s = torch.zeros(x.shape[-1], dtype=torch.float64)
    s2, n = torch.zeros_like(s), 0
    for i in range(0, x.shape[0], 1024):
        part, ln = x[i:i + 1024].double(), lengths[i:i + 1024]
        valid = (torch.arange(x.shape[1])[None, :] < ln[:, None]).unsqueeze(-1).double()
        s += (part * valid).sum((0, 1))
        s2 += (part * part * valid).sum((0, 1))
        n += int(valid.sum())
    mean = s / max(n, 1)
    return (s2 / max(n, 1) - mean * mean).clamp(min=0).sqrt().float()


def noise_targets(data) -> tuple[str, ...]:
    """The noise targets this data allows (no ``text`` when text is token ids only)."""
    return NOISE_TARGETS if data["train"].text is not None else ("audio", "vision", "all")


def _noise_fn(target: str, level: float, stds: dict):
    mods = [m for m in _MODS if m in stds] if target == "all" else [target]

    def fn(batch, gen):
        for m in mods:
            batch = add_gaussian_noise(batch, m, level, stds[m], gen)
        return batch

    return fn


def _metrics(model, data, split, transform, batch_size, device, amp) -> dict:
    from msa_fast.data.loader import make_loader
    from msa_fast.train.trainer import predict

    loader = make_loader(data[split], batch_size, shuffle=False, seed=0, aligned=data.aligned,
                         protocol=transform, name=split)
    p, y = predict(model, loader, device, amp)
    return mosi_regression_metrics(p, y)


def run_robustness(model, data, split: str = "test", protocols=PROTOCOLS, seeds=(0,),
                   batch_size: int = 64, device="cpu", amp: bool = False,
                   rates=MISSING_RATES, patterns=DROP_PATTERNS, levels=NOISE_LEVELS,
                   targets=None) -> dict:
    """Run ``protocols`` on ``data[split]``; returns ``{"params": ..., "<protocol>": ...}``.

    ``rates`` / ``patterns`` / ``levels`` / ``targets`` default to the full protocols of the
    module docstring; a subset is allowed (tests, quick looks) and recorded in ``params``.
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"protocols: expected some of {PROTOCOLS}, got {tuple(protocols)}")
    if split not in data.splits or len(data[split]) == 0:
        raise ValueError(f"split: {split!r} holds no samples")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    device = torch.device(device)
    model.eval()
    run = lambda fn, seed: _metrics(model, data, split, _Transform(fn, seed), batch_size, device, amp)  # noqa: E731
    out = {"params": {"split": split, "seeds": seeds, "batch_size": batch_size,
                      "metric_keys": list(METRIC_KEYS), "auc_metric": AUC_METRIC}}
    t0 = time.perf_counter()
    if "missing" in protocols:
        rates = [float(r) for r in rates]
        conds = []
        for i, r in enumerate(rates):
            fn = (lambda b, g, r=r: apply_missing_rate(b, r, g)) if r > 0 else (lambda b, g: b)
            conds.append({"rate": r, **_summary([run(fn, condition_seed(s, "missing", i)) for s in seeds])})
        per_seed = [{k: float(np.mean([c["per_seed"][j][k] for c in conds])) for k in METRIC_KEYS}
                    for j in range(len(seeds))]
        out["missing"] = {"rates": rates, "modalities": list(_MODS), "conditions": conds,
                          "mean_over_rates": _summary(per_seed)}
    if "drop" in protocols:
        conds = []
        for pat in patterns:
            m = run(lambda b, g, pat=pat: drop_modalities(b, pat), 0)  # deterministic: once
            conds.append({"pattern": pattern_name(pat), "missing": [_MODS[i] for i in pat],
                          **_summary([m] * len(seeds))})
        per_seed = [{k: float(np.mean([c["per_seed"][j][k] for c in conds])) for k in METRIC_KEYS}
                    for j in range(len(seeds))]
        out["drop"] = {"patterns": [c["pattern"] for c in conds], "conditions": conds,
                       "mean_over_patterns": _summary(per_seed)}
    if "noise" in protocols:
        allowed = noise_targets(data)
        targets = tuple(targets or allowed)
        bad = [t for t in targets if t not in allowed]
        if bad:
            raise ValueError(f"targets: expected some of {allowed} for this data, got {targets}")
        stds = {m: feature_std(data["train"], m) for m in _MODS if m in allowed}
        levels = [float(s) for s in levels]
        res = {}
        for ti, target in enumerate(targets):
            conds = [{"level": s, **_summary([run(_noise_fn(target, s, stds), condition_seed(seed, "noise", ti))
                                              for seed in seeds])} for s in levels]
            res[target] = {"conditions": conds}
            for key in (AUC_METRIC, "Has0_acc_2"):
                per = [relative_robustness([c["per_seed"][j][key] for c in conds], levels)
                       for j in range(len(seeds))]
                res[target].setdefault("relative_robustness", {})[key] = {
                    "mean": round(float(np.mean(per)), 4), "std": round(float(np.std(per)), 4),
                    "per_seed": per}
        out["noise"] = {"levels": levels, "targets": res, "std_from": "train split, valid positions",
                        "text": "features" if "text" in allowed else "not applicable (token ids only)"}
    out["params"]["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def add_effective_robustness(result: dict, reference: dict) -> dict:
    """Add ``effective_robustness`` per noise target of ``result`` against the noise curves of
    ``reference`` (another :func:`run_robustness` result; same levels). Per seed of the model
    against the reference's mean curve; mean and std over the model's seeds."""
    if "noise" not in result:
        return result
    if "noise" not in reference:
        raise ValueError("reference: its robustness result has no noise protocol")
    if reference["noise"]["levels"] != result["noise"]["levels"]:
        raise ValueError(f"reference: noise levels {reference['noise']['levels']} differ from "
                         f"{result['noise']['levels']}")
    for target, res in result["noise"]["targets"].items():
        ref = reference["noise"]["targets"].get(target)
        if ref is None:
            continue
        r = [c["mean"][AUC_METRIC] for c in ref["conditions"]]
        n = len(res["conditions"][0]["per_seed"])
        per = [effective_robustness([c["per_seed"][j][AUC_METRIC] for c in res["conditions"]], r)
               for j in range(n)]
        res["effective_robustness"] = {AUC_METRIC: {"mean": round(float(np.mean(per)), 4),
                                                    "std": round(float(np.std(per)), 4), "per_seed": per}}
    return result


# -- loading a run -------------------------------------------------------------------------


def load_run(run_dir: str, data=None, weights: str = "best", device: str = "auto",
             batch_size: int | None = None):
    """``(model, state, data, cfg)`` of a seed's run directory, read by the one run loader
    :func:`msa_fast.train.checkpoint.load_run`; ``data`` a data spec (default: the run's, with
    the run's ``limit``; a spec given is loaded whole, as ``msa-fast eval --data`` does) or a
    loaded :class:`MMSAData` (:meth:`~msa_fast.train.checkpoint.Run.load_data`);
    ``batch_size`` replaces the run's in ``cfg``."""
    from msa_fast.data.mmsa import MMSAData
    from msa_fast.train.checkpoint import load_run as _load_run

    run = _load_run(run_dir, weights, device)
    cfg = run.config
    cfg.data = (data.source or run.data_spec) if isinstance(data, MMSAData) else (data or run.data_spec)
    data = run.load_data(data)
    if batch_size is not None:
        cfg.batch_size = batch_size
    return run.model, run.state, data, cfg


# -- output --------------------------------------------------------------------------------


def save_json(path: str, result: dict) -> None:
    from msa_fast.train.checkpoint import save_json as _save

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _save(path, result)


def plot(result: dict, path: str) -> None:
    """A PNG of the curves: accuracy (``Non0_acc_2``) against missing rate, per drop pattern,
    and against noise level per target (the reference's curves dashed when present)."""
    _need("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in PROTOCOLS if p in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    title = f"{result.get('model', '')} on {result.get('data', '')} [{result['params']['split']}]"
    for ax, p in zip(axes[0], panels):
        r = result[p]
        if p == "missing":
            m = [c["mean"][AUC_METRIC] for c in r["conditions"]]
            s = [c["std"][AUC_METRIC] for c in r["conditions"]]
            ax.errorbar(r["rates"], m, yerr=s, marker="o", capsize=3)
            ax.set(xlabel="missing rate (t, a, v)", title="missing (LNLN)")
        elif p == "drop":
            m = [c["mean"][AUC_METRIC] for c in r["conditions"]]
            ax.bar(range(len(m)), m)
            ax.set_xticks(range(len(m)), [f"-{n}" if n != "complete" else n for n in r["patterns"]],
                          rotation=30)
            ax.set(xlabel="modalities missing", title="drop (MPLMM)")
        else:
            ref = result.get("reference", {}).get("noise", {}).get("targets", {})
            for target, res in r["targets"].items():
                line, = ax.plot(r["levels"], [c["mean"][AUC_METRIC] for c in res["conditions"]],
                                marker=".", label=target)
                if target in ref:
                    ax.plot(r["levels"], [c["mean"][AUC_METRIC] for c in ref[target]["conditions"]],
                            ls="--", color=line.get_color(), label=f"{target} (reference)")
            ax.set(xlabel="noise (feature std)", title="Gaussian noise")
            ax.legend(fontsize=7)
        ax.set_ylabel(AUC_METRIC)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(paths) -> str:
    """One markdown row per robustness JSON: model, data, LNLN mean over rates
    (``Non0_acc_2``, ``MAE``), MPLMM mean over patterns (same), noise AUC of ``Non0_acc_2``
    per target and, where present, the effective robustness on ``all``."""
    head = ("| model | data | LNLN mean Non0_acc_2 | LNLN mean MAE | MPLMM mean Non0_acc_2 | "
            "MPLMM mean MAE | noise AUC T | noise AUC A | noise AUC V | noise AUC all | ER all |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        miss = r.get("missing", {}).get("mean_over_rates")
        drop = r.get("drop", {}).get("mean_over_patterns")
        tg = r.get("noise", {}).get("targets", {})
        fmt = format_mean_std
        auc = [fmt(tg.get(t, {}).get("relative_robustness", {}).get(AUC_METRIC)) for t in NOISE_TARGETS]
        er = fmt(tg.get("all", {}).get("effective_robustness", {}).get(AUC_METRIC))
        rows.append(f"| {r.get('model', '?')} | {r.get('data', '?')} | {fmt(miss, AUC_METRIC)} | "
                    f"{fmt(miss, 'MAE')} | {fmt(drop, AUC_METRIC)} | {fmt(drop, 'MAE')} | "
                    + " | ".join(auc) + f" | {er} |")
    return "\n".join(rows)
