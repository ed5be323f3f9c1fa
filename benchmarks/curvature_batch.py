"""Which batch's curvature does the order's own Adam replay need? `fut-state` replays with exact Hessian-vector
products of the batch itself (`hvp`), of the cache's curvature batch of the batch's domain (`hvp-domain`) and,
optionally, of a batch mixed from the whole window (`hvp-mixed`), next to the cached eigenspace of the domain batch
(`eig`), on dev orders. Separates the choice of curvature batch from the eigenspace's truncation.

  python benchmarks/curvature_batch.py [--orders 12] [--variants hvp hvp-domain eig hvp-mixed]

Runs on the artefacts of `dvc repro` (data/prepared, data/reference, data/cache, data/groundtruth/dev); an exact
Hessian replay costs more than a retrain per order (about 10 CPU-minutes per variant for 12 orders at default
params), so `--orders` picks a subset of the dev orders, half random, half structured (0: all). Prints a table and
writes benchmarks/results/curvature_batch.json.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # this checkout's fut, not an installed one

from benchmarks.options import pipeline_paths  # noqa: E402
from fut import config, estimators, protocol  # noqa: E402
from fut.cache import batch_group, curvature_batches  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.stages.estimate import subset  # noqa: E402
from fut.storage import atomic_write_json  # noqa: E402

# variant -> (method, curvature batch kind standing in for each window batch; None: the batch itself)
VARIANTS = {"hvp": ("fut-state:hvp", None), "hvp-domain": ("fut-state:hvp", "domain"),
            "hvp-mixed": ("fut-state:hvp", "window"), "eig": ("fut-state:eig", None)}


def with_curvature_batches(ctx: EstimationContext, kind: str) -> EstimationContext:
    """A view of `ctx` whose exact-Hessian replay takes, for window batch j, the Hessian of the cache's curvature
    batch of `kind` (`domain`: the one of j's domain, whose eigenspace the cache holds; `window`: one mixed from
    the whole window) instead of B_j's own. Only the curvature product reads the window's tokens; the gradients
    come from the cache as before."""
    batches = curvature_batches(ctx.prepared, ctx.params.cache.curvature_batch, [kind])
    window = torch.stack([batches[batch_group(ctx.prepared, j) if kind == "domain" else "window"]
                          for j in range(ctx.T)])
    view = copy.copy(ctx)
    view.prepared = dataclasses.replace(ctx.prepared, window=window)
    return view


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pipeline_paths(ap, "--cache", "--groundtruth")
    ap.add_argument("--orders", type=int, default=12, help="dev orders, half random, half structured (0: all)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["hvp", "hvp-domain", "eig"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/curvature_batch.json")
    args = ap.parse_args()
    params = config.load(args.params)
    dev = protocol.dev_truth(args.groundtruth)
    named = protocol.scored({n: r["order"] for n, r in dev.items()})
    named = subset(named, args.orders) if args.orders else named
    truth = {n: dev[n]["eval_loss"] for n in named}
    ctx = EstimationContext(ReferenceRun(params, args.data, args.reference), args.cache)
    estimates, seconds = {}, {}
    for variant in args.variants:
        method, kind = VARIANTS[variant]
        est = estimators.estimate(ctx if kind is None else with_curvature_batches(ctx, kind), list(named.values()),
                                  method)
        estimates[variant] = dict(zip(named, est.eval_loss.double().tolist()))
        seconds[variant] = est.seconds / len(named)
        print(f"{variant}: {seconds[variant]:.2f} s/order", flush=True)
    block = protocol.score_block(estimates, truth, ctx.naive_loss, params.estimate.bootstrap, 0)
    keep = ("spearman", "r2_order_effect", "r2_order_effect_ci", "bias_ppl", "absdiff_ppl", "n")
    rows = {v: {"method": VARIANTS[v][0], "curvature_batch": VARIANTS[v][1] or "the batch itself",
                "seconds_per_order": seconds[v],
                "families": {f: {k: block["families"][f][v][k] for k in keep} for f in block["families"]}}
            for v in args.variants}
    atomic_write_json(args.out, {"dev_orders": sorted(named), "curvature_batch": params.cache.curvature_batch,
                                 "curvature_rank": params.cache.curvature_rank,
                                 "curvature_checkpoints": params.cache.curvature_checkpoints, "variants": rows,
                                 "estimates": estimates, "naive_eval_loss": ctx.naive_loss})
    fmt = lambda x: "     -" if x is None else f"{x:6.3f}"
    print(f"{len(named)} dev orders, replayed with each curvature (fut-state, the order's own Adam state):")
    print(f"{'variant':11s} {'family':14s} {'n':>3s} {'spearman':>8s} {'R²':>6s} {'bias PPL':>8s} {'|ΔPPL|':>6s} "
          f"{'s/order':>8s}")
    for v, r in rows.items():
        for f, a in r["families"].items():
            print(f"{v:11s} {f:14s} {a['n']:3d} {fmt(a['spearman']):>8s} {fmt(a['r2_order_effect'])} "
                  f"{fmt(a['bias_ppl']):>8s} {fmt(a['absdiff_ppl'])} {r['seconds_per_order']:8.2f}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
