"""The ablation table. Answered by one cache without retraining: projection size k (prefixes of the stored
projection), the readout (exact vs linear) of the default method, the curvature choice of `fut-state` (from
the estimate stage's table), and the checkpoint stride of the cache (the default method reading pairs only at
every s-th checkpoint of this one, exactly what a cache built with `cache.checkpoint_stride` = s holds). Knobs that change the reference run (batch size, T, lr, warm start) need one
whole run per value: `python -m fut sweep` (fut/sweep.py) writes them to reports/sweeps/, tabulated here."""
from __future__ import annotations

import logging
from pathlib import Path

from . import estimators
from .config import Params
from .estimators import EstimationContext
from .pipeline import held_out_truth
from .storage import read_json
from .sweep import collect
from .validation import accuracy

log = logging.getLogger(__name__)

STRIDES = (2, 4)
SUMMARY = ("spearman", "kendall", "r2_order_effect", "absdiff_ppl", "rel_err", "n_non_finite")


def ablations(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, gt_dir: Path,
              estimates_file: Path, sweeps_dir: Path) -> dict:
    e = params.estimate
    _, _, orders, true_loss = held_out_truth(params, gt_dir)
    ctx = EstimationContext(params, data_dir, ref_dir, cache_dir)

    def scored(loss, seconds):
        acc = accuracy(loss.double().numpy(), true_loss, ctx.naive_loss, e.bootstrap, e.holdout_seed)
        return {**{k: acc[k] for k in SUMMARY}, "seconds_per_order": seconds / len(orders)}

    ks = sorted({k for k in (16, 64, 256, 1024, 4096) if k <= params.cache.k} | {params.cache.k})
    projection_k = {}
    for k in ks:
        est = estimators.estimate(ctx, orders, "tracin", k=k)
        projection_k[str(k)] = scored(est.eval_loss, est.seconds)
    full = estimators.estimate(ctx, orders, "tracin:full")
    projection_k["full"] = scored(full.eval_loss, full.seconds)

    # The estimate stage scored the default method with estimate.readout on every checkpoint: reused, not recomputed.
    methods = read_json(estimates_file)["methods"]
    default = {k: methods[e.default][k] for k in (*SUMMARY, "seconds_per_order")}
    other = "linear" if e.readout == "exact" else "exact"
    est = estimators.estimate(ctx, orders, e.default, readout_kind=other)
    readout = {e.readout: default, other: scored(est.eval_loss, est.seconds)}
    stride = {"1": {**default, "pairs_fraction": 1.0}}
    for s in STRIDES:
        if s > params.cache.checkpoint_stride and s % params.cache.checkpoint_stride == 0 and s < ctx.T:
            sparse = EstimationContext(params, data_dir, ref_dir, cache_dir, checkpoint_stride=s)
            est = estimators.estimate(sparse, orders, e.default)
            stride[str(s)] = {**scored(est.eval_loss, est.seconds), "pairs_fraction": _pairs_fraction(ctx.T, s)}
    curvature = {m.split(":")[1]: {k: methods[m][k] for k in (*SUMMARY, "seconds_per_order")}
                 for m in methods if m.startswith("fut-state:")}
    table = {"held_out_orders": len(orders),
             "projection_k": {"method": "tracin", "values": projection_k},
             "readout": {"method": e.default, "values": readout},
             "curvature": {"method": "fut-state", "values": curvature},
             "checkpoint_stride": {"method": e.default, "values": stride}}
    sweep, stale = collect(params, sweeps_dir)
    if stale:
        log.warning("sweep points computed with other params, left out (rerun: python -m fut sweep --only %s)",
                    " ".join(stale))
    table["sweep_stale_points"] = stale
    for knob, entry in sweep.items():
        table[knob] = {"param": entry["param"], "values": {value: _sweep_row(r) for value, r in entry["values"].items()}}
    return table


def _pairs_fraction(T: int, s: int) -> float:
    """Gradient evaluations of a stride-s cache's pairs and own gradients, as a fraction of the full T(T+1)."""
    cached = len(range(0, T + 1, s))
    return (cached * T + (T - len(range(0, T, s)))) / (T * (T + 1))


def _sweep_row(r: dict) -> dict:
    keep = ("window_steps", "batch_size", "lr", "warmstart", "orders_scored", "true_ppl_std", "random_ppl_std",
            "retrain_seconds_per_order", "cache_seconds", "eval_ppl_end")
    return {**{k: r[k] for k in keep}, "methods": {m: {k: v[k] for k in (*SUMMARY, "seconds_per_order")}
                                                   for m, v in r["methods"].items()}}
