"""Curriculum design: the proposals and both searches on synthetic fitness functions (valid permutations,
determinism, the assignment search's exactness on an additive loss), then the stage on the tiny run, whose
chosen orders must carry the truth of a real retrain."""
import itertools
import random

import numpy as np
import pytest

from fut import surrogate
from fut.curriculum import Genetic, curriculum, order_crossover, proposals, run_searches, swap
from fut.groundtruth import Oracle
from fut.reference import ReferenceRun
from fut.storage import atomic_write_json


def is_permutation(order, T):
    return sorted(order) == list(range(T))


def test_crossover_and_swap_always_give_permutations():
    rng = random.Random(0)
    for T in (2, 3, 8, 24):
        for _ in range(200):
            a, b = rng.sample(range(T), T), rng.sample(range(T), T)
            child = order_crossover(a, b, rng)
            assert is_permutation(child, T) and is_permutation(swap(child, rng), T)


def test_crossover_keeps_a_slice_of_one_parent_and_the_order_of_the_other():
    rng = random.Random(1)
    a, b = list(range(10)), list(reversed(range(10)))
    for _ in range(50):
        child = order_crossover(a, b, rng)
        from_a = [p for p in range(10) if child[p] == a[p]]
        rest = [x for p, x in enumerate(child) if p not in from_a]
        assert rest == [x for x in b if x in rest]        # the others follow b's relative order


def test_genetic_proposes_new_valid_orders():
    T, rng = 7, random.Random(0)
    seeds = {tuple(rng.sample(range(T), T)): float(k) for k in range(6)}
    ga = Genetic(seeds, size=6, elite=2, mutation=0.5, seed=0)
    seen = set(seeds)
    for _ in range(5):
        children = ga.ask()
        assert len(children) == 4
        assert all(is_permutation(c, T) for c in children)
        assert not {tuple(c) for c in children} & seen          # never rescored
        seen |= {tuple(c) for c in children}
        ga.tell(children, [float(sum(i * x for i, x in enumerate(c))) for c in children])


def additive_loss(W):
    return lambda orders: np.array([sum(W[j, t] for t, j in enumerate(o)) for o in orders])


def test_searches_are_deterministic_for_a_seed_and_count_their_budget():
    T, gen = 6, np.random.default_rng(0)
    score = additive_loss(gen.normal(size=(T, T)))
    rng = random.Random(3)
    seeds = [rng.sample(range(T), T) for _ in range(5)]
    seed_scores = dict(zip(map(tuple, seeds), score(seeds)))
    runs = [run_searches(score, seed_scores, ["genetic", "assignment"], 5, 3, 1, 0.5, seed=7, progress=False)
            for _ in range(2)]
    assert runs[0] == runs[1]
    for name in ("genetic", "assignment"):
        rows = [r for r in runs[0] if r["search"] == name]
        assert all(is_permutation(r["order"], T) for r in rows)
        assert len([r for r in rows if r["generation"] > 0]) == 3 * (5 - 1)
        assert all(np.isclose(r["est_loss"], score([r["order"]])[0]) for r in rows)


def test_assignment_search_finds_the_optimum_of_an_additive_loss():
    """The position model is exact for an additive loss, so a few scored orders pin down its minimiser."""
    T = 5
    W = np.random.default_rng(1).normal(size=(T, T))
    score = additive_loss(W)
    best = min(itertools.permutations(range(T)), key=lambda o: score([o])[0])
    assert tuple(surrogate.PositionModel(0.0, W).minimiser()) == best
    rng = random.Random(0)
    seeds = [rng.sample(range(T), T) for _ in range(12)]
    rows = run_searches(score, dict(zip(map(tuple, seeds), score(seeds))), ["assignment"], 4, 3, 1, 0.5, seed=0,
                        progress=False)
    assert min(rows, key=lambda r: r["est_loss"])["order"] == list(best)
    # The fitted model ranks orders like the true loss.
    fitted = surrogate.fit(seeds, score(seeds), ridge=1e-3)
    some = [rng.sample(range(T), T) for _ in range(20)]
    assert np.corrcoef(fitted.score(some), score(some))[0, 1] > 0.5


def test_proposals_are_the_named_curricula():
    window_domains = [j % 3 for j in range(9)]
    losses = [3.0, 1.0, 2.0, 3.5, 1.5, 2.5, 4.0, 0.5, 2.2]      # domain 1 easiest, domain 0 hardest
    p = proposals(window_domains, losses)
    assert all(is_permutation(o, 9) for o in p.values())
    assert p["easy_to_hard"][0] == 7 and p["hard_to_easy"][0] == 6
    assert [window_domains[j] for j in p["domains_easy_to_hard"]] == [1, 1, 1, 2, 2, 2, 0, 0, 0]
    assert p["domains_hard_to_easy"] == [j for d in (0, 2, 1) for j in range(9) if window_domains[j] == d]
    inter = p["interleaved_easy_to_hard"]
    assert [window_domains[j] for j in inter] == [0, 1, 2] * 3
    for d in range(3):
        mine = [losses[j] for j in inter if window_domains[j] == d]
        assert mine == sorted(mine)
    assert set(proposals([-1] * 4, [1.0, 2.0, 3.0, 4.0])) == {"identity", "reversed", "easy_to_hard", "hard_to_easy"}


def test_curriculum_stage_verifies_its_choice_by_retraining(tiny_truth, tmp_path):
    params, data_dir, ref_dir, cache_dir, gt_dir = tiny_truth
    details, metrics = curriculum(params, data_dir, ref_dir, cache_dir, gt_dir, tmp_path)
    atomic_write_json(tmp_path / "curriculum.json", metrics)          # JSON-clean: no NaN anywhere
    T = params.window.steps
    for name in ("random", "identity", "easy_to_hard", "interleaved_easy_to_hard", "genetic", "assignment",
                 "estimator_search"):
        s = metrics[name]
        assert s["ci_low"] <= s["true_ppl"] <= s["ci_high"] and s["seconds"] >= 0 and s["peak_mb"] > 0, name
    assert metrics["random"]["n_orders"] == params.groundtruth.n_random
    chosen = metrics["estimator_search"]
    assert is_permutation(chosen["order"], T) and chosen["search"] in params.curriculum.searches
    assert chosen["true_ppl"] == pytest.approx(Oracle(ReferenceRun(params, data_dir, ref_dir)).retrain(chosen["order"])["eval_ppl"],
                                               rel=1e-6)
    assert chosen["true_ppl"] == metrics[chosen["search"]]["true_ppl"]
    assert metrics["rank_agreement"]["n"] == len(details["verified"])
    assert -1 <= metrics["rank_agreement"]["spearman"] <= 1
    costs = metrics["costs"]
    assert costs["search"]["n_orders"] > 0 and costs["search_vs_retraining_all"] > 0
    c = params.curriculum
    assert costs["search"]["n_orders"] <= len(c.searches) * c.generations * (c.population - c.elite)
    # Resumed: the verified orders are read back, not retrained.
    again = curriculum(params, data_dir, ref_dir, cache_dir, gt_dir, tmp_path)[1]
    assert again["estimator_search"]["true_ppl"] == chosen["true_ppl"]
    assert again["costs"]["verification"]["seconds"] < metrics["costs"]["verification"]["seconds"]
