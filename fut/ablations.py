"""Ablations that one cache answers without retraining: projection size k (prefixes of the stored projection),
the readout (exact vs linear) of the default method, and the curvature choice of `fut-state` (from the
estimate stage's table). Knobs that change the reference run (batch size, T, lr, warm start) need the whole
pipeline per value: queue them as DVC experiments (`dvc exp run -S ...`)."""
from __future__ import annotations

from pathlib import Path

from . import estimators
from .config import Params
from .estimators import EstimationContext
from .pipeline import held_out_truth
from .storage import read_json
from .validation import accuracy

SUMMARY = ("spearman", "kendall", "r2_order_effect", "absdiff_ppl", "rel_err", "n_non_finite")


def in_cache_ablations(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, gt_dir: Path,
                       estimates_file: Path) -> dict:
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

    readout = {}
    for kind in ("exact", "linear"):
        est = estimators.estimate(ctx, orders, e.default, readout_kind=kind)
        readout[kind] = scored(est.eval_loss, est.seconds)

    methods = read_json(estimates_file)["methods"]
    curvature = {m.split(":")[1]: {k: methods[m][k] for k in (*SUMMARY, "seconds_per_order")}
                 for m in methods if m.startswith("fut-state:")}
    return {"held_out_orders": len(orders),
            "projection_k": {"method": "tracin", "values": projection_k},
            "readout": {"method": e.default, "values": readout},
            "curvature": {"method": "fut-state", "values": curvature}}
