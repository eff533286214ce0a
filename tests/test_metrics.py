"""MMSA regression metrics vs an independent implementation of MMSA's definition (sklearn)."""

import math

import numpy as np
import pytest
import torch

from msa_fast.metrics import METRIC_KEYS, mosi_regression_metrics, weighted_f1

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def mmsa_reference(y_pred, y_true):
    """MMSA metricsTop.__eval_mosei_regression, transcribed."""
    test_preds = np.asarray(y_pred).reshape(-1)
    test_truth = np.asarray(y_true).reshape(-1)
    test_preds_a7 = np.clip(test_preds, a_min=-3.0, a_max=3.0)
    test_truth_a7 = np.clip(test_truth, a_min=-3.0, a_max=3.0)
    test_preds_a5 = np.clip(test_preds, a_min=-2.0, a_max=2.0)
    test_truth_a5 = np.clip(test_truth, a_min=-2.0, a_max=2.0)
    mae = np.mean(np.absolute(test_preds - test_truth)).astype(np.float64)
    corr = np.corrcoef(test_preds, test_truth)[0][1]

    def mult(p, t):
        return np.sum(np.round(p) == np.round(t)) / float(len(t))

    non_zeros = np.array([i for i, e in enumerate(test_truth) if e != 0])
    nz_truth = test_truth[non_zeros] > 0
    nz_preds = test_preds[non_zeros] > 0
    acc = sklearn_metrics.accuracy_score
    f1 = sklearn_metrics.f1_score
    return {
        "Has0_acc_2": round(acc(test_preds >= 0, test_truth >= 0), 4),
        "Has0_F1_score": round(f1(test_truth >= 0, test_preds >= 0, average="weighted"), 4),
        "Non0_acc_2": round(acc(nz_preds, nz_truth), 4),
        "Non0_F1_score": round(f1(nz_truth, nz_preds, average="weighted"), 4),
        "Mult_acc_5": round(mult(test_preds_a5, test_truth_a5), 4),
        "Mult_acc_7": round(mult(test_preds_a7, test_truth_a7), 4),
        "MAE": round(float(mae), 4),
        "Corr": round(float(corr), 4),
    }


def test_hand_case_with_zero_labels():
    truth = np.array([0.0, 0.0, 1.2, -2.6, 2.4, -0.4])
    preds = np.array([0.3, -0.2, 0.8, -1.0, -0.1, -0.6])
    m = mosi_regression_metrics(preds, truth)
    assert tuple(m) == METRIC_KEYS
    # Has0: truth>=0 = [T,T,T,F,T,F], preds>=0 = [T,F,T,F,F,F] -> 4/6 agree.
    assert m["Has0_acc_2"] == round(4 / 6, 4)
    # Non0 drops the two zeros: truth>0 = [T,F,T,F], preds>0 = [T,F,F,F] -> 3/4.
    assert m["Non0_acc_2"] == 0.75
    # Weighted F1 of Non0 by hand: class T: tp 1, fp 0, fn 1 -> 2/3, support 2;
    # class F: tp 2, fp 1, fn 0 -> 4/5, support 2 -> (2/3 + 4/5) / 2.
    assert m["Non0_F1_score"] == round((2 / 3 + 4 / 5) / 2, 4)
    # Mult_acc_7: round(clip) truth [0,0,1,-3,2,-0], preds [0,-0,1,-1,-0,-1] -> 3/6.
    assert m["Mult_acc_7"] == 0.5
    # Mult_acc_5: truth clipped [0,0,1.2,-2,2,-0.4] -> [0,0,1,-2,2,-0] -> same 3/6.
    assert m["Mult_acc_5"] == 0.5
    assert m["MAE"] == round(float(np.mean(np.abs(preds - truth))), 4)
    assert m == mmsa_reference(preds, truth)


def test_half_to_even_rounding():
    # np.round(2.5) == 2, np.round(-0.5) == -0: MMSA's rounding, not half-up.
    m = mosi_regression_metrics([2.5, -0.5], [2.0, 0.0])
    assert m["Mult_acc_7"] == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_random_vs_mmsa_definition(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    truth = np.round(rng.uniform(-3, 3, n) * 3) / 3  # MOSEI-like thirds, some exact zeros
    truth[rng.random(n) < 0.15] = 0.0
    preds = rng.normal(0, 1.8, n).astype(np.float32)
    preds[rng.random(n) < 0.05] = 0.0  # predictions at exactly 0 count as >= 0, not > 0
    ours = mosi_regression_metrics(torch.from_numpy(preds), torch.from_numpy(truth))
    ref = mmsa_reference(preds, truth)
    for k in METRIC_KEYS:
        assert math.isclose(ours[k], ref[k], abs_tol=1e-4 + 1e-12), (k, ours[k], ref[k])


@pytest.mark.parametrize("seed", range(8))
def test_weighted_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    k = int(rng.integers(1, 4))
    truth, pred = rng.integers(0, k, n), rng.integers(0, k + 1, n)  # pred may hold unseen class
    ref = sklearn_metrics.f1_score(truth, pred, average="weighted", zero_division=0)
    assert math.isclose(weighted_f1(truth, pred), ref, rel_tol=1e-12, abs_tol=1e-12)


def test_all_one_class_and_constant_preds():
    m = mosi_regression_metrics([1.0, 1.0, 1.0], [0.5, 2.0, 1.0])
    assert m["Has0_acc_2"] == 1.0 and m["Has0_F1_score"] == 1.0
    assert math.isnan(m["Corr"])


def test_bad_input():
    with pytest.raises(ValueError, match="preds and truth"):
        mosi_regression_metrics([1.0, 2.0], [1.0])
