"""MMSA metrics: hand-computed cases, edge cases, weighted-F1 definition, results CSV."""
import math
import warnings

import numpy as np
import pytest
import torch

from msa_fast.metrics import (
    MOSI_METRICS, SIMS_METRICS, compute_metrics, get_metrics, pearson, results_row, weighted_f1, write_results_csv,
)

PRED = np.array([1.5, -0.5, 0.0, 2.5, -2.6, 0.4])
TRUTH = np.array([2.0, -1.0, 0.0, 2.0, -3.0, -0.2])


def test_mosi_hand_computed():
    m = compute_metrics(PRED, TRUTH, "mosi")
    assert list(m) == list(MOSI_METRICS)
    assert m["Has0_acc_2"] == round(5 / 6, 4)
    # classes t>=0: True (3: rows 0,2,3) F1 = 2*3/(2*3+1) ; False (3) F1 = 2*2/(2*2+1)
    assert m["Has0_F1_score"] == round((3 * 6 / 7 + 3 * 4 / 5) / 6, 4)
    assert m["Non0_acc_2"] == 0.8 and m["Non0_F1_score"] == 0.8  # row 2 (t == 0) excluded
    assert m["Mult_acc_7"] == round(5 / 6, 4)  # -0.5 rounds to -0 (half to even) != -1
    assert m["Mult_acc_5"] == round(5 / 6, 4)  # 2.5 and -2.6 clipped to ±2 first
    assert m["MAE"] == round(2.5 / 6, 4)
    assert m["Corr"] == round(float(np.corrcoef(PRED, TRUTH)[0, 1]), 4)


def test_round_half_to_even_and_clipping():
    # 2.5 -> 2 == 2, 0.5 -> 0 == 0, -1.5 -> -2 == -2, 3.4 clipped to 3 == 3: all equal under half-to-even
    pred = np.array([2.5, 0.5, -1.5, 3.4])
    truth = np.array([2.0, 0.0, -2.0, 3.0])
    assert compute_metrics(pred, truth)["Mult_acc_7"] == 1.0
    # half away from zero would map 2.5 -> 3 != 2: check the opposite case fails
    assert compute_metrics(np.array([3.5, 1.0]), np.array([3.0, 1.0]))["Mult_acc_7"] == 1.0  # clip 3.5 -> 3
    assert compute_metrics(np.array([1.5, 1.0]), np.array([1.0, 1.0]))["Mult_acc_7"] == 0.5  # 1.5 -> 2
    assert compute_metrics(np.array([2.4, 1.0]), np.array([2.0, 1.0]))["Mult_acc_5"] == 1.0


def test_zero_labels_has0_vs_non0():
    pred = np.array([-0.1, 0.2, 1.0, -1.0])
    truth = np.array([0.0, 0.0, 1.0, -1.0])
    m = compute_metrics(pred, truth)
    assert m["Has0_acc_2"] == 0.75  # t = 0 counts as non-negative; p = -0.1 is negative
    assert m["Non0_acc_2"] == 1.0  # both zero labels excluded


def test_weighted_f1_is_truth_weighted_and_asymmetric():
    t, p = np.array([1, 1, 1, 0]), np.array([1, 1, 0, 0])
    assert weighted_f1(t, p) == pytest.approx((3 * 0.8 + 1 * 2 / 3) / 4)
    assert weighted_f1(p, t) == pytest.approx((0.8 + 2 / 3) / 2)
    assert weighted_f1(t, p) != pytest.approx(weighted_f1(p, t))


def _f1_loop(truth, pred):
    """Independent per-class loop implementation of sklearn's weighted F1."""
    total, n = 0.0, len(truth)
    for c in set(truth.tolist()) | set(pred.tolist()):
        tp = sum(1 for a, b in zip(truth, pred) if a == c and b == c)
        fp = sum(1 for a, b in zip(truth, pred) if a != c and b == c)
        fn = sum(1 for a, b in zip(truth, pred) if a == c and b != c)
        f1 = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
        total += f1 * sum(1 for a in truth if a == c)
    return total / n


@pytest.mark.parametrize("seed", range(5))
def test_weighted_f1_matches_loop(seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 3, 40)
    p = rng.integers(0, 2 + seed % 2, 40)
    assert weighted_f1(t, p) == pytest.approx(_f1_loop(t, p))


