"""Statistics of estimates against the retrained truth (DESIGN §7): rank agreement, the R² of the order effect
against the `naive` baseline (a skill score: 0 is no better than "order does not matter", 1 is exact), signed and
absolute perplexity errors, and stratified bootstrap confidence intervals. The one home of rank correlations and
bootstraps in the suite."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats


def rank_correlation(x: Sequence[float], y: Sequence[float], kind: str = "spearman") -> float | None:
    """Spearman or Kendall correlation, or None where it is undefined (fewer than 3 values, a constant side,
    or a non-finite value)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    fn = stats.spearmanr if kind == "spearman" else stats.kendalltau
    return float(fn(x, y).statistic)


def r2_order_effect(est: np.ndarray, true: np.ndarray, naive: float) -> float | None:
    """1 − Σ(est − true)² / Σ(naive − true)²: the skill of the estimate against "order does not matter"."""
    den = np.sum((naive - true) ** 2)
    return float(1 - np.sum((est - true) ** 2) / den) if den > 0 else None


def bootstrap_ci(statistic: Callable[[np.ndarray], float | None], strata: Sequence[int], n_boot: int,
                 seed: int) -> list[float] | None:
    """95% percentile interval of `statistic(indices)` over resamples drawn within each stratum (each order
    family keeps its size, so a pooled interval is not a different mix of families)."""
    strata = np.asarray(strata)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(g, len(g)) for g in groups])
        v = statistic(idx)
        if v is not None and np.isfinite(v):
            values.append(v)
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None


def mean_ci(values: Sequence[float], n_boot: int, seed: int) -> tuple[float, float]:
    """95% interval of the mean of `values` (one value: that value)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 1:
        return float(x[0]), float(x[0])
    lo, hi = bootstrap_ci(lambda i: float(x[i].mean()), [0] * len(x), n_boot, seed)
    return lo, hi


METRICS = ("spearman", "kendall", "r2_order_effect", "bias_ppl", "absdiff_ppl", "rel_err")


def accuracy(est_loss: np.ndarray, true_loss: np.ndarray, naive_loss: float, n_boot: int, seed: int,
             strata: Sequence[int] | None = None) -> dict:
    """Accuracy of estimated against true final eval losses, with bootstrap CIs (stratified by `strata`). An
    estimator that diverged (a non-finite estimate, or a loss whose perplexity is beyond float range) gets None
    and a count of them."""
    est_loss, true_loss = np.asarray(est_loss, dtype=float), np.asarray(true_loss, dtype=float)
    n = len(true_loss)
    with np.errstate(over="ignore", invalid="ignore"):
        est_ppl, true_ppl = np.exp(est_loss), np.exp(true_loss)
    n_bad = int(np.sum(~np.isfinite(est_ppl)))
    if n_bad:
        return {**dict.fromkeys(METRICS), **{f"{k}_ci": None for k in METRICS}, "n": n, "n_non_finite": n_bad}

    def metric(name: str, i: np.ndarray):
        e, t = est_loss[i], true_loss[i]
        if name in ("spearman", "kendall"):
            return rank_correlation(e, t, name)
        if name == "r2_order_effect":
            return r2_order_effect(e, t, naive_loss)
        err = est_ppl[i] - true_ppl[i]
        return float({"bias_ppl": err.mean(), "absdiff_ppl": np.abs(err).mean(),
                      "rel_err": (np.abs(err) / true_ppl[i]).mean()}[name])

    everything = np.arange(n)
    out = {name: metric(name, everything) for name in METRICS}
    strata = [0] * n if strata is None else strata
    out.update({f"{name}_ci": bootstrap_ci(lambda i, name=name: metric(name, i), strata, n_boot, seed)
                for name in METRICS})
    return {**out, "n": n, "n_non_finite": 0}
