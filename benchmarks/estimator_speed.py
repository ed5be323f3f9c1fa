"""Estimator cost per order against a fair retrain, side by side, and the cache against its limit.

Runs on the artefacts of `dvc repro` (data/prepared, data/reference, data/cache, data/groundtruth/dev):
  python benchmarks/estimator_speed.py [--orders 8] [--methods fut-subspace fut-state:eig ...]
Times the default `fut-subspace` (its quadratic readout and the exact one) and the full-space replays (`fut:*`,
`fut-state:*`, each with the exact and the linear readout) on the first N random dev orders, against a retrain
timed as a user gets the same number (the window and the final eval loss, median over the same orders:
fut.costs.fair_retrain_seconds), with each method's accuracy on those orders (dev ground truth). Also times one
cache gradient against one training step (the cache's limit), and one training step against one replay step as
tokens per batch grow (a replay step's cost does not depend on the batch), the regime the paper works in.
Prints a table and writes benchmarks/results/estimator_speed.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # this checkout's fut, not an installed one

from benchmarks.options import pipeline_paths  # noqa: E402
from fut import config, estimators, protocol  # noqa: E402
from fut.cache import CacheBuilder, shard_path  # noqa: E402
from fut.costs import fair_retrain_seconds, median_seconds  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.groundtruth import Oracle  # noqa: E402
from fut.methods import METHODS  # noqa: E402
from fut.orders import family  # noqa: E402
from fut.plan import train_step_seconds  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.stats import accuracy  # noqa: E402
from fut.storage import atomic_write_json, read_json, read_metadata  # noqa: E402
from fut.training import Trainer  # noqa: E402

DEFAULT_METHODS = ["fut-subspace", "fut-subspace:exact", "fut:secant", "fut:eig", "fut-state:none",
                   "fut-state:secant", "fut-state:eig"]


def readouts(method: str) -> list[str]:
    """The readouts a method is timed with: exact and linear for a full-space replay, its own for the others."""
    m = METHODS[method]
    return ["exact", "linear"] if m.state in ("own", "reference") and m.estimates_parameters else [m.readout]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pipeline_paths(ap, "--cache", "--groundtruth")
    ap.add_argument("--projection", type=Path, default=ROOT / "data/projection",
                    help="read only by the projected methods (tracin, fut:projected)")
    ap.add_argument("--orders", type=int, default=8, help="random dev orders timed per method")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/estimator_speed.json")
    args = ap.parse_args()
    params = config.load(args.params)
    run = ReferenceRun(params, args.data, args.reference)
    window, T = run.prepared.window, run.T

    # The cache's limit: one forward-backward (a training step) per gradient it stores.
    step_s = train_step_seconds(params, run.prepared, run.start)
    with tempfile.TemporaryDirectory(prefix="fut-speed-") as tmp:
        CacheBuilder(run, Path(tmp)).build_pairs(1)
        shard = read_metadata(shard_path(Path(tmp), 1))
    stats = read_json(args.cache / "stats.json")
    cache = {"train_step_seconds": step_s, "limit_gradients_per_second": 1 / step_s,
             "gradients_per_second": shard["gradients"] / shard["build"]["grad_seconds"],
             "stage_gradients_per_second": 1 / stats["seconds_per_gradient"],
             "cache_seconds_total": stats["seconds"], "curvature_seconds": stats["curvature_seconds"],
             "subspace_seconds": stats["subspace_seconds"]}

    dev = protocol.dev_truth(args.groundtruth)
    names = [n for n in sorted(protocol.scored({n: r["order"] for n, r in dev.items()}))
             if family(n) == "random"][: args.orders]
    orders, truth = [dev[n]["order"] for n in names], np.array([dev[n]["eval_loss"] for n in names])
    retrain = fair_retrain_seconds(Oracle(run).eval_loss, orders, run.device)
    retrain_s = retrain["median"]
    ctx = EstimationContext(run, args.cache, args.projection)
    rows = []
    for method in args.methods:
        for readout in readouts(method):
            est = estimators.estimate(ctx, orders, method, readout_kind=readout if readout == "linear" else "exact")
            acc = accuracy(est.eval_loss.double().numpy(), truth, ctx.naive_loss, params.estimate.bootstrap, 0)
            s = est.seconds / len(orders)
            rows.append({"method": method, "readout": readout, "seconds_per_order": s, "speedup": retrain_s / s,
                         **{k: acc[k] for k in ("spearman", "r2_order_effect", "bias_ppl", "absdiff_ppl")}})
            print(f"{method} ({readout}): {s:.4f} s/order", flush=True)

    # A training step as tokens per batch grow, against a replay step (whose cost does not depend on the batch).
    trainer = Trainer(params, run.prepared, run.start, params.window.lr, "constant", 1000)
    replay_steps = {f"{r['method']} ({r['readout']})": r["seconds_per_order"] / T for r in rows
                    if (r["method"], r["readout"]) in (("fut-state:eig", "linear"), (params.estimate.default,
                                                                                      METHODS[params.estimate.default].readout))}
    scaling = []
    for b in (8, 32, 128):
        batch = torch.cat([window[j % T] for j in range(b // window.shape[1] + 1)])[:b]
        st = median_seconds(lambda: trainer.step(batch), 3, run.device)
        scaling.append({"tokens_per_batch": b * params.data.seq_len, "train_step_seconds": st,
                        "replay_step_seconds": replay_steps,
                        "ratio": {k: st / v for k, v in replay_steps.items()}})

    result = {"retrain_seconds_per_order": retrain_s, "retrain_seconds_timed": retrain["all"],
              "orders": names, "cache": cache, "estimators": rows, "tokens_per_batch_scaling": scaling,
              "threads": torch.get_num_threads(), "device": str(run.device)}
    atomic_write_json(args.out, result)

    print(f"cache: {cache['gradients_per_second']:.1f} gradients/s (stage {cache['stage_gradients_per_second']:.1f}) "
          f"vs limit {cache['limit_gradients_per_second']:.1f} (train step {step_s * 1e3:.0f} ms)")
    print(f"retrain (window + final eval loss): {retrain_s:.3f} s/order, median of {len(orders)} random dev orders")
    fmt = lambda x: "      -" if x is None else f"{x:7.3f}"
    print(f"{'method':20s} {'readout':9s} {'s/order':>9s} {'speed-up':>9s} {'spearman':>8s} {'R²':>7s} {'bias':>7s}")
    for r in rows:
        print(f"{r['method']:20s} {r['readout']:9s} {r['seconds_per_order']:9.4f} {r['speedup']:8.1f}x "
              f"{fmt(r['spearman'])} {fmt(r['r2_order_effect'])} {fmt(r['bias_ppl'])}")
    print(f"{'tokens/batch':>12s} {'train step s':>13s}  replay step s (ratio)")
    for r in scaling:
        steps = ", ".join(f"{k} {v:.5f} ({r['ratio'][k]:.0f}x)" for k, v in r["replay_step_seconds"].items())
        print(f"{r['tokens_per_batch']:12d} {r['train_step_seconds']:13.4f}  {steps}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
