"""The DVC stages as functions: each reads params, builds its artefacts and returns its metrics.
Notebooks call these, draw the figures and write the metrics."""
from __future__ import annotations

import logging
import random
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from . import config, corpus, data, estimators
from .cache import UpdateCache, build_cache
from .device import resolve_device
from .estimators import EstimationContext
from .validation import accuracy
from .evaluation import ppl
from .groundtruth import Oracle, noise_floor, run_groundtruth
from .orders import groundtruth_orders
from .plan import cache_plan, check_disk, with_time
from .plan import describe as describe_plan
from .reference import checkpoint_path, load_checkpoint, run_reference, states_equal
from .storage import atomic_write_json, read_json

log = logging.getLogger(__name__)


def prepare(params: config.Params, out_dir: Path) -> dict:
    """Corpus text per domain, the BPE tokenizer, and the packed splits."""
    resolve_device(params.train)   # a GPU profile on a machine without a GPU is refused before any work
    out_dir = Path(out_dir)
    files = corpus.write_domains(params.corpus, out_dir / "corpus", params.data.seed)
    tokenizer = data.train_tokenizer(files, params.tokenizer.vocab_size, params.tokenizer.min_frequency,
                                     out_dir / data.TOKENIZER_DIR)
    packed = data.pack_domains(files, tokenizer, params.data.seq_len)
    splits = data.split(packed, params)
    domains = list(files)
    data.write_prepared(out_dir, splits, domains, data.window_plan(domains, params), tokenizer, params)
    return {"domains": domains, "vocab_size": len(tokenizer),
            "sequences_per_domain": {d: int(packed[d].shape[0]) for d in domains},
            "tokens_per_domain": {d: int(packed[d].numel()) for d in domains},
            "warmstart_sequences": int(splits["warmstart"].shape[0]),
            "window_shape": list(splits["window"].shape),
            "missing_domains": [d for d in params.corpus.sources if d not in files]}


def reference(params: config.Params, data_dir: Path, ref_dir: Path) -> tuple[dict, dict]:
    """Reference run, then one retrain of the identity order compared bit for bit with the stored θ_T, m_T, v_T."""
    prepared = data.load_prepared(data_dir, params)
    summary = run_reference(params, prepared, ref_dir)
    atomic_write_json(Path(ref_dir) / "summary.json", summary)
    T = params.window.steps
    oracle = Oracle(params, data_dir, ref_dir)
    bitwise = states_equal(oracle.retrain_trainer(range(T)).state(),
                           load_checkpoint(ref_dir, T, summary["reference_hash"]))
    metrics = {
        "n_params": summary["n_params"], "window_steps": T, "batch_size": params.window.batch_size,
        "seq_len": params.data.seq_len, "domains": prepared.domains,
        "eval_ppl_start": ppl(summary["eval_loss_start"]), "eval_ppl_end": ppl(summary["eval_loss_end"]),
        "domain_eval_ppl_end": {d: ppl(x) for d, x in summary["domain_eval_loss_end"].items()},
        "identity_retrain_bitwise": bitwise, "device": summary["device"],
        "warmstart_seconds": summary["warm_seconds"],
        "window_seconds": summary["window_seconds"],
        "checkpoint_bytes": sum(checkpoint_path(ref_dir, t).stat().st_size for t in range(T + 1)),
    }
    return summary, metrics


def groundtruth(params: config.Params, data_dir: Path, ref_dir: Path, out_dir: Path) -> tuple[dict, dict]:
    """Retrain the seeded order set; returns per-order results and summary metrics."""
    prepared = data.load_prepared(data_dir, params)
    summary = read_json(Path(ref_dir) / "summary.json")
    g = params.groundtruth
    orders = groundtruth_orders(params.window.steps, g.n_random, g.seed, g.structured, prepared.window_domains,
                                len(prepared.domains), summary["batch_losses_start"])
    results = run_groundtruth(params, orders, data_dir, ref_dir, Path(out_dir) / "orders", g.eval_every, g.workers)
    ppls = [r["eval_ppl"] for r in results.values()]
    random_ppls = [r["eval_ppl"] for n, r in results.items() if n.startswith("random-")]
    metrics = {
        "n_orders": len(results), "n_random": len(random_ppls),
        "true_ppl_mean": statistics.fmean(ppls), "true_ppl_std": statistics.pstdev(ppls),
        "true_ppl_min": min(ppls), "true_ppl_max": max(ppls),
        "random_ppl_std": statistics.pstdev(random_ppls) if random_ppls else None,
        "identity_ppl": results["identity"]["eval_ppl"],
        "retrain_seconds_per_order": statistics.fmean(r["seconds"] for r in results.values()),
        "workers": g.workers,
        "noise_floor": noise_floor(Oracle(params, data_dir, ref_dir)),
    }
    return results, metrics


def cache(params: config.Params, data_dir: Path, ref_dir: Path, cache_dir: Path) -> dict:
    """Plan the update cache (refused before any work when the disk cannot hold it), build or resume it;
    returns the plan, its cost and storage."""
    prepared = data.load_prepared(data_dir, params)
    plan = cache_plan(params, prepared, cache_dir)
    check_disk(plan, cache_dir)
    plan = with_time(plan, params, prepared)
    print(describe_plan(plan))
    start = time.perf_counter()
    built = build_cache(params, data_dir, ref_dir, cache_dir)
    wall = time.perf_counter() - start
    store = UpdateCache(params, prepared, ref_dir, cache_dir)
    c = params.cache
    cost = store.build_cost()
    metrics = {**built, **cost, "bytes": store.bytes(), "projection": c.projection, "k": c.k, "dtype": c.dtype,
               "curvature_rank": c.curvature_rank, "curvature_stride": c.curvature_stride,
               "checkpoint_stride": c.checkpoint_stride, "plan": plan, "wall_seconds": wall}
    atomic_write_json(Path(cache_dir) / "stats.json", metrics)
    return metrics


