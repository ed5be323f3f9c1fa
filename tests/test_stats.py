"""Accuracy metrics against retraining: the R² of the order effect (a skill score against naive), the signed
error, diverged estimators reported as such, and bootstrap intervals that keep each family's size."""
import json

import numpy as np
import pytest

from fut.stats import (accuracy, bootstrap_ci, r2_order_effect, rank_correlation, resamples,
                       rowwise_r2_order_effect, rowwise_rank_correlation)

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
    ci = bootstrap_ci(lambda i: seen.append(i) or (np.asarray(strata)[i] == 1).sum(axis=1), strata, 40, 0)
    assert ci == [3.0, 3.0] and len(seen) == 1 and seen[0].shape == (40, 10)    # one call scores every resample
    free = bootstrap_ci(lambda i: (np.asarray(strata)[i] == 1).sum(axis=1), [0] * 10, 200, 0)
    assert free[0] < 3.0 < free[1]                          # unstratified, the mix of families varies


def test_undefined_resamples_are_left_out_of_the_interval():
    """A statistic undefined (NaN) on some resamples: the interval is that of the others; on all: None."""
    x = np.arange(10.0)
    assert bootstrap_ci(lambda i: np.where(i[:, 0] % 2 == 0, x[i].mean(axis=1), np.nan), [0] * 10, 200, 0) is not None
    assert bootstrap_ci(lambda i: np.full(len(i), np.nan), [0] * 10, 200, 0) is None


@pytest.mark.parametrize("kind", ["spearman", "kendall"])
def test_rowwise_rank_correlation_is_scipys_on_every_row(kind):
    """The vectorised Spearman and Kendall tau-b of the bootstrap equal scipy's row by row, ties included (rounded
    rows and the repeated indices of a resample), and are NaN exactly where rank_correlation is None."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 9))
    y = np.round(x + rng.normal(size=x.shape), 0)                     # many ties
    y[:5] = 1.0                                                       # constant rows: no ranking
    x[5:10] = x[5:10, rng.integers(0, 9, 9)]                          # a resample's repeated indices
    got = rowwise_rank_correlation(x, y, kind)
    ref = np.array([np.nan if (r := rank_correlation(a, b, kind)) is None else r for a, b in zip(x, y)])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[~np.isnan(got)], ref[~np.isnan(ref)], rtol=0, atol=1e-14)
    assert np.isnan(rowwise_rank_correlation(x[:, :2], y[:, :2], kind)).all()     # fewer than 3 values


def test_kendall_in_chunks_of_rows_is_the_same(monkeypatch):
    """The pairwise signs are built a few rows at a time (bounded memory for many orders): the same taus."""
    import fut.stats
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 9)), np.round(rng.normal(size=(50, 9)), 0)
    whole = rowwise_rank_correlation(x, y, "kendall")
    monkeypatch.setattr(fut.stats, "KENDALL_PAIRS", 3 * 9 * 9)           # 3 rows at a time
    np.testing.assert_array_equal(rowwise_rank_correlation(x, y, "kendall"), whole)


def test_interval_of_a_metric_is_the_percentiles_of_that_metric_on_each_resample():
    """accuracy's intervals against a direct loop over the same resamples with the scalar metrics."""
    rng = np.random.default_rng(1)
    true = rng.normal(5.5, 0.03, 12)
    est = true + rng.normal(0, 0.01, 12)
    strata = [0] * 8 + [1] * 4
    out = accuracy(est, true, 5.5, 300, 3, strata)
    idx = resamples(strata, 300, 3)
    r2 = [r2_order_effect(est[i], true[i], 5.5) for i in idx]
    rho = [rank_correlation(est[i], true[i]) for i in idx]
    assert out["r2_order_effect_ci"] == pytest.approx(list(np.percentile(r2, [2.5, 97.5])), abs=1e-14)
    assert out["spearman_ci"] == pytest.approx(list(np.percentile(rho, [2.5, 97.5])), abs=1e-14)


def test_r2_order_effect_is_the_skill_against_naive_and_undefined_without_spread():
    true = np.array([1.0, 3.0, 2.0])
    assert r2_order_effect(np.array([1.5, 3.0, 2.0]), true, 2.0) == 1 - 0.25 / 2     # 1 − Σ(e − t)² / Σ(n − t)²
    assert r2_order_effect(np.array([1.0, 2.0, 3.0]), true, 2.0) == 0.0
    assert r2_order_effect(true, np.full(3, 2.0), 2.0) is None                        # every order at naive
    rows = np.array([[1.5, 3.0, 2.0], [1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    truths = np.array([true, true, np.full(3, 2.0)])
    np.testing.assert_array_equal(rowwise_r2_order_effect(rows, truths, 2.0), [0.875, 0.0, np.nan])
