"""Accuracy of estimates against the retrained truth (DESIGN §7): rank agreement, R² of the order effect
against the `naive` baseline, perplexity errors, with bootstrap confidence intervals."""
from __future__ import annotations

import numpy as np
from scipy import stats


def r2_order_effect(est: np.ndarray, true: np.ndarray, naive: float) -> float:
    """1 − Σ(est − true)² / Σ(naive − true)²: 0 is no better than "order does not matter", 1 is exact."""
    return float(1 - np.sum((est - true) ** 2) / np.sum((naive - true) ** 2))


def _rank(fn, est, true) -> float | None:
    """Rank correlation, or None where it is undefined (a constant estimate, like `naive`'s)."""
    if np.ptp(est) == 0 or np.ptp(true) == 0:
        return None
    return float(fn(est, true).statistic)


def accuracy(est_loss: np.ndarray, true_loss: np.ndarray, naive_loss: float, n_boot: int, seed: int) -> dict:
    """Accuracy metrics; an estimator that diverged (a non-finite estimate, or a loss whose perplexity exp(loss)
    is beyond float range) gets None and a count of them."""
    with np.errstate(over="ignore", invalid="ignore"):
        n_bad = int(np.sum(~np.isfinite(np.exp(est_loss))))
    if n_bad:
        keys = ("spearman", "kendall", "r2_order_effect", "absdiff_ppl", "rel_err",
                "spearman_ci", "kendall_ci", "r2_order_effect_ci")
        return {**dict.fromkeys(keys), "n_orders": int(len(true_loss)), "n_non_finite": n_bad}
    with np.errstate(over="ignore"):
        est_ppl, true_ppl = np.exp(est_loss), np.exp(true_loss)
    out = {
        "n_non_finite": 0,
        "spearman": _rank(stats.spearmanr, est_loss, true_loss),
        "kendall": _rank(stats.kendalltau, est_loss, true_loss),
        "r2_order_effect": r2_order_effect(est_loss, true_loss, naive_loss),
        "absdiff_ppl": float(np.mean(np.abs(est_ppl - true_ppl))),
        "rel_err": float(np.mean(np.abs(est_ppl - true_ppl) / true_ppl)),
        "n_orders": int(len(true_loss)),
    }
    rng = np.random.default_rng(seed)
    boots = {"spearman": [], "kendall": [], "r2_order_effect": []}
    for _ in range(n_boot):
        i = rng.integers(0, len(true_loss), len(true_loss))
        if np.sum((naive_loss - true_loss[i]) ** 2) == 0:
            continue
        boots["spearman"].append(_rank(stats.spearmanr, est_loss[i], true_loss[i]))
        boots["kendall"].append(_rank(stats.kendalltau, est_loss[i], true_loss[i]))
        boots["r2_order_effect"].append(r2_order_effect(est_loss[i], true_loss[i], naive_loss))
    for key, vals in boots.items():
        vals = [v for v in vals if v is not None]
        out[f"{key}_ci"] = [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if vals else None
    return out