def held_out(names: list[str], seed: int) -> list[str]:
    """The fixed half of the ground-truth orders (identity excluded) that no tuning ever sees."""
    pool = sorted(n for n in names if n != "identity")
    random.Random(seed).shuffle(pool)
    return sorted(pool[: (len(pool) + 1) // 2])


def held_out_truth(params: config.Params, gt_dir: Path) -> tuple[dict, list[str], list[list[int]], np.ndarray]:
    """All ground-truth results, and the names, orders and true final eval losses of the held-out ones."""
    truth = read_json(Path(gt_dir) / "results.json")
    names = held_out(list(truth), params.estimate.holdout_seed)
    return truth, names, [truth[n]["order"] for n in names], np.array([truth[n]["eval_loss"] for n in names])


def _method_bytes(method: str, sizes: dict) -> int:
    if method == "naive":
        return 0
    if method == "tracin":
        return sizes["projected"]
    extra = sizes["curvature"] if method.startswith("fut-state:eig") else 0
    return sizes["grad"] + sizes["eval_grad"] + extra


def estimate(params: config.Params, data_dir: Path, ref_dir: Path, cache_dir: Path, gt_dir: Path) -> tuple[dict, dict]:
    """Every configured estimator on the held-out ground-truth orders, against retraining."""
    e = params.estimate
    truth, names, orders, true_loss = held_out_truth(params, gt_dir)
    ctx = EstimationContext(params, data_dir, ref_dir, cache_dir)
    cache_stats = read_json(Path(cache_dir) / "stats.json")

    # Retraining cost for the same readout (final eval loss only), measured here, side by side.
    oracle = Oracle(params, data_dir, ref_dir)
    t0 = time.perf_counter()
    for order in orders[:3]:
        oracle.retrain(order)
    retrain_s = (time.perf_counter() - t0) / len(orders[:3])

    identity = list(range(params.window.steps))
    methods, per_order = {}, {"order": names, "true_loss": true_loss.tolist()}
    for method in e.methods:
        est = estimators.estimate(ctx, orders, method, readout_kind=e.readout, k=e.k)
        exact_identity = float(estimators.estimate(ctx, [identity], method, e.readout, e.k).eval_loss[0]) == ctx.naive_loss
        loss = est.eval_loss.double().numpy()
        per_order[method] = loss.tolist()
        sec = est.seconds / len(orders)
        cache_s = 0.0 if method == "naive" else cache_stats["seconds"]
        methods[method] = {
            **accuracy(loss, true_loss, ctx.naive_loss, e.bootstrap, e.holdout_seed),
            "seconds_per_order": sec, "speedup_vs_retrain": retrain_s / sec if sec > 0 else None,
            "cache_seconds": cache_s,
            "cache_bytes": _method_bytes(method, cache_stats["bytes"]),
            "break_even_orders": (cache_s / (retrain_s - sec)) if cache_s and sec < retrain_s else None,
            "identity_returns_reference": exact_identity,
            "first_non_finite_step": min((t for t in est.non_finite_step if t is not None), default=None),
            "peak_rss_mb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        log.info("%s: %s", method, {k: methods[method][k] for k in ("spearman", "r2_order_effect", "seconds_per_order")})
    trajectories = estimate_trajectories(ctx, oracle, truth, names[: e.trajectory_orders], e.methods)
    for method, err in trajectories["error"].items():
        methods[method].update(err)
    metrics = {"retrain_seconds_per_order": retrain_s, "default_method": e.default, "readout": e.readout,
               "held_out_orders": len(names), "naive_eval_loss": ctx.naive_loss, "methods": methods,
               "trajectory_orders": trajectories["orders"]}
    return {"per_order": per_order, "trajectories": trajectories}, metrics


def estimate_trajectories(ctx, oracle: Oracle, truth: dict, names: list[str], methods: list[str]) -> dict:
    """Estimated and true eval loss along the steps for a few orders (the paper's trajectory figure), and per
    parameter-space method the mean error along the steps and the parameter error ‖γ_est − γ_true‖ /
    ‖θ_T − γ_true‖ at the end."""
    methods = [m for m in methods if m.startswith("fut")]
    rows, errors = [], {m: {"loss": [], "param": []} for m in methods}
    for name in names:
        order = truth[name]["order"]
        true_curve = dict(zip(truth[name]["trajectory"]["step"], truth[name]["trajectory"]["eval_loss"]))
        gamma_true = ctx.layout.flatten(oracle.retrain_trainer(order).state().theta).to(ctx.device)
        for method in methods:
            # One replay gives both the curve and δ_T: the last eval step is the window's end.
            est, delta = estimators.estimate_along_steps(ctx, order, method, sorted(true_curve))
            for step, true_loss in sorted(true_curve.items()):
                rows.append({"method": method, "order": name, "step": step, "true_loss": true_loss,
                             "est_loss": est[step]})
                errors[method]["loss"].append(abs(est[step] - true_loss))
            errors[method]["param"].append(
                float((ctx.params_at(delta) - gamma_true).norm() / (ctx.theta_T - gamma_true).norm()))
    def mean(xs):   # a diverged method (non-finite estimates) has no error to report: null, never NaN
        return statistics.fmean(xs) if xs and all(np.isfinite(xs)) else None

    summary = {m: {"mean_abs_loss_error_along_steps": mean(e["loss"]), "param_error": mean(e["param"])}
               for m, e in errors.items()}
    return {"rows": rows, "error": summary, "orders": names}
