"""The error proxy: a run's verdict from fut-subspace's own indicators, and their rank agreement with the true
error pooled over the default run's test orders and the sweep's points."""
import math

import pytest

from fut.ablations import FLAG_DRIFT, error_proxy, flagged
from fut.storage import atomic_write_json
from fut.sweep import trust_row

NAIVE_PPL = 100.0


def rows(effects, indicator_per_effect, drift=0.01, true_offset=0.1):
    """Orders with estimated effects `effects` (PPL above naive), indicators proportional to them, and true PPL
    `true_offset` away from each estimate."""
    return [trust_row(f"o{i}", NAIVE_PPL + e, NAIVE_PPL + e + true_offset * (i + 1),
                      {"error_indicator_ppl": abs(e) * indicator_per_effect, "knot_disagreement": indicator_per_effect,
                       "precond_drift": drift}) for i, e in enumerate(effects)]


def test_the_predicted_skill_is_one_minus_the_scaled_indicator_over_the_effect():
    verdict = flagged(rows([1.0, -2.0, 3.0], 0.5), NAIVE_PPL, scale=1.0)
    assert verdict["predicted_r2"] == pytest.approx(1 - 0.5 ** 2)     # err = 0.5 × effect for every order
    assert not verdict["flagged"] and verdict["diverged"] == 0
    assert flagged(rows([1.0, -2.0, 3.0], 0.8), NAIVE_PPL, scale=1.0)["flagged"]    # predicted 0.36 < 0.5
    assert flagged(rows([1.0, -2.0, 3.0], 0.1, drift=FLAG_DRIFT * 1.5), NAIVE_PPL, scale=1.0)["flagged"]


def test_a_diverged_estimate_has_no_error_and_flags_its_run():
    row = trust_row("gone", None, 101.0, {"error_indicator_ppl": math.inf, "knot_disagreement": 0.1,
                                          "precond_drift": 0.01})
    assert (row["est_ppl"], row["abs_error_ppl"], row["error_indicator_ppl"]) == (None, None, None)
    verdict = flagged(rows([1.0, -2.0, 3.0], 0.1) + [row], NAIVE_PPL, scale=1.0)
    assert verdict["diverged"] == 1 and verdict["flagged"]
    assert verdict["predicted_r2"] == pytest.approx(1 - 0.1 ** 2)     # from the finite orders


def test_the_proxy_pools_current_points_skips_stale_ones_and_ranks_finite_errors(tmp_path):
    def point(name, trust, r2):
        atomic_write_json(tmp_path / f"{name}.json", {
            "point": name, "trust": trust, "default_method": "fut-subspace", "naive_eval_loss": math.log(NAIVE_PPL),
            "methods": {"fut-subspace": {"families": {"all": {"r2_order_effect": r2}}}}})
    point("good", rows([1.0, 2.0, 3.0], 0.1), 0.9)
    point("bad", rows([1.0, 2.0], 0.1) + [trust_row("x", None, 100.0, {"error_indicator_ppl": math.inf,
                                                                        "knot_disagreement": 0.1,
                                                                        "precond_drift": 0.01})], -3.0)
    point("old", rows([5.0, 6.0, 7.0], 0.1), 0.9)
    estimates = {"naive_eval_loss": math.log(NAIVE_PPL),
                 "error_indicator": {"method": "fut-subspace", "scale": 1.0, "test_pairs": rows([0.5, 1.5], 0.1)}}
    proxy = error_proxy(estimates, tmp_path, stale=["old"])
    assert set(proxy["points"]) == {"good", "bad"}
    assert proxy["failing"] == ["bad"] and proxy["flagged"] == ["bad"]
    assert proxy["n_orders"] == 2 + 3 + 2 and proxy["n_runs"] == 3    # the diverged order is not ranked
    assert proxy["spearman_with_true_error"]["error_indicator_ppl"] is not None
