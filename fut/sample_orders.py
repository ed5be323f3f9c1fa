"""Sample-level orders (DESIGN §9): how well fut-subspace estimates orders that assign the window's sequences to
batches anew (random re-batchings, domain-pure and domain-mixed batches, batches of similar difficulty), against
retraining them through the reference's code path; and what the sample-level cache costs next to the batch-level
one."""
from __future__ import annotations

from pathlib import Path

from . import protocol
from .config import Params
from .estimators import EstimationContext
from .order_study import score_study
from .orders import family
from .sample_applications import curriculum, memorization
from .reference import ReferenceRun
from .schedules import sample_order_set, sequence_batches
from .sequence_cache import SequenceCache
from .training import Trainer, sequence_losses


def start_losses(params: Params, run: ReferenceRun) -> list[float]:
    """Each window sequence's loss under the window-start model: its difficulty."""
    probe = Trainer(params, run.prepared, run.start, params.window.lr, "constant", 1)
    return sequence_losses(probe, run.prepared.window.reshape(run.T * run.batch_size, -1)).tolist()


def order_sets(params: Params, run: ReferenceRun, losses: list[float]) -> dict[str, dict[str, list[list[int]]]]:
    """Dev (with the reference's own batches, `identity`) and test sample-level orders, each from its own seed."""
    T, b, so = run.T, run.batch_size, params.sample_orders
    domains = run.prepared.window_domains
    return {protocol.DEV: {"identity": sequence_batches(T, b),
                           **sample_order_set(T, b, domains, losses, so.dev, so.seed)},
            protocol.TEST: sample_order_set(T, b, domains, losses, so.test, so.test_seed, prefix="test-")}


def sample_orders(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, out_dir: Path
                  ) -> tuple[list[dict], dict]:
    """The per-order rows and the metrics (reports/metrics/sample_orders.json): the accuracy on the dev and test
    orders (retrained into <out_dir>/groundtruth), the caches' costs, and the applications (their retrains in
    <out_dir>/curriculum and <out_dir>/memorization)."""
    out_dir = Path(out_dir)
    gt_dir = out_dir / "groundtruth"
    run = ReferenceRun(params, data_dir, ref_dir)
    ctx = EstimationContext(run, cache_dir)
    seq_cache = SequenceCache(ctx.cache, out_dir / "cache")
    sub = seq_cache.build()
    losses = start_losses(params, run)
    splits = order_sets(params, run, losses)
    rows, scores = score_study(params, sub, ctx.naive_loss, splits, data_dir, ref_dir, gt_dir,
                               "sample-level ground truth")
    cost, batch = seq_cache.cost(), ctx.cache
    metrics = {"method": "fut-subspace", "readout": "quadratic", "naive_eval_loss": ctx.naive_loss, **scores,
               "cache_bytes": cost["bytes"], "cache_seconds": cost["seconds"], "cache": cost,
               "batch_cache_bytes": batch.bytes()["total_file_bytes"],
               "batch_cache_seconds": batch.build_cost()["seconds"]}
    dev = protocol.dev_truth(gt_dir)
    random_truth = [r["eval_loss"] for n, r in dev.items() if family(n) == "random"]
    metrics["curriculum"] = curriculum(params, sub, ctx.naive_loss, run.T, run.batch_size,
                                       run.prepared.window_domains, losses, random_truth, data_dir, ref_dir,
                                       out_dir / "curriculum")
    metrics["memorization"] = memorization(params, sub, seq_cache, data_dir, ref_dir, out_dir / "memorization")
    return rows, metrics
