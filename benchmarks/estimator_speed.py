"""Cache throughput against its limit, and estimator cost per order against retraining, side by side.

Runs on the artefacts of `dvc repro` (data/prepared, data/reference, data/cache, data/groundtruth):
  python benchmarks/estimator_speed.py [--orders 8] [--methods fut-state:secant fut-state:none ...]
Prints a table and writes benchmarks/results/estimator_speed.json. Also times one training step against one
replay step as tokens per batch grow (the replay's cost does not depend on the batch), the regime the paper
works in.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from fut import config, data
from fut.cache import CacheBuilder
from fut.estimators import EstimationContext, estimate
from fut.groundtruth import Oracle
from fut.plan import median_seconds
from fut.reference import load_checkpoint, reference_hash
from fut.storage import atomic_write_json, read_json
from fut.training import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--orders", type=int, default=8, help="ground-truth orders timed per method")
    ap.add_argument("--methods", nargs="+", default=["fut", "tracin", "fut-state:none", "fut-state:secant",
                                                     "fut-state:eig", "fut-state:eig-mixed", "fut-state:hvp"])
    ap.add_argument("--out", default="benchmarks/results/estimator_speed.json")
    args = ap.parse_args()
    params = config.load(args.params)
    torch.set_num_threads(params.train.threads)
    prepared = data.load_prepared(Path("data/prepared"), params)
    ref_dir = Path("data/reference")
    start = load_checkpoint(ref_dir, 0, reference_hash(params, prepared))
    window = prepared.window

    # The limit: one forward-backward (a training step) per (t, j) pair.
    trainer = Trainer(params, prepared, start, params.window.lr, "constant", 1)
    step_s = median_seconds(lambda: trainer.step(window[0]), 5)
    builder = CacheBuilder(params, prepared, ref_dir, Path(tempfile.mkdtemp()))
    t0 = time.perf_counter()
    builder.build_pairs(1)
    shard_s = time.perf_counter() - t0
    cost = read_json(Path("data/cache/stats.json"))
    cache = {"train_step_seconds": step_s, "limit_pairs_per_second": 1 / step_s,
             "pairs_per_second": 1 / cost["seconds_per_pair"], "one_shard_seconds": shard_s,
             "projection_overhead": cost["projection_overhead"],
             "cache_seconds_total": cost["seconds"], "curvature_seconds": cost["curvature_seconds"]}

    truth = read_json(Path("data/groundtruth/results.json"))
    names = [n for n in sorted(truth) if n != "identity"][: args.orders]
    orders = [truth[n]["order"] for n in names]
    oracle = Oracle(params, Path("data/prepared"), ref_dir)
    t0 = time.perf_counter()
    for o in orders:
        oracle.retrain(o)
    retrain_s = (time.perf_counter() - t0) / len(orders)
    ctx = EstimationContext(params, Path("data/prepared"), ref_dir, Path("data/cache"))
    rows = []
    for method in args.methods:
        for readout in ("exact", "linear") if method.startswith("fut") else ("direct",):
            est = estimate(ctx, orders, method, readout_kind=readout if readout != "direct" else "exact")
            s = est.seconds / len(orders)
            rows.append({"method": method, "readout": readout, "seconds_per_order": s, "speedup": retrain_s / s})

    # Replay step vs training step as tokens per batch grow (replay cost is independent of the batch).
    replay_step_s = next(r["seconds_per_order"] for r in rows
                         if r["method"] == params.estimate.default and r["readout"] == "linear") / params.window.steps
    scaling = []
    for b in (8, 32, 128):
        batch = torch.cat([window[j % window.shape[0]] for j in range(b // window.shape[1] + 1)])[:b]
        st = median_seconds(lambda: trainer.step(batch), 3)
        scaling.append({"tokens_per_batch": b * params.data.seq_len, "train_step_seconds": st,
                        "replay_step_seconds": replay_step_s, "ratio": st / replay_step_s})

    result = {"retrain_seconds_per_order": retrain_s, "orders_timed": len(orders), "cache": cache,
              "estimators": rows, "tokens_per_batch_scaling": scaling, "threads": params.train.threads}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(args.out), result)

    print(f"cache: {cache['pairs_per_second']:.1f} pairs/s vs limit {cache['limit_pairs_per_second']:.1f} "
          f"(train step {step_s * 1e3:.0f} ms); projection overhead {cache['projection_overhead']:.1%}")
    print(f"retrain (final eval only): {retrain_s:.3f} s/order over {len(orders)} orders")
    print(f"{'method':20s} {'readout':8s} {'s/order':>9s} {'speed-up':>9s}")
    for r in rows:
        print(f"{r['method']:20s} {r['readout']:8s} {r['seconds_per_order']:9.3f} {r['speedup']:8.1f}x")
    print(f"{'tokens/batch':>12s} {'train step s':>13s} {'replay step s':>14s} {'ratio':>7s}")
    for r in scaling:
        print(f"{r['tokens_per_batch']:12d} {r['train_step_seconds']:13.4f} {r['replay_step_seconds']:14.4f} {r['ratio']:7.1f}")


if __name__ == "__main__":
    sys.exit(main())
