"""Stage `groundtruth`: retrain the dev orders and, apart, the test orders (fut/protocol.py)."""
from __future__ import annotations

import statistics
from pathlib import Path

from .. import protocol
from ..config import Params
from ..groundtruth import Oracle, RetrainSet, noise_floor, retrain_sets
from ..orders import family
from ..reference import ReferenceRun
from ..storage import atomic_write_json, read_json


def run(params: Params, data_dir: Path, ref_dir: Path, out_dir: Path) -> tuple[dict, dict]:
    """Retrain both order sets (resuming what is stored); writes each split's results.json and returns the
    results by split and the summary metrics (of both: counts and spreads of the true PPL, no estimate)."""
    run_ = ReferenceRun(params, data_dir, ref_dir)
    prepared = run_.prepared
    summary = read_json(Path(ref_dir) / "summary.json")
    splits = protocol.split_orders(params, prepared.window_domains, len(prepared.domains),
                                   summary["batch_losses_start"])
    g = params.groundtruth
    curves = trajectory_orders(splits[protocol.DEV], g.trajectories)
    sets = []      # (split, its set): one launch of ranks for every order of both splits
    for split, orders in splits.items():
        folder = protocol.split_dir(out_dir, split) / "orders"
        plain = {n: o for n, o in orders.items() if n not in curves or split != protocol.DEV}
        sets.append((split, RetrainSet(plain, folder, desc=f"ground truth ({split})")))
        if split == protocol.DEV:
            sets.append((split, RetrainSet({n: orders[n] for n in curves}, folder, ("trajectory",), g.eval_every,
                                           "ground truth (dev, along the window)")))
    results, metrics = {split: {} for split in splits}, {}
    for (split, _), got in zip(sets, retrain_sets(params, [s for _, s in sets], data_dir, ref_dir)):
        results[split].update(got)
    for split, orders in splits.items():
        results[split] = {n: results[split][n] for n in orders}
        atomic_write_json(protocol.split_dir(out_dir, split) / "results.json", results[split])
        if orders:                 # a sweep point retrains no test orders
            metrics[split] = _spread(results[split])
    metrics["noise_floor"] = noise_floor(Oracle(run_))
    return results, metrics


def trajectory_orders(orders: dict[str, list[int]], n: int) -> list[str]:
    """The dev orders retrained with their eval loss along the window: half random, half structured."""
    rand = sorted(k for k in orders if family(k) == "random")
    other = sorted(k for k in orders if family(k) in ("domain_blocks", "structured"))
    return rand[: (n + 1) // 2] + other[:: max(1, len(other) // max(n // 2, 1))][: n // 2]


def _spread(results: dict[str, dict]) -> dict:
    ppls = [r["eval_ppl"] for r in results.values()]
    by_family: dict[str, list[float]] = {}
    for n, r in results.items():
        by_family.setdefault(family(n), []).append(r["eval_ppl"])
    return {"n_orders": len(results), "true_ppl_mean": statistics.fmean(ppls), "true_ppl_std": statistics.pstdev(ppls),
            "true_ppl_min": min(ppls), "true_ppl_max": max(ppls),
            "families": {f: {"n": len(v), "true_ppl_std": statistics.pstdev(v)} for f, v in by_family.items()},
            "retrain_seconds_per_order": statistics.fmean(r["seconds"] for r in results.values())}
