"""The validation protocol (fut/protocol.py) for a study of orders beyond one epoch's batch permutations
(sample-level orders, several epochs): the estimates of both splits are made from the orders alone first; then
both splits are retrained (resuming what is stored) into <gt_dir>/dev and <gt_dir>/test; the dev block is scored
from `dev_truth`, the test block by `final_scoring`, the one reader of the test results.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Mapping

from . import protocol
from .config import Params
from .groundtruth import retrain_all
from .storage import atomic_write_json


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
