"""Statistics of estimates against the retrained truth (DESIGN §7): rank agreement, the R² of the order effect
against the `naive` baseline (a skill score: 0 is no better than "order does not matter", 1 is exact), signed and
absolute perplexity errors, and stratified bootstrap confidence intervals. The one home of rank correlations and
bootstraps in the suite."""
from __future__ import annotations

import math
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
    r2 = float(rowwise_r2_order_effect(np.asarray(est, dtype=float)[None], np.asarray(true, dtype=float)[None],
                                       naive)[0])
    return None if math.isnan(r2) else r2


def rowwise_r2_order_effect(est: np.ndarray, true: np.ndarray, naive: float) -> np.ndarray:
    """`r2_order_effect` of every row of [B, m] estimates and true losses, NaN where undefined (no spread)."""
    den = ((naive - true) ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, 1 - ((est - true) ** 2).sum(axis=1) / den, np.nan)


def resamples(strata: Sequence[int], n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] indices, each row drawn with replacement within each stratum (each order family keeps its
    size, so a pooled interval is not a different mix of families)."""
    strata = np.asarray(strata)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    rng = np.random.default_rng(seed)
    return np.stack([np.concatenate([rng.choice(g, len(g)) for g in groups]) for _ in range(n_boot)])


def interval(values: np.ndarray) -> list[float] | None:
    """95% percentile interval of the finite values (NaN marks a resample whose statistic is undefined)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else None


def bootstrap_ci(statistic: Callable[[np.ndarray], np.ndarray], strata: Sequence[int], n_boot: int,
                 seed: int) -> list[float] | None:
    """95% percentile interval of a statistic over stratified resamples. `statistic` maps the [n_boot, n]
    matrix of resampled indices to one value per resample (NaN where undefined): every resample is scored in
    one vectorised call."""
    return interval(statistic(resamples(strata, n_boot, seed)))


def mean_ci(values: Sequence[float], n_boot: int, seed: int) -> tuple[float, float]:
    """95% interval of the mean of `values` (one value: that value)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 1:
        return float(x[0]), float(x[0])
    lo, hi = bootstrap_ci(lambda i: x[i].mean(axis=1), [0] * len(x), n_boot, seed)
    return lo, hi


# Pairwise signs held at once by the vectorised Kendall tau (about 100 MB whatever the number of orders).
KENDALL_PAIRS = 2 ** 22


def rowwise_rank_correlation(x: np.ndarray, y: np.ndarray, kind: str = "spearman") -> np.ndarray:
    """rank_correlation of each row pair of two [B, n] arrays at once, NaN where it is None. Spearman: Pearson
    correlation of average ranks; Kendall: tau-b, (concordant − discordant) pairs over the square roots of the
    pairs untied in x and untied in y, as scipy computes them."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out = np.full(x.shape[0], np.nan)
    ok = (x.shape[1] >= 3) & (np.ptp(x, axis=1) > 0) & (np.ptp(y, axis=1) > 0)
    x, y = x[ok], y[ok]
    if kind == "spearman":
        rx, ry = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
        rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
        r = (rx * ry).sum(axis=1) / np.sqrt((rx * rx).sum(axis=1)) / np.sqrt((ry * ry).sum(axis=1))
    else:
        rows = max(1, KENDALL_PAIRS // x.shape[1] ** 2)
        r = np.concatenate([_tau_b(x[a: a + rows], y[a: a + rows]) for a in range(0, len(x), rows)] or [np.empty(0)])
    out[ok] = np.clip(r, -1.0, 1.0)
    return out


def _tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair, from the signs of every pair's differences ([B, n, n] at once)."""
    upper = np.triu(np.ones((x.shape[1],) * 2, dtype=bool), k=1)
    sx = np.sign(x[:, :, None] - x[:, None, :])[:, upper]
    sy = np.sign(y[:, :, None] - y[:, None, :])[:, upper]
    return (sx * sy).sum(axis=1) / np.sqrt((sx * sx).sum(axis=1)) / np.sqrt((sy * sy).sum(axis=1))


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

    def metric(name: str, i: np.ndarray) -> np.ndarray:
        """The metric of every row of the index matrix `i` ([B, m]), NaN where undefined."""
        e, t = est_loss[i], true_loss[i]
        if name in ("spearman", "kendall"):
            return rowwise_rank_correlation(e, t, name)
        if name == "r2_order_effect":
            return rowwise_r2_order_effect(e, t, naive_loss)
        err = est_ppl[i] - true_ppl[i]
        return {"bias_ppl": err.mean(axis=1), "absdiff_ppl": np.abs(err).mean(axis=1),
                "rel_err": (np.abs(err) / true_ppl[i]).mean(axis=1)}[name]

    def point(name: str) -> float | None:
        if name in ("spearman", "kendall"):
            return rank_correlation(est_loss, true_loss, name)
        if name == "r2_order_effect":
            return r2_order_effect(est_loss, true_loss, naive_loss)
        return float(metric(name, np.arange(n)[None])[0])

    out = {name: point(name) for name in METRICS}
    idx = resamples([0] * n if strata is None else strata, n_boot, seed)
    out.update({f"{name}_ci": interval(metric(name, idx)) for name in METRICS})
    return {**out, "n": n, "n_non_finite": 0}
