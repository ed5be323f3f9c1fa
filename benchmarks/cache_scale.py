"""The cache at its limits: gradients per second against one training step per gradient, one process against the
stage's torchrun ranks (same tensors?), the plan against what was written, what the projection stage adds to the
pairs, estimation memory against the cache's size, and the accuracy cost of storing the gradients in bfloat16.

Runs on the artefacts of `dvc repro` (data/prepared, data/reference, data/groundtruth/dev, and data/cache built by
the stage with `parallel.workers` ranks):
  python benchmarks/cache_scale.py [--params params.yaml] [--methods fut-subspace fut-subspace:exact]
Builds the same cache again in one process into a temporary folder and compares every tensor, and projects its
update terms as the projection stage does (fut/projected.py); then rewrites the stage's cache with bfloat16
gradients (exactly what `cache.dtype: bfloat16` stores; fut-subspace's matrices rebuilt from them) and scores
the methods on the dev orders with each. Prints a table; writes reports/metrics/scale.json and
benchmarks/results/cache_scale.json. About 10 minutes on 2 cores at default params.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # this checkout's fut, not an installed one

from benchmarks.options import pipeline_paths  # noqa: E402
from fut import config, estimators, protocol  # noqa: E402
from fut.cache import MANIFEST, SUBSPACE, CacheBuilder, UpdateCache, build_cache, cache_provenance  # noqa: E402
from fut.costs import measured  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.plan import train_step_seconds  # noqa: E402
from fut.projected import build_projected  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.storage import atomic_write_json, load_tensors, read_json, save_tensors  # noqa: E402


def same_tensors(a_dir: Path, b_dir: Path) -> bool:
    names = sorted(p.name for p in a_dir.glob("*.safetensors"))
    if names != sorted(p.name for p in b_dir.glob("*.safetensors")):
        return False
    for name in names:
        a, b = load_tensors(a_dir / name)[0], load_tensors(b_dir / name)[0]
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


def as_bfloat16(run: ReferenceRun, cache_dir: Path, out: Path) -> ReferenceRun:
    """The cache in `cache_dir` with its pair gradients stored in bfloat16 (and that provenance) in `out`, and
    fut-subspace's matrices rebuilt from them; returns the run handle for those params."""
    params = run.params
    bf16 = dataclasses.replace(params, cache=dataclasses.replace(params.cache, dtype="bfloat16"))
    provenance = cache_provenance(bf16, run.prepared, run.ref_dir, run.layout.dim)
    for path in sorted(cache_dir.glob("*.safetensors")):
        if path.name == SUBSPACE:
            continue
        tensors, meta = load_tensors(path)
        if "grad" in tensors:
            tensors["grad"] = tensors["grad"].to(torch.bfloat16)
        save_tensors(out / path.name, tensors, {**meta, **provenance})
    bf16_run = ReferenceRun(bf16, run.data_dir, run.ref_dir)
    CacheBuilder(bf16_run, out).build_subspace()
    atomic_write_json(out / MANIFEST, {**read_json(cache_dir / MANIFEST), **provenance})
    return bf16_run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pipeline_paths(ap, "--cache", "--groundtruth")
    ap.add_argument("--methods", nargs="+", default=None, help="default: estimate.default and its exact readout")
    ap.add_argument("--workdir", type=Path, default=ROOT / "data",
                    help="where the temporary caches go (they are about the cache's size)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cache_scale.json")
    ap.add_argument("--metrics", type=Path, default=ROOT / "reports/metrics/scale.json")
    args = ap.parse_args()
    params = config.load(args.params)
    run = ReferenceRun(params, args.data, args.reference)
    stage = read_json(args.cache / "stats.json")
    step_s = train_step_seconds(params, run.prepared, run.start)
    default = params.estimate.default
    methods = args.methods or [default] + ([f"{default}:exact"] if f"{default}:exact" in params.estimate.methods else [])

    one = dataclasses.replace(params, parallel=dataclasses.replace(params.parallel, workers=1))
    with tempfile.TemporaryDirectory(prefix="fut-scale-", dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        build_cache(one, args.data, args.reference, Path(tmp), progress=False)
        one_wall = time.perf_counter() - t0
        single_store = UpdateCache(run, Path(tmp))
        single = single_store.build_cost()
        equivalent = same_tensors(Path(tmp), args.cache)
        with tempfile.TemporaryDirectory(prefix="fut-projection-", dir=args.workdir) as proj:
            projected = build_projected(single_store, Path(proj))

    dev = protocol.dev_truth(args.groundtruth)
    named = protocol.scored({n: r["order"] for n, r in dev.items()})
    truth = {n: dev[n]["eval_loss"] for n in named}
    scores, losses = {}, {}
    with tempfile.TemporaryDirectory(prefix="fut-bf16-", dir=args.workdir) as tmp:
        variants = {"float32": (run, args.cache), "bfloat16": (as_bfloat16(run, args.cache, Path(tmp)), Path(tmp))}
        for dtype, (r, folder) in variants.items():
            ctx = EstimationContext(r, folder)
            estimates, peaks = {}, {}
            for m in methods:
                with measured() as cost:
                    est = estimators.estimate(ctx, list(named.values()), m)
                estimates[m], peaks[m] = dict(zip(named, est.eval_loss.double().tolist())), cost.peak_mb
            block = protocol.score_block(estimates, truth, ctx.naive_loss, params.estimate.bootstrap, 0)["families"]
            sizes = UpdateCache(r, folder).bytes()
            scores[dtype] = {"cache_bytes": sizes["total_file_bytes"], "grad_bytes": sizes["grad"], "methods": {
                m: {"random": {k: block["random"][m][k] for k in ("spearman", "r2_order_effect", "bias_ppl")},
                    "all": {k: block["all"][m][k] for k in ("spearman", "r2_order_effect", "absdiff_ppl")},
                    "estimate_peak_mb": peaks[m]} for m in methods}}
            losses[dtype] = estimates
    bf16_shift = {m: max(abs(losses["float32"][m][n] - losses["bfloat16"][m][n]) for n in named) for m in methods}

    gradients_per_second = single["gradients"] / single["grad_seconds"]
    result = {
        "gradients_per_second": gradients_per_second,
        "limit_gradients_per_second": 1 / step_s,
        "throughput_fraction_of_limit": gradients_per_second * step_s,
        "train_step_seconds": step_s,
        "one_process_build": single,
        "projection_seconds": projected["seconds"],
        "projection_overhead": projected["seconds"] / single["grad_seconds"],
        "projector": projected["projector"],
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
        "dev_orders": len(named),
        "cpu_count": len(os.sched_getaffinity(0)),
    }
    for path in (args.out, args.metrics):
        atomic_write_json(path, result)

    print(f"gradients/s {gradients_per_second:.1f} vs limit {1 / step_s:.1f} "
          f"({result['throughput_fraction_of_limit']:.0%}; train step {step_s * 1e3:.0f} ms); the projection stage "
          f"adds {projected['seconds']:.1f} s ({result['projection_overhead']:.1%} of the gradients' time)")
    print(f"one process {one_wall:.0f} s, {result['workers']} torchrun ranks {stage['wall_seconds']:.0f} s "
          f"({result['workers_speedup']:.2f}x); same tensors: {equivalent}")
    print(f"plan {result['plan_bytes']} bytes, written {result['actual_bytes']} bytes "
          f"({result['actual_tensor_bytes']} in tensors)")
    fmt = lambda x: "      -" if x is None else f"{x:7.3f}"
    print(f"{len(named)} dev orders (random family: ρ, R², bias PPL; all: R²):")
    print(f"{'grad dtype':10s} {'method':20s} {'rand ρ':>7s} {'rand R²':>7s} {'rand bias':>9s} "
          f"{'all R²':>7s} {'cache MB':>9s} {'peak MB':>8s}")
    for dtype, s in scores.items():
        for m, a in s["methods"].items():
            print(f"{dtype:10s} {m:20s} {fmt(a['random']['spearman'])} {fmt(a['random']['r2_order_effect'])} "
                  f"{fmt(a['random']['bias_ppl']):>9s} {fmt(a['all']['r2_order_effect'])} "
                  f"{s['cache_bytes'] / 2**20:9.0f} {a['estimate_peak_mb']:8.0f}")
    for m, shift in bf16_shift.items():
        print(f"bfloat16 moves {m}'s estimated eval loss by at most {shift:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
