"""The additive position surrogate (fut/surrogate.py): exact on an additive loss once it has seen enough orders,
its vectorised score is the sum it stands for, and its minimiser is the best order."""
import itertools

import numpy as np

from fut import surrogate

T = 6


def additive(W, c=2.0):
    return lambda orders: c + np.array([sum(W[j, t] for t, j in enumerate(o)) for o in orders])


def test_fit_recovers_every_orders_loss_of_an_additive_loss():
    """W itself is identified only up to adding a constant per row and per column, the loss of every permutation
    exactly: with (T−1)² + 1 free directions, a few times T² random orders pin it down."""
    W = np.random.default_rng(0).normal(size=(T, T))
    loss = additive(W)
    model = surrogate.fit_to_estimator(loss, T, 4 * T * T, seed=1, ridge=1e-9)
    every = np.array(list(itertools.permutations(range(T))))
    np.testing.assert_allclose(model.score(every), loss(every), atol=1e-6)
    assert tuple(model.minimiser()) == tuple(every[np.argmin(loss(every))])
    shrunk = surrogate.fit_to_estimator(loss, T, 4 * T * T, seed=1)          # the default ridge shrinks, ranks alike
    assert np.corrcoef(shrunk.score(every), loss(every))[0, 1] > 0.99


def test_score_is_the_sum_of_placements_and_orders_are_seeded_permutations():
    model = surrogate.PositionModel(0.5, np.arange(T * T, dtype=float).reshape(T, T))
    orders = surrogate.random_orders(T, 7, seed=3)
    assert np.array_equal(orders, surrogate.random_orders(T, 7, seed=3))
    assert all(sorted(o) == list(range(T)) for o in orders)
    assert np.array_equal(model.score(orders), [0.5 + sum(model.W[j, t] for t, j in enumerate(o)) for o in orders])
