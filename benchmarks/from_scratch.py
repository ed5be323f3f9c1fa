"""Wall time from scratch: build the cache the default method reads, then score N orders, against retraining the
same N orders, all in one process on one thread (the training's `train.threads`), after the reference run both
start from.

The cache here holds only what `fut-subspace` reads (pairs at checkpoints 0 and T, the own and after-step
gradients, the eval gradient at T, the domain eigenspaces and the subspace matrices): `cache.checkpoint_stride`
and `cache.eval_grad_stride` set to T. Its matrices are checked against the pipeline cache's (the same basis, so
the same estimator), so the accuracy the estimate stage measured on the test orders is this estimator's.

    python benchmarks/from_scratch.py [--params params.yaml] [--orders 10 100 1000] [--retrains 5]

Prints a table and writes benchmarks/results/from_scratch.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.options import pipeline_paths  # noqa: E402
from fut import config, estimators  # noqa: E402
from fut.cache import UpdateCache, build_cache  # noqa: E402
from fut.costs import fair_retrain_seconds  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.groundtruth import Oracle  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.storage import ArtefactMismatch, atomic_write_json  # noqa: E402


def minimal_params(params: config.Params) -> config.Params:
    """The params whose cache holds only what the default method reads, in one process."""
    T = params.window.steps
    d = dataclasses.asdict(params)
    d["cache"].update(checkpoint_stride=T, eval_grad_stride=T)
    d["parallel"]["workers"] = 1
    d["estimate"].update(methods=["naive", "fut-subspace", "fut-subspace:exact"], default="fut-subspace")
    d["sweep"]["methods"] = ["naive", "fut-subspace"]
    d["memorization"]["methods"] = ["fut-subspace:exact"]
    return config.from_dict(d)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pipeline_paths(ap)
    ap.add_argument("--pipeline-cache", type=Path, default=ROOT / "data/cache")
    ap.add_argument("--orders", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--retrains", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/from_scratch.json")
    args = ap.parse_args()
    pipeline_params = config.load(args.params)
    params = minimal_params(pipeline_params)
    run = ReferenceRun(params, args.data, args.reference)
    T = run.T
    rng = random.Random(0)
    orders = [rng.sample(range(T), T) for _ in range(max(args.orders))]
    with tempfile.TemporaryDirectory(prefix="fut-from-scratch-") as tmp:
        t0 = time.perf_counter()
        build_cache(params, args.data, args.reference, Path(tmp), progress=False)
        cache_seconds = time.perf_counter() - t0
        store = UpdateCache(run, Path(tmp))
        cost, size = store.build_cost(), store.bytes()
        same = _same_subspace(store, ReferenceRun(pipeline_params, args.data, args.reference), args.pipeline_cache)
        scoring = {}
        for n in args.orders:
            t0 = time.perf_counter()
            ctx = EstimationContext(ReferenceRun(params, args.data, args.reference), Path(tmp))
            estimators.estimate(ctx, orders[:n], "fut-subspace")
            scoring[n] = time.perf_counter() - t0
    retrain = fair_retrain_seconds(Oracle(run).eval_loss, orders[: args.retrains], run.device)["median"]
    rows = {str(n): {"estimate_seconds": cache_seconds + scoring[n], "retrain_seconds": n * retrain,
                     "speedup": n * retrain / (cache_seconds + scoring[n])} for n in args.orders}
    per_order = (scoring[max(args.orders)] - scoring[min(args.orders)]) / (max(args.orders) - min(args.orders))
    result = {"method": "fut-subspace", "cache_seconds": cache_seconds, "cache_build": cost, "cache_bytes": size,
              "retrain_seconds_per_order": retrain, "marginal_seconds_per_order": per_order,
              "speedup_per_order": retrain / per_order if per_order > 0 else None,
              "break_even_orders": cache_seconds / (retrain - per_order) if per_order < retrain else None,
              "from_scratch": rows, "subspace_equals_pipeline_cache": same,
              "threads": torch.get_num_threads(), "device": str(run.device)}
    atomic_write_json(args.out, result)
    print(f"cache for fut-subspace: {cache_seconds:.1f} s ({size['total_file_bytes'] / 1e6:.0f} MB); "
          f"retrain {retrain:.3f} s; estimate {per_order * 1e3:.2f} ms per order (marginal)")
    print("| orders | estimate from scratch (s) | retrain (s) | speed-up |\n|---|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {r['estimate_seconds']:.1f} | {r['retrain_seconds']:.1f} | {r['speedup']:.1f}x |")
    even = result["break_even_orders"]
    print(f"break-even: {'never' if even is None else f'{even:.1f} orders'}; matrices equal the pipeline cache's: "
          f"{same}")
    print(f"written {args.out}")
    return 0


def _same_subspace(store: UpdateCache, pipeline_run: ReferenceRun, pipeline_cache: Path) -> bool | None:
    """The minimal cache's subspace matrices equal the pipeline cache's (None when there is none to compare)."""
    if not (pipeline_cache / "manifest.json").is_file():
        return None
    try:
        other = UpdateCache(pipeline_run, pipeline_cache)
    except (ArtefactMismatch, FileNotFoundError):     # a pipeline cache of other params: nothing to compare
        return None
    a, b = store.subspace(), other.subspace()
    return bool(torch.allclose(a.gram, b.gram, rtol=1e-6, atol=0) and torch.equal(a.forcing, b.forcing))


if __name__ == "__main__":
    sys.exit(main())
