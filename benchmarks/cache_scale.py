"""The cache at its limits: pairs per second against one training step per pair, one process against the
stage's torchrun ranks (same tensors?), the plan against what was written, estimation memory against the
cache's size, and the accuracy cost of storing the gradients in bfloat16.

Runs on the artefacts of `dvc repro` (data/prepared, data/reference, data/groundtruth, and data/cache built by
the stage with `cache.workers` ranks):
  python benchmarks/cache_scale.py [--params params.yaml]
Builds the same cache again in one process into a temporary folder and compares every tensor; then rewrites
the stage's cache with bfloat16 gradients (exactly what `cache.dtype: bfloat16` stores) and scores the default
method on the held-out orders with each. Prints a table; writes reports/metrics/scale.json and
benchmarks/results/cache_scale.json. About 5 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from fut import config, data
from fut.applications import measured
from fut.cache import MANIFEST, UpdateCache, build_cache, cache_provenance
from fut.estimators import EstimationContext, estimate
from fut.pipeline import held_out_truth
from fut.plan import train_step_seconds
from fut.reference import load_checkpoint, reference_hash
from fut.storage import atomic_write_json, load_tensors, read_json, save_tensors
from fut.validation import accuracy

DATA, REF, CACHE, GT = Path("data/prepared"), Path("data/reference"), Path("data/cache"), Path("data/groundtruth")


def same_tensors(a_dir: Path, b_dir: Path) -> bool:
    names = sorted(p.name for p in a_dir.glob("*.safetensors"))
    if names != sorted(p.name for p in b_dir.glob("*.safetensors")):
        return False
    for name in names:
        a, b = load_tensors(a_dir / name)[0], load_tensors(b_dir / name)[0]
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def as_bfloat16(params: config.Params, prepared: data.Prepared, dim: int, out: Path) -> config.Params:
    """The stage's cache with its gradients stored in bfloat16 (and that provenance), in `out`."""
    bf16 = dataclasses.replace(params, cache=dataclasses.replace(params.cache, dtype="bfloat16"))
    provenance = cache_provenance(bf16, prepared, REF, dim)
    for path in sorted(CACHE.glob("*.safetensors")):
        tensors, meta = load_tensors(path)
        if "grad" in tensors:
            tensors["grad"] = tensors["grad"].to(torch.bfloat16)
        save_tensors(out / path.name, tensors, {**meta, **provenance})
    atomic_write_json(out / MANIFEST, {**read_json(CACHE / MANIFEST), **provenance})
    return bf16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="benchmarks/results/cache_scale.json")
    ap.add_argument("--metrics", default="reports/metrics/scale.json")
    args = ap.parse_args()
    params = config.load(args.params)
    torch.set_num_threads(params.train.threads)
    prepared = data.load_prepared(DATA, params)
    stage = read_json(CACHE / "stats.json")
    step_s = train_step_seconds(params, prepared, load_checkpoint(REF, 0, reference_hash(params, prepared)))

    one = dataclasses.replace(params, cache=dataclasses.replace(params.cache, workers=1))
    with tempfile.TemporaryDirectory(prefix="fut-scale-", dir="data") as tmp:
        t0 = time.perf_counter()
        build_cache(one, DATA, REF, Path(tmp), progress=False)
        one_wall = time.perf_counter() - t0
        single = UpdateCache(one, prepared, REF, Path(tmp)).build_cost()
        equivalent = same_tensors(Path(tmp), CACHE)

    _, _, orders, true_loss = held_out_truth(params, GT)
    e = params.estimate
    scores = {}
    with tempfile.TemporaryDirectory(prefix="fut-bf16-", dir="data") as tmp:
        dim = stage["plan"]["params"]
        variants = {"float32": (params, CACHE), "bfloat16": (as_bfloat16(params, prepared, dim, Path(tmp)), Path(tmp))}
        for dtype, (p, folder) in variants.items():
            ctx = EstimationContext(p, DATA, REF, folder)
            with measured() as cost:
                est = estimate(ctx, orders, e.default)
            acc = accuracy(est.eval_loss.double().numpy(), true_loss, ctx.naive_loss, e.bootstrap, e.holdout_seed)
            sizes = UpdateCache(p, prepared, REF, folder).bytes()
            scores[dtype] = {"spearman": acc["spearman"], "r2_order_effect": acc["r2_order_effect"],
                             "absdiff_ppl": acc["absdiff_ppl"], "cache_bytes": sizes["total_file_bytes"],
                             "grad_bytes": sizes["grad"], "estimate_peak_mb": cost.peak_mb,
                             "eval_loss": est.eval_loss.tolist()}
    bf16_shift = max(abs(a - b) for a, b in zip(scores["float32"].pop("eval_loss"), scores["bfloat16"].pop("eval_loss")))

    pairs = single["pairs"]
    result = {
        "pairs_per_second": pairs / single["grad_seconds"],
        "limit_pairs_per_second": 1 / step_s,
        "train_step_seconds": step_s,
        "projection_overhead": single["projection_overhead"],
        "workers_equivalence": equivalent,
        "workers": stage["workers"],
        "one_process_wall_seconds": one_wall,
        "stage_wall_seconds": stage["wall_seconds"],
        "workers_speedup": one_wall / stage["wall_seconds"],
        "plan_bytes": stage["plan"]["bytes"],
        "actual_bytes": stage["bytes"]["total_file_bytes"],
        "actual_tensor_bytes": sum(v for k, v in stage["bytes"].items() if k != "total_file_bytes"),
        "plan_estimated_seconds": stage["plan"].get("estimated_seconds"),
        "dtype": scores,
        "bfloat16_max_abs_eval_loss_shift": bf16_shift,
        "held_out_orders": len(orders),
        "cpu_count": len(__import__("os").sched_getaffinity(0)),
    }
    result["throughput_fraction_of_limit"] = result["pairs_per_second"] / result["limit_pairs_per_second"]
    for path in (args.out, args.metrics):
        atomic_write_json(Path(path), result)

    print(f"pairs/s {result['pairs_per_second']:.1f} vs limit {result['limit_pairs_per_second']:.1f} "
          f"({result['throughput_fraction_of_limit']:.0%}; train step {step_s * 1e3:.0f} ms), projection overhead "
          f"{result['projection_overhead']:.1%}")
    print(f"one process {one_wall:.0f} s, {result['workers']} torchrun ranks {stage['wall_seconds']:.0f} s "
          f"({result['workers_speedup']:.2f}x); same tensors: {equivalent}")
    print(f"plan {result['plan_bytes']} bytes, written {result['actual_bytes']} bytes "
          f"({result['actual_tensor_bytes']} in tensors)")
    print(f"{'grad dtype':10s} {'spearman':>9s} {'R²':>7s} {'|ΔPPL|':>7s} {'cache MB':>9s} {'peak MB':>8s}")
    for dtype, s in scores.items():
        print(f"{dtype:10s} {s['spearman']:9.3f} {s['r2_order_effect']:7.3f} {s['absdiff_ppl']:7.3f} "
              f"{s['cache_bytes'] / 2**20:9.0f} {s['estimate_peak_mb']:8.0f}")
    print(f"bfloat16 moves the estimated eval loss by at most {bf16_shift:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
