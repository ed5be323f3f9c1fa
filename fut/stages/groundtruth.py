"""Stage `groundtruth`: retrain the dev orders and, apart, the test orders (fut/protocol.py)."""
from __future__ import annotations

import statistics
from pathlib import Path

from .. import protocol
from ..config import Params
from ..groundtruth import Oracle, noise_floor, retrain_all
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
    readouts = {protocol.DEV: (("batches", "trajectory"), params.groundtruth.eval_every), protocol.TEST: ((), 0)}
    results, metrics = {}, {}
    for split, orders in splits.items():
        what, every = readouts[split]
        folder = protocol.split_dir(out_dir, split)
        results[split] = retrain_all(params, orders, data_dir, ref_dir, folder / "orders", what, every,
                                     f"ground truth ({split})")
        atomic_write_json(folder / "results.json", results[split])
        metrics[split] = _spread(results[split])
    metrics.update({"workers": params.parallel.workers, "noise_floor": noise_floor(Oracle(run_))})
    return results, metrics


def _spread(results: dict[str, dict]) -> dict:
    ppls = [r["eval_ppl"] for r in results.values()]
    by_family: dict[str, list[float]] = {}
    for n, r in results.items():
        by_family.setdefault(family(n), []).append(r["eval_ppl"])
    return {"n_orders": len(results), "true_ppl_mean": statistics.fmean(ppls), "true_ppl_std": statistics.pstdev(ppls),
            "true_ppl_min": min(ppls), "true_ppl_max": max(ppls),
            "families": {f: {"n": len(v), "true_ppl_std": statistics.pstdev(v)} for f, v in by_family.items()},
            "retrain_seconds_per_order": statistics.fmean(r["seconds"] for r in results.values())}
