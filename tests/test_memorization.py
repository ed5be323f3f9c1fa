"""Memorization and generalization: the placement orders, the grid, the similarity score, and the stage on
the tiny run (the reference's own cells read the reference exactly; true cells are real retrains)."""
import random

import numpy as np
import pytest
import torch

from fut import config
from fut.estimators import EstimationContext
from fut.groundtruth import Oracle
from fut.reference import ReferenceRun
from fut.memorization import (memorization, pick_batches, placement_order, readout_sets, spread,
                              tfidf_similarity)
from fut.storage import atomic_write_json


def test_placement_puts_the_batch_at_the_position_and_keeps_the_others_order():
    T = 7
    base = random.Random(0).sample(range(T), T)
    for i in range(T):
        for j in range(T):
            order = placement_order(base, i, j)
            assert sorted(order) == list(range(T)) and order[j] == i
            assert [x for x in order if x != i] == [x for x in base if x != i]
    assert placement_order(base, base[3], 3) == base


def test_grid_spreads_over_domains_and_includes_both_ends():
    assert spread(24, 6) == [0, 5, 9, 14, 18, 23] and spread(5, None) == list(range(5)) and spread(3, 8) == [0, 1, 2]
    window_domains = [j % 4 for j in range(24)]
    picked = pick_batches(window_domains, 6)
    assert len(picked) == 6 and sorted({window_domains[j] for j in picked}) == [0, 1, 2, 3]
    assert pick_batches(window_domains, None) == list(range(24))
    assert len(pick_batches([-1] * 10, 4)) == 4


def test_tfidf_similarity_is_a_cosine_that_prefers_shared_tokens():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]])
    seqs = torch.tensor([[1, 2, 3, 4], [6, 7, 8, 9], [1, 2, 6, 7]])
    sim = tfidf_similarity(a[None], seqs, 10)[0]
    assert sim[0] > sim[2] > sim[1] == 0
    assert torch.allclose(tfidf_similarity(seqs[:1, None], seqs[:1], 10), torch.ones(1, 1))


def test_readout_groups_split_the_eval_set(tiny):
    """Similar / dissimilar: the top / bottom quarter of eval sequences by similarity to the batch; same / other
    domain: a partition of the mixed eval set."""
    params, data_dir, _, _ = tiny
    from fut.data import load_prepared

    prepared = load_prepared(data_dir, params)
    N = len(prepared.eval_mixed)
    batches = list(range(params.window.steps))
    sets = readout_sets(prepared, batches, 0.25)
    sim = tfidf_similarity(prepared.window, prepared.eval_mixed, prepared.vocab_size)
    for i, s in sets.items():
        k = len(s["similar"])
        assert k == len(s["dissimilar"]) == N // 4
        assert sim[i, s["similar"]].min() >= sim[i, s["dissimilar"]].max()
        assert sorted(s["same_domain"].tolist() + s["other_domains"].tolist()) == list(range(N))
        d = prepared.domains[prepared.window_domains[i]]
        assert torch.equal(prepared.eval_mixed[s["same_domain"]], prepared.eval_sets[d])


def test_memorization_stage_on_the_tiny_run(tiny_truth, tmp_path, params_dict):
    _, data_dir, ref_dir, cache_dir, gt_dir = tiny_truth
    params_dict["memorization"].update(base_order="identity", batches=3, positions=None, true_positions=2,
                                       methods=["fut:secant", "fut-state:eig"])
    params = config.from_dict(params_dict)
    T = params.window.steps
    details, metrics = memorization(params, data_dir, ref_dir, cache_dir, gt_dir, tmp_path)
    atomic_write_json(tmp_path / "memorization.json", metrics)          # JSON-clean: null, never NaN
    default = params.estimate.default
    cells = {(c["source"], c["batch"], c["position"]): c["loss"] for c in details["cells"]}
    batches = metrics["grid"]["batches"]
    assert len(batches) == 3 and metrics["grid"]["positions"] == list(range(T))
    assert metrics["grid"]["true_positions"] == [0, T - 1]

    # B_i at its own position of the identity order is the reference run: the estimate reads θ_T exactly.
    ctx = EstimationContext(ReferenceRun(params, data_dir, ref_dir), cache_dir)
    with torch.no_grad():
        for i in batches:
            assert cells[(default, i, i)] == float(ctx.run.loss.loss(ctx.theta_T, ctx.prepared.window[i]))
    # A true cell is a real retrain of that placement.
    i = batches[-1]
    retrained = Oracle(ReferenceRun(params, data_dir, ref_dir)).retrain(placement_order(list(range(T)), i, 0),
                                                                      ("batches",))
    assert cells[("truth", i, 0)] == retrained["batch_losses"][i]

    for name in (default, "fut:secant", "fut-state:eig", "naive"):
        s = metrics["estimators"][name]
        assert s["n"] == 2 * len(batches)
        for key in ("mse", "mae", "spearman", "spearman_placement"):
            assert key in s
    assert metrics["estimators"][default]["mse"] < metrics["estimators"]["naive"]["mse"]
    assert metrics["estimators"]["naive"]["spearman_placement"] is None        # blind to position
    for name in (default, "fut:secant", "fut-state:eig"):
        g = metrics["generalization"]["estimators"][name]
        assert {"mse", "mae", "spearman", "mean_effect"} <= set(g)
    truth_groups = metrics["generalization"]["true_mean_effect"]
    assert set(truth_groups) == {"batch", "similar", "dissimilar", "same_domain", "other_domains"}
    assert all(lo <= x["mean"] <= hi for x in truth_groups.values() for lo, hi in [x["ci"]])


def test_unknown_base_order_is_refused_naming_the_choices(tiny_truth, tmp_path, params_dict):
    _, data_dir, ref_dir, cache_dir, gt_dir = tiny_truth
    params_dict["memorization"]["base_order"] = "sideways"
    with pytest.raises(ValueError, match=r"memorization.base_order = 'sideways'.*expected one of .*identity"):
        memorization(config.from_dict(params_dict), data_dir, ref_dir, cache_dir, gt_dir, tmp_path)
