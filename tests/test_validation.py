"""Accuracy metrics against retraining: the R² of the order effect, and diverged estimators reported as such."""
import json

import numpy as np
import pytest

from fut.validation import accuracy, r2_order_effect

TRUE = np.array([5.50, 5.52, 5.57, 5.60, 5.61])
NAIVE = 5.56


def test_exact_estimates_score_one_and_naive_scores_zero():
    exact = accuracy(TRUE.copy(), TRUE, NAIVE, 50, 0)
    assert exact["r2_order_effect"] == 1.0 and exact["spearman"] == pytest.approx(1.0) and exact["absdiff_ppl"] == 0
    assert r2_order_effect(np.full(5, NAIVE), TRUE, NAIVE) == 0.0
    assert accuracy(np.full(5, NAIVE), TRUE, NAIVE, 50, 0)["spearman"] is None      # a constant has no ranking


@pytest.mark.parametrize("bad", [np.nan, np.inf, 800.0])     # exp(800) overflows: the PPL is not a number
def test_diverged_estimates_are_counted_and_leave_no_number_that_json_refuses(bad):
    est = TRUE.copy()
    est[2] = bad
    out = accuracy(est, TRUE, NAIVE, 50, 0)
    assert out["n_non_finite"] == 1 and out["r2_order_effect"] is None and out["absdiff_ppl"] is None
    json.dumps(out, allow_nan=False)
