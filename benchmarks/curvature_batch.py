"""Which batch's curvature does `fut-state` need? Exact Hessian-vector products with the batch itself (`hvp`),
with a batch drawn from the batch's domain (`hvp-domain`) and with a batch mixed from the whole window
(`hvp-mixed`), next to the cached eigenspaces of those two batches (`eig`, `eig-mixed`), on the estimate stage's
held-out orders. Separates the choice of curvature batch from the eigenspace's truncation.

  python benchmarks/curvature_batch.py        # after `make repro`; about 8 CPU-minutes at default params

Prints a table and writes benchmarks/results/curvature_batch.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fut import config
from fut.estimators import EstimationContext, estimate
from fut.pipeline import held_out_truth
from fut.storage import atomic_write_json
from fut.validation import accuracy

METHODS = ["fut-state:hvp", "fut-state:hvp-domain", "fut-state:hvp-mixed", "fut-state:eig", "fut-state:eig-mixed"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="benchmarks/results/curvature_batch.json")
    args = ap.parse_args()
    params = config.load(args.params)
    _, names, orders, true_loss = held_out_truth(params, Path("data/groundtruth"))
    ctx = EstimationContext(params, Path("data/prepared"), Path("data/reference"), Path("data/cache"))
    rows = {}
    for method in METHODS:
        est = estimate(ctx, orders, method)
        acc = accuracy(est.eval_loss.double().numpy(), true_loss, ctx.naive_loss, params.estimate.bootstrap,
                       params.estimate.holdout_seed)
        rows[method] = {**{k: acc[k] for k in ("spearman", "r2_order_effect", "r2_order_effect_ci", "absdiff_ppl")},
                        "seconds_per_order": est.seconds / len(orders)}
        print(f"{method:22s} spearman {acc['spearman']:.3f}  R² {acc['r2_order_effect']:.3f}  "
              f"|ΔPPL| {acc['absdiff_ppl']:.2f}  {rows[method]['seconds_per_order']:.2f} s/order", flush=True)
    atomic_write_json(Path(args.out), {"held_out_orders": len(orders), "curvature_batch": params.cache.curvature_batch,
                                       "curvature_rank": params.cache.curvature_rank,
                                       "curvature_stride": params.cache.curvature_stride, "methods": rows})


if __name__ == "__main__":
    main()
