"""The validation protocol (fut/protocol.py) for a study of orders beyond one epoch's batch permutations
(sample-level orders, several epochs): the estimates of both splits are made from the orders alone first; then
both splits are retrained (resuming what is stored) into <gt_dir>/dev and <gt_dir>/test; the dev block is scored
from `dev_truth`, the test block by `final_scoring`, the one reader of the test results.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Mapping

from . import protocol
from .config import Params
from .groundtruth import retrain_all
from .schedules import as_units
from .stats import rank_correlation
from .storage import atomic_write_json
from .subspace import Subspace


def score_study(params: Params, sub: Subspace, naive_loss: float, splits: Mapping[str, Mapping[str, list]],
                data_dir: Path, ref_dir: Path, gt_dir: Path, desc: str) -> tuple[list[dict], dict]:
    """fut-subspace (`sub`, quadratic readout) and naive estimate both splits from the orders alone (timed); then
    `retrain_and_score`. Returns the per-order rows, each with its estimate's error indicator, and what every
    study reports: the dev and test blocks, seconds per order against the retrains', the indicator's Spearman with
    the true |ΔPPL| on the test orders, and the run's preconditioner drift and knot disagreement."""
    estimates, indicator, seconds, n = {}, {}, 0.0, 0
    for split, orders in splits.items():
        scored = protocol.scored(orders)
        t0 = time.perf_counter()
        S = sub.replay(as_units(list(scored.values())))
        est = sub.quadratic(S, naive_loss)
        seconds, n = seconds + time.perf_counter() - t0, n + len(scored)
        estimates[split] = {"naive": dict.fromkeys(scored, naive_loss),
                            "fut-subspace": {k: float(e) for k, e in zip(scored, est)}}
        indicator.update(zip(scored, sub.indicators(S, naive_loss)["error_indicator_ppl"].tolist()))
    out = retrain_and_score(params, splits, estimates, naive_loss, data_dir, ref_dir, gt_dir, desc)
    rows = [{**r, "error_indicator_ppl": indicator[r["order"]]} for r in out["rows"]]
    errors = [(r["error_indicator_ppl"], abs(math.exp(r["est_loss"]) - math.exp(r["true_loss"]))) for r in rows
              if r["split"] == protocol.TEST and r["method"] == "fut-subspace"]
    per_order, retrain = seconds / max(n, 1), out["retrain_seconds_per_order"]
    return rows, {protocol.DEV: out[protocol.DEV], protocol.TEST: out[protocol.TEST], "seconds_per_order": per_order,
                  "retrain_seconds_per_order": retrain, "speedup_per_order": retrain / per_order if per_order > 0 else None,
                  "error_indicator_spearman_test": rank_correlation([e[0] for e in errors], [e[1] for e in errors]),
                  "precond_drift": sub.precond_drift, "knot_disagreement": sub.knot_disagreement}


def retrain_and_score(params: Params, splits: Mapping[str, Mapping[str, list]],
                      estimates: Mapping[str, Mapping[str, Mapping[str, float]]], naive_loss: float, data_dir: Path,
                      ref_dir: Path, gt_dir: Path, desc: str) -> dict:
    """`splits`: {dev, test} -> named orders (the dev set with its reference order `identity`, never scored);
    `estimates`: {dev, test} -> {method: {order name: eval loss}} for the scored orders. Returns the dev and test
    blocks (per family and pooled), the per-order rows of both and the mean retrain seconds."""
    seconds = []
    for split, orders in splits.items():
        results = retrain_all(params, dict(orders), data_dir, ref_dir, protocol.split_dir(gt_dir, split) / "orders",
                              (), 0, f"{desc} ({split})")
        seconds += [r["seconds"] for r in results.values()]
        atomic_write_json(protocol.split_dir(gt_dir, split) / "results.json", results)
    n_boot = params.estimate.bootstrap
    dev = protocol.dev_truth(gt_dir)
    truth = {n: dev[n]["eval_loss"] for n in protocol.scored(splits[protocol.DEV])}
    dev_block = protocol.score_block(estimates[protocol.DEV], truth, naive_loss, n_boot, 0)
    rows = protocol.per_order_rows(estimates[protocol.DEV], truth, protocol.DEV)
    expected = {n: list(o) for n, o in splits[protocol.TEST].items()}

    def check(stored: Mapping[str, list]) -> None:
        if dict(stored) != expected:
            raise ValueError(f"{gt_dir}/test holds other orders than the ones estimated; rerun the stage")

    test_block, test_rows = protocol.final_scoring(gt_dir, estimates[protocol.TEST], naive_loss, n_boot, 0, check)
    return {protocol.DEV: dev_block, protocol.TEST: test_block, "rows": rows + test_rows,
            "retrain_seconds_per_order": statistics.fmean(seconds) if seconds else None}
