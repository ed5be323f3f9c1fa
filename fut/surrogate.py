"""A surrogate of an estimator for searches: the additive position model

    loss(σ) ≈ c + Σ_t W[σ(t), t]        (W[j, t]: what batch j contributes at position t),

fitted by ridge regression to the estimator's estimates of seeded random orders (no retraining). Scoring an
order is T table look-ups, so a search scores millions of orders per second with it; its exact minimiser is a
linear assignment problem. It keeps the estimator's first-order placement effects and drops interactions between
positions (the momentum and curvature couplings the estimator replays): how much that costs is measured on the
test orders (fut/stages/estimate.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix


@dataclass
class PositionModel:
    mean: float
    W: np.ndarray                       # [T, T]: batch j at position t

    def score(self, orders: np.ndarray) -> np.ndarray:
        """Estimated losses of orders [n, T] (int) [n]."""
        S = np.asarray(orders)
        return self.mean + self.W[S, np.arange(S.shape[1])].sum(1)

    def minimiser(self, noise: np.ndarray | None = None) -> list[int]:
        """The order minimising Σ_t (W + noise)[σ(t), t]."""
        rows, cols = linear_sum_assignment(self.W if noise is None else self.W + noise)
        order = [0] * len(cols)
        for j, t in zip(rows, cols):
            order[t] = int(j)
        return order


def fit(orders: Sequence[Sequence[int]], losses: Sequence[float], ridge: float = 1.0) -> PositionModel:
    """Ridge regression of the centred losses on one-hot placements (T² features; non-finite losses left out).
    The design matrix is sparse (T ones per order): its normal equations cost T⁴, not n·T⁴."""
    S = np.asarray(orders)
    y = np.asarray(losses, dtype=float)
    ok = np.isfinite(y)
    S, y = S[ok], y[ok]
    n, T = S.shape
    X = csr_matrix((np.ones(n * T), (np.repeat(np.arange(n), T), (S * T + np.arange(T)).ravel())), shape=(n, T * T))
    mean = float(y.mean())
    w = np.linalg.solve((X.T @ X).toarray() + ridge * np.eye(T * T), X.T @ (y - mean))
    return PositionModel(mean, w.reshape(T, T))


def random_orders(T: int, n: int, seed: int) -> np.ndarray:
    """n seeded random permutations of range(T) [n, T]."""
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n, T)), axis=1)


def fit_to_estimator(estimate: Callable[[np.ndarray], np.ndarray], T: int, calls: int, seed: int,
                     ridge: float = 1.0) -> PositionModel:
    """The surrogate of `estimate(orders [n, T]) -> losses [n]` from `calls` seeded random orders (one batch)."""
    orders = random_orders(T, calls, seed)
    return fit(orders, estimate(orders), ridge)
