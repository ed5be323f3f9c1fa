"""The validation protocol (DESIGN §7): every choice is made on the dev orders, the final table is scored once on
the test orders.

The ground-truth stage retrains both sets into data/groundtruth/dev and data/groundtruth/test. `dev_truth` serves
the dev results to every stage that makes or checks a choice (estimate's dev block, ablations, sweep, the
applications). The test results are read in one place, `final_scoring`, which receives the estimates already
computed for the test orders (from the orders alone, regenerated from params) and returns their accuracy; a test
checks that nothing else opens the test results. Scores are reported per order family (random, domain blocks,
other structured) and pooled, with bootstrap intervals stratified by family.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .orders import FAMILIES, family, groundtruth_orders, test_orders
from .stats import accuracy
from .storage import read_json

DEV, TEST = "dev", "test"


def split_dir(gt_dir: Path, split: str) -> Path:
    return Path(gt_dir) / split


def dev_truth(gt_dir: Path) -> dict[str, dict]:
    """Every dev result by order name (the identity included: it is the reference, never scored)."""
    return read_json(split_dir(gt_dir, DEV) / "results.json")


def split_orders(params, window_domains: Sequence[int], n_domains: int, batch_losses: Sequence[float]
                 ) -> dict[str, dict]:
    """Both order sets as the ground-truth stage retrains them, by split: dev (identity, seeded random, the
    structured orders) and test (generated apart, disjoint from dev by construction)."""
    g, T = params.groundtruth, params.window.steps
    dev = groundtruth_orders(T, g.n_random, g.seed, g.structured, window_domains, n_domains, batch_losses)
    return {DEV: dev, TEST: test_orders(T, g.test, window_domains, batch_losses, list(dev.values()))}


def scored(orders: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """The orders a split scores: all but the identity, whose estimate is the reference by construction."""
    return {n: list(o) for n, o in orders.items() if family(n) != "identity"}


def score_block(estimates: Mapping[str, Mapping[str, float]], truth: Mapping[str, float], naive_loss: float,
                n_boot: int, seed: int) -> dict:
    """{"n_orders", "families": {family: {method: accuracy}}} for every family with orders and `all` (pooled,
    bootstrap stratified by family). A method is scored on the orders it estimated (the exact-curvature
    references on a subset)."""
    names = list(truth)
    block = {"n_orders": len(names), "families": {}}
    for fam in (*FAMILIES, "all"):
        for method, est in estimates.items():
            mine = [n for n in names if n in est and (fam == "all" or family(n) == fam)]
            if not mine:
                continue
            strata = [FAMILIES.index(family(n)) for n in mine]
            block["families"].setdefault(fam, {})[method] = accuracy(
                np.array([est[n] for n in mine]), np.array([truth[n] for n in mine]), naive_loss, n_boot, seed,
                strata)
    return block


def per_order_rows(estimates: Mapping[str, Mapping[str, float]], truth: Mapping[str, float],
                   split: str) -> list[dict]:
    return [{"split": split, "order": n, "family": family(n), "method": method, "est_loss": est[n],
             "true_loss": truth[n]} for method, est in estimates.items() for n in truth if n in est]


def final_scoring(gt_dir: Path, test_estimates: Mapping[str, Mapping[str, float]], naive_loss: float,
                  n_boot: int, seed: int, check_orders: Callable[[Mapping[str, list[int]]], None]) -> tuple[dict, list]:
    """The final table: accuracy of each method's estimates of the test orders against their retrained truth,
    and the per-order rows for the figures. The one reader of the test results: `check_orders` is handed the
    stored test orders first, so estimates of other orders are refused rather than scored."""
    results = read_json(split_dir(gt_dir, TEST) / "results.json")
    check_orders({n: r["order"] for n, r in results.items()})
    truth = {n: r["eval_loss"] for n, r in results.items()}
    return score_block(test_estimates, truth, naive_loss, n_boot, seed), per_order_rows(test_estimates, truth, TEST)
