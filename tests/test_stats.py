"""Accuracy metrics against retraining: the R² of the order effect (a skill score against naive), the signed
error, diverged estimators reported as such, and bootstrap intervals that keep each family's size."""
import json

import numpy as np
import pytest

from fut.stats import accuracy, bootstrap_ci, r2_order_effect

TRUE = np.array([5.50, 5.52, 5.57, 5.60, 5.61])
NAIVE = 5.56


def test_exact_estimates_score_one_and_naive_scores_zero():
    exact = accuracy(TRUE.copy(), TRUE, NAIVE, 50, 0)
    assert exact["r2_order_effect"] == 1.0 and exact["spearman"] == pytest.approx(1.0) and exact["absdiff_ppl"] == 0
    assert r2_order_effect(np.full(5, NAIVE), TRUE, NAIVE) == 0.0
    assert accuracy(np.full(5, NAIVE), TRUE, NAIVE, 50, 0)["spearman"] is None      # a constant has no ranking


def test_bias_is_the_mean_signed_error_in_ppl():
    """Every estimate too high by the same factor: the bias is that mean PPL excess, the ranking still perfect."""
    est = TRUE + np.log(1.01)
    out = accuracy(est, TRUE, NAIVE, 50, 0)
    assert out["bias_ppl"] == pytest.approx(0.01 * np.exp(TRUE).mean(), rel=1e-9)
    assert out["bias_ppl"] == pytest.approx(out["absdiff_ppl"]) and out["spearman"] == pytest.approx(1.0)
    assert accuracy(TRUE - np.log(1.01), TRUE, NAIVE, 50, 0)["bias_ppl"] < 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, 800.0])     # exp(800) overflows: the PPL is not a number
def test_diverged_estimates_are_counted_and_leave_no_number_that_json_refuses(bad):
    est = TRUE.copy()
    est[2] = bad
    out = accuracy(est, TRUE, NAIVE, 50, 0)
    assert out["n_non_finite"] == 1 and out["r2_order_effect"] is None and out["absdiff_ppl"] is None
    json.dumps(out, allow_nan=False)


def test_stratified_bootstrap_keeps_every_strata_size():
    """Each resample draws within each stratum: a statistic that counts stratum 1's members is constant."""
    strata = [0] * 7 + [1] * 3
    seen = []
    ci = bootstrap_ci(lambda i: seen.append(i) or float(np.sum(np.asarray(strata)[i] == 1)), strata, 40, 0)
    assert ci == [3.0, 3.0] and len(seen) == 40 and all(len(i) == 10 for i in seen)
    free = bootstrap_ci(lambda i: float(np.sum(np.asarray(strata)[i] == 1)), [0] * 10, 200, 0)
    assert free[0] < 3.0 < free[1]                          # unstratified, the mix of families varies