def test_weighted_f1_single_class_and_sklearn_if_available():
    assert weighted_f1(np.array([1, 1]), np.array([1, 1])) == 1.0
    assert weighted_f1(np.array([1, 1]), np.array([0, 0])) == 0.0
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 2, 50) > 0, rng.integers(0, 2, 50) > 0
    assert weighted_f1(t, p) == pytest.approx(sk.f1_score(t, p, average="weighted"))


def test_sims_bins_edges_float32():
    # bins are lower-open / upper-closed; float32 values at the edges compare in float32 as in MMSA
    pred = np.array([-1.5, -0.7, -0.1, 0.1, 0.0, 0.7, 0.71, 1.2], dtype=np.float32)
    truth = np.array([-1.0, -0.69, -0.09, 0.1, 0.01, 0.7, 0.7, 1.0], dtype=np.float32)
    m = compute_metrics(pred, truth, "sims", round_digits=None)
    assert list(m) == list(SIMS_METRICS)
    # 2 classes (<= 0 | > 0): agree on rows 0,1,2,3,5,6,7; row 4: 0.0 -> 0 vs 0.01 -> 1
    assert m["Mult_acc_2"] == pytest.approx(7 / 8)
    # 3 classes edges -0.1, 0.1: pred [0,0,0,1,1,2,2,2] truth [0,0,1,1,1,2,2,2]
    assert m["Mult_acc_3"] == pytest.approx(7 / 8)
    # 5 classes edges -0.7,-0.1,0.1,0.7: pred [0,0,1,2,2,3,4,4] truth [0,1,2,2,2,3,3,4]
    assert m["Mult_acc_5"] == pytest.approx(5 / 8)
    clipped = np.clip(pred.astype(np.float64), -1, 1)
    assert m["MAE"] == pytest.approx(np.mean(np.abs(clipped - truth.astype(np.float64))), rel=1e-6)


def test_constant_prediction_corr_nan_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(np.zeros(5), np.array([1.0, -1.0, 2.0, 0.5, 0.0]))
    assert math.isnan(m["Corr"])
    assert math.isnan(pearson(np.ones(3), np.arange(3)))


def test_all_zero_truth_non0_nan():
    m = compute_metrics(np.array([0.5, -0.5]), np.zeros(2))
    assert math.isnan(m["Non0_acc_2"]) and math.isnan(m["Non0_F1_score"])


def test_rounding_option_and_torch_input():
    rng = np.random.default_rng(1)
    p, t = rng.normal(size=30), rng.uniform(-3, 3, 30)
    raw = compute_metrics(p, t, round_digits=None)
    rounded = compute_metrics(torch.tensor(p).view(-1, 1), torch.tensor(t), "mosei")
    for k in raw:
        assert rounded[k] == round(raw[k], 4)
    assert get_metrics("MOSI")(p, t) == compute_metrics(p, t)


def test_bad_input():
    with pytest.raises(ValueError, match="dataset"):
        compute_metrics([1.0], [1.0], "iemocap")
    with pytest.raises(ValueError, match="same number"):
        compute_metrics([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        compute_metrics([np.nan, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="dataset"):
        get_metrics("x")


def test_results_row_and_csv(tmp_path):
    runs = [{"MAE": 0.70, "Corr": 0.80}, {"MAE": 0.72, "Corr": 0.78}]
    row = results_row(runs)
    assert row == {"MAE": (71.0, 1.0), "Corr": (79.0, 1.0)}
    path = tmp_path / "res.csv"
    write_results_csv(path, "lnln", row)
    write_results_csv(path, "hme", row)
    lines = path.read_text().splitlines()
    assert lines == ["Model,MAE,Corr", 'lnln,"(71.0, 1.0)","(79.0, 1.0)"', 'hme,"(71.0, 1.0)","(79.0, 1.0)"']
    with pytest.raises(ValueError, match="columns"):
        write_results_csv(path, "x", {"MAE": (1.0, 0.0)})
    with pytest.raises(ValueError, match="metrics"):
        results_row([{"MAE": 1.0}, {"Corr": 1.0}])
