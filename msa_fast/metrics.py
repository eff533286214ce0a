"""MMSA's MOSI/MOSEI regression metrics (``metricsTop.__eval_mosei_regression``), contract §6.

With ``p`` the flattened predictions and ``y`` the flattened labels:

- ``Has0_acc_2 = mean((p >= 0) == (y >= 0))``, ``Has0_F1_score = F1_w(y >= 0, p >= 0)``;
- ``Non0_acc_2`` / ``Non0_F1_score``: the same with ``> 0``, on the samples where ``y != 0``;
- ``Mult_acc_5``: ``mean(round(clip(p, -2, 2)) == round(clip(y, -2, 2)))`` (``np.round``, half to
  even, as MMSA); ``Mult_acc_7`` the same with ``[-3, 3]``;
- ``MAE = mean|p - y|`` and ``Corr`` = Pearson's r (``np.corrcoef``), both unclipped.

``F1_w`` is scikit-learn's ``f1_score(average="weighted")``, reimplemented here in numpy so
that the library does not need scikit-learn at run time: over the classes present in either
truth or prediction, ``F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)`` weighted by the support of
``c`` in the truth. (A class predicted but absent from the truth has support 0, hence weight
0; a class in the truth never predicted has ``F1_c = 0`` -- sklearn's ``zero_division=0``.)

Every value is rounded to 4 places as MMSA does. ``Corr`` of a constant prediction is
``nan`` (numpy's answer, as in MMSA). An empty ``Non0`` subset (every label 0) gives ``nan``
for the ``Non0_*`` keys, where MMSA would raise.
"""

from __future__ import annotations

import warnings

import numpy as np

# An implausible prediction: over this many times the largest training |label|.
IMPLAUSIBLE_FACTOR = 100.0
_warned_implausible: set[str] = set()


def warn_if_implausible(preds, label_absmax: float | None, where: str) -> bool:
    """Warn once per process and ``where`` when a prediction exceeds ``IMPLAUSIBLE_FACTOR`` x
    the largest training |label| (MMSA's 3 when unknown): the sign of corrupt weights or of
    data on another scale, which metrics alone report as a bad MAE. Returns whether it did."""
    bound = IMPLAUSIBLE_FACTOR * (label_absmax if label_absmax and label_absmax > 0 else 3.0)
    preds = np.asarray(preds)
    worst = float(np.abs(preds).max()) if preds.size else 0.0
    if not worst > bound or where in _warned_implausible:
        return False
    _warned_implausible.add(where)
    warnings.warn(f"{where}: a prediction of magnitude {worst:.4g} is over {IMPLAUSIBLE_FACTOR:g}x the "
                  f"largest training |label| ({bound / IMPLAUSIBLE_FACTOR:.4g}): corrupt weights, or "
                  "inputs on another scale than the training data?", RuntimeWarning, stacklevel=2)
    return True

METRIC_KEYS = (
    "Has0_acc_2",
    "Has0_F1_score",
    "Non0_acc_2",
    "Non0_F1_score",
    "Mult_acc_5",
    "Mult_acc_7",
    "MAE",
    "Corr",
)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x).reshape(-1)


def weighted_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """sklearn's ``f1_score(truth, pred, average="weighted")`` for label arrays of any dtype."""
    truth = np.asarray(truth).reshape(-1)
    pred = np.asarray(pred).reshape(-1)
    if truth.shape != pred.shape:
        raise ValueError(f"truth and pred: expected the same shape, got {truth.shape} and {pred.shape}")
    if truth.size == 0:
        return float("nan")
    total = 0.0
    for c in np.union1d(truth, pred):
        t, p = truth == c, pred == c
        tp = float(np.sum(t & p))
        denom = 2 * tp + float(np.sum(~t & p)) + float(np.sum(t & ~p))
        total += float(np.sum(t)) * (2 * tp / denom if denom > 0 else 0.0)
    return total / truth.size


def _multiclass_acc(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sum(np.round(pred) == np.round(truth)) / float(len(truth)))


def mosi_regression_metrics(preds, truth) -> dict[str, float]:
    """MMSA's MOSI/MOSEI regression metrics, keys :data:`METRIC_KEYS`, rounded to 4 places."""
    p, y = _to_numpy(preds), _to_numpy(truth)
    if p.shape != y.shape:
        raise ValueError(f"preds and truth: expected the same length, got {p.shape[0]} and {y.shape[0]}")
    if p.size == 0:
        raise ValueError("preds: expected at least one sample, got 0")
    mae = float(np.mean(np.absolute(p - y)).astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = float(np.corrcoef(p, y)[0][1]) if p.size > 1 else float("nan")
    mult_a7 = _multiclass_acc(np.clip(p, -3.0, 3.0), np.clip(y, -3.0, 3.0))
    mult_a5 = _multiclass_acc(np.clip(p, -2.0, 2.0), np.clip(y, -2.0, 2.0))

    nz = y != 0
    if nz.any():
        nz_truth, nz_pred = y[nz] > 0, p[nz] > 0
        non0_acc2 = float(np.mean(nz_truth == nz_pred))
        non0_f1 = weighted_f1(nz_truth, nz_pred)
    else:
        non0_acc2 = non0_f1 = float("nan")
    has_truth, has_pred = y >= 0, p >= 0
    acc2 = float(np.mean(has_truth == has_pred))
    f1 = weighted_f1(has_truth, has_pred)
    values = (acc2, f1, non0_acc2, non0_f1, mult_a5, mult_a7, mae, corr)
    return {k: round(float(v), 4) for k, v in zip(METRIC_KEYS, values)}


def format_metrics(metrics: dict[str, float]) -> str:
    """One line, MMSA's order: ``Has0_acc_2: 0.8123  Has0_F1_score: ...``."""
    return "  ".join(f"{k}: {metrics[k]:.4f}" for k in METRIC_KEYS if k in metrics)


def format_mean_std(summary: dict | None, key: str = "") -> str:
    """A ``{"mean": ..., "std": ...}`` summary (of metric ``key`` when the two are metric
    dicts) as ``"0.7512 ± 0.0100"``: ``"0.7512"`` when the std is 0 or absent, ``"nan"`` for
    a mean stored as ``null``, ``"—"`` for no summary. The one formatter of robustness
    summaries (``msa-fast eval --robustness``, :func:`msa_fast.robustness.markdown_table`)."""
    if not summary:
        return "—"
    m, s = (summary["mean"][key], summary["std"][key]) if key else (summary["mean"], summary.get("std"))
    if m is None:
        return "nan"
    return f"{m:.4f} ± {s:.4f}" if s else f"{m:.4f}"
