"""Stage `estimate`: every configured estimator on the dev orders (the block every choice was made on) and on the
test orders (the final table, scored by fut.protocol.final_scoring), against retraining; costs against a retrain
timed as a user gets the same number."""
from __future__ import annotations

import logging
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import estimators, protocol
from ..cache import gradient_counts, subspace_checkpoints
from ..config import Params
from ..costs import fair_retrain_seconds, measured
from ..estimate_jobs import Unit, run_units
from ..estimators import EstimationContext
from ..groundtruth import Oracle
from ..methods import METHODS
from ..orders import family
from ..reference import ReferenceRun
from ..stats import rank_correlation
from ..storage import read_json
from ..surrogate import PositionModel, fit_to_estimator, random_orders

log = logging.getLogger(__name__)

FROM_SCRATCH = (10, 100, 1000)
# The params sections that decide this stage's numbers (through the stages before it): their hash is the
# summary's provenance.
RESULT_SECTIONS = ("corpus", "tokenizer", "data", "model", "optimizer", "warmstart", "window", "train", "groundtruth",
                   "cache", "projection", "estimate")
TIMED_RETRAINS = 5
THROUGHPUT_ORDERS = 20_000       # random orders the default method scores in one timed batched call
# The surrogate is fitted to this many estimates per T² (its model has (T − 1)² + 1 free directions): the most
# accurate of 4, 16 and 64 on the dev random orders (benchmarks/surrogate_calls.py: R² 0.661, 0.726, 0.739).
SURROGATE_CALLS = 64
SURROGATE_TIMED = 1_000_000      # ... and the surrogate
SURROGATE = "surrogate"          # its name beside the methods in the dev and test blocks


def subset(orders: dict[str, list[int]], n: int) -> dict[str, list[int]]:
    """The orders a costly method is scored on: half random, half the others (in name order), the same for every
    method of its class."""
    rand = sorted(o for o in orders if family(o) == "random")
    rest = sorted(o for o in orders if family(o) != "random")
    keep = rand[: (n + 1) // 2] + rest[: n // 2]
    return {k: orders[k] for k in sorted(keep)}


def one_time_seconds(method: str, params: Params, stats: dict, T: int, eval_batches: float,
                     projection_seconds: float) -> float:
    """The cache work a method reads, in seconds, from the cache build's own records: every gradient it needs at
    the measured seconds per gradient, its eigenspaces' Lanczos, fut-subspace's matrices, the projection."""
    m = METHODS[method]
    if method == "naive":
        return 0.0
    per_grad = stats["seconds_per_gradient"]
    per_eval = stats["eval_grad_seconds"] / max(gradient_counts(params, T, eval_batches)["eval_gradients"], 1e-12)
    if m.needs_subspace:
        grads = len(subspace_checkpoints(params, T)) * T + 2 * T
        evals = eval_batches
        extra = stats["curvature_seconds"] + stats["subspace_seconds"]
    else:
        counts = gradient_counts(params, T, eval_batches)
        grads = counts["pair_gradients"] + counts["own_gradients"]
        evals = counts["eval_gradients"] if m.needs_eval_gradients else eval_batches
        extra = (stats["curvature_seconds"] if m.needs_eigenspaces else 0.0) + (
            projection_seconds if m.needs_projection else 0.0)
    return grads * per_grad + evals * per_eval + extra


def run(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, projection_dir: Path,
        gt_dir: Path) -> tuple[dict, dict]:
    e = params.estimate
    ref = ReferenceRun(params, data_dir, ref_dir)
    with measured() as load:
        ctx = EstimationContext(ref, cache_dir, projection_dir)
    summary = read_json(Path(ref_dir) / "summary.json")
    splits = protocol.split_orders(params, ref.prepared.window_domains, len(ref.prepared.domains),
                                   summary["batch_losses_start"])
    dev = protocol.dev_truth(gt_dir)
    orders = {protocol.DEV: protocol.scored({n: r["order"] for n, r in dev.items()}),
              protocol.TEST: protocol.scored(splits[protocol.TEST])}

    # A retrain as a user gets the same number: the window and the final eval loss, in this process.
    oracle = Oracle(ref)
    timed = [o for n, o in orders[protocol.DEV].items() if family(n) == "random"][:TIMED_RETRAINS]
    retrain = fair_retrain_seconds(oracle.eval_loss, timed, ref.device)
    retrain_s = retrain["median"]

    # Every method's estimates, and the trajectory figure's replays, shared out over the worker ranks.
    trajectory_orders = [n for n, r in dev.items() if "trajectory" in r]
    true_params = {n: ctx.layout.flatten(oracle.trainer(dev[n]["order"]).state().theta) for n in trajectory_orders}
    along = [m for m in e.trajectory_methods if m in e.methods]
    units, scored = [], []
    for method in e.methods:
        scored_on = METHODS[method].scored_on
        for split, named in orders.items():
            if scored_on == "expensive" and split == protocol.DEV:
                continue
            chosen = {"all": named, "replay": subset(named, e.replay_orders),
                      "expensive": subset(named, e.expensive_orders)}[scored_on]
            units.append(Unit(method, chosen, e.readout, e.k, cost=len(chosen) * unit_cost(method)))
            scored.append((method, split))
    units += trajectory_units(dev, trajectory_orders, along)
    dirs = {"data": data_dir, "reference": ref_dir, "cache": cache_dir, "projection": projection_dir}
    results = run_units(ctx, dirs, units, true_params)

    estimates = {split: {} for split in orders}
    trust = {split: {} for split in orders}       # the default method's per-order error indicators
    seconds, diverged = {}, {}
    for (method, split), out in zip(scored, results):
        named = estimates[split][method] = out["eval_loss"]
        if method == e.default and out["indicators"]:
            trust[split] = {n: {k: v[i] for k, v in out["indicators"].items()} for i, n in enumerate(named)}
        if split == protocol.TEST:
            seconds[method] = out["seconds"] / len(named)
            diverged[method] = min((t for t in out["non_finite_step"] if t is not None), default=None)
            log.info("%s: %.4f s per order", method, seconds[method])

    # The search surrogate, scored like a method on both splits (its fit reads no truth).
    model, surrogate = fit_surrogate(ctx, e.default, ref.T)
    if model is not None:
        for split, named in orders.items():
            estimates[split][SURROGATE] = dict(zip(named, model.score(np.array(list(named.values()))).tolist()))

    dev_block = protocol.score_block(estimates[protocol.DEV], {n: dev[n]["eval_loss"] for n in orders[protocol.DEV]},
                                     ctx.naive_loss, e.bootstrap, 0)

    def same_orders(stored: dict[str, list[int]]) -> None:
        if protocol.scored(stored) != orders[protocol.TEST]:
            raise ValueError(f"{gt_dir}/test holds other orders than params groundtruth.test generates; rerun the "
                             "groundtruth stage (dvc repro groundtruth)")

    test_block, test_rows = protocol.final_scoring(gt_dir, estimates[protocol.TEST], ctx.naive_loss, e.bootstrap, 0,
                                                   same_orders)

    cache_stats = read_json(Path(cache_dir) / "stats.json")
    eval_batches = ref.prepared.eval_mixed.shape[0] / ref.batch_size
    methods = {}
    for method in e.methods:
        once = one_time_seconds(method, params, cache_stats, ref.T, eval_batches,
                                projection_seconds=ctx.projected.seconds if METHODS[method].needs_projection else 0.0)
        sec = seconds[method]
        methods[method] = {
            "family": METHODS[method].family, "about": METHODS[method].about, "readout": METHODS[method].readout,
            "seconds_per_order": sec, "speedup_vs_retrain": retrain_s / sec if sec > 0 else None,
            "one_time_seconds": once,
            "break_even_orders": once / (retrain_s - sec) if method != "naive" and sec < retrain_s else None,
            "first_non_finite_step": diverged[method], "scored_on": METHODS[method].scored_on}

    default = e.default
    end_to_end = _end_to_end_seconds(ref, cache_dir, list(orders[protocol.TEST].values()), default)
    per_order = end_to_end["seconds"] / len(orders[protocol.TEST])
    once = methods[default]["one_time_seconds"]
    metrics = {
        "default_method": default, "readout": e.readout, "naive_eval_loss": ctx.naive_loss,
        "params_hash": params.section_hash(*RESULT_SECTIONS),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "retrain_seconds_per_order": retrain_s, "retrain_seconds_timed": retrain["all"],
        "default_seconds_per_order": per_order, "speedup_per_order": retrain_s / per_order,
        "break_even_orders": once / (retrain_s - per_order) if per_order < retrain_s else None,
        "from_scratch": {str(n): {"estimate_seconds": once + n * per_order, "retrain_seconds": n * retrain_s,
                                  "speedup": n * retrain_s / (once + n * per_order)} for n in FROM_SCRATCH},
        "context_seconds": load.seconds, "end_to_end": end_to_end,
        "methods": methods, "dev": dev_block, "test": test_block,
        "readouts": _readout_fidelity(estimates[protocol.TEST], seconds),
        "error_indicator": error_indicator(default, trust, estimates[protocol.DEV].get(default, {}), dev, test_rows),
        "surrogate": {**surrogate, "families": {f: {k: m[k] for k in (SURROGATE, default) if k in m}
                                                for f, m in test_block["families"].items()}} if surrogate else {},
        "replay_orders": e.replay_orders, "expensive_orders": e.expensive_orders,
    }
    trajectories = trajectory_summary(dev, trajectory_orders, along, results[len(scored):])
    for method, err in trajectories["error"].items():
        metrics["methods"][method].update(err)
    metrics["trajectory_orders"] = trajectories["orders"]
    dev_rows = protocol.per_order_rows(estimates[protocol.DEV], {n: dev[n]["eval_loss"] for n in orders[protocol.DEV]},
                                       protocol.DEV)
    return {"per_order": dev_rows + test_rows, "trajectories": trajectories}, metrics


def error_indicator(method: str, trust: dict, dev_estimates: dict[str, float], dev: dict,
                    test_rows: list[dict]) -> dict:
    """How each of the default method's error indicators ranks its true absolute error in PPL, on the dev orders
    and on the test orders (the final scoring's rows), and the test orders' pairs (indicators, true error) that the
    ablations pool with the sweep points'."""
    if not trust[protocol.DEV]:
        return {}
    err = lambda est, true: abs(float(np.exp(est)) - float(np.exp(true)))
    errors = {protocol.DEV: {n: err(dev_estimates[n], dev[n]["eval_loss"]) for n in trust[protocol.DEV]},
              protocol.TEST: {r["order"]: err(r["est_loss"], r["true_loss"]) for r in test_rows if r["method"] == method}}
    names = sorted(next(iter(trust[protocol.DEV].values())))
    out = {"method": method, "spearman": {}}
    for split, by_order in errors.items():
        orders_ = [n for n in by_order if n in trust[split]]
        out["spearman"][split] = {k: rank_correlation([trust[split][n][k] for n in orders_],
                                                      [by_order[n] for n in orders_]) for k in names}
    # The factor that turns the indicator into an error in PPL, on the dev orders only (RMS true error over RMS
    # indicator): what the ablations use to predict a run's skill score from its indicators.
    ind = np.array([trust[protocol.DEV][n]["error_indicator_ppl"] for n in errors[protocol.DEV]])
    err_dev = np.array(list(errors[protocol.DEV].values()))
    out["scale"] = float(np.sqrt((err_dev ** 2).sum() / max((ind ** 2).sum(), 1e-30)))
    est = {r["order"]: float(np.exp(r["est_loss"])) for r in test_rows if r["method"] == method}
    out["test_pairs"] = [{"order": n, "est_ppl": est[n], "abs_error_ppl": errors[protocol.TEST][n],
                          **trust[protocol.TEST][n]} for n in sorted(errors[protocol.TEST]) if n in trust[protocol.TEST]]
    return out


def _end_to_end_seconds(ref: ReferenceRun, cache_dir: Path, orders: list[list[int]], method: str) -> dict:
    """The default method as a user runs it on the test orders: a fresh context (cache reads and checks
    included), then the estimates."""
    t0 = time.perf_counter()
    ctx = EstimationContext(ReferenceRun(ref.params, ref.data_dir, ref.ref_dir), cache_dir)
    t1 = time.perf_counter()
    estimators.estimate(ctx, orders, method)
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "context_seconds": t1 - t0, "estimate_seconds": t2 - t1, "n_orders": len(orders)}


def _readout_fidelity(test: dict[str, dict[str, float]], seconds: dict[str, float]) -> dict:
    """fut-subspace's readouts side by side on the test orders: how the quadratic one agrees with evaluating the
    estimated parameters (ranking and absolute error in loss), and what each costs per order."""
    quad, exact = test.get("fut-subspace"), test.get("fut-subspace:exact")
    if not quad or not exact:
        return {}
    names = sorted(set(quad) & set(exact))
    q, x = np.array([quad[n] for n in names]), np.array([exact[n] for n in names])
    return {"quadratic_vs_exact_spearman": rank_correlation(q, x),
            "quadratic_vs_exact_mean_abs_loss": float(np.mean(np.abs(q - x))),
            "quadratic_seconds_per_order": seconds["fut-subspace"],
            "exact_seconds_per_order": seconds["fut-subspace:exact"], "n": len(names)}


def fit_surrogate(ctx: EstimationContext, method: str, T: int) -> tuple[PositionModel | None, dict]:
    """The additive surrogate of the default method (fut/surrogate.py), fitted to its estimates of
    SURROGATE_CALLS·T² seeded random orders, when the method is cheap enough to call that often (a quadratic
    readout); and the throughput of both in one batched call, timed on random orders."""
    if METHODS[method].readout != "quadratic":
        return None, {}

    def call(orders: np.ndarray) -> np.ndarray:
        return estimators.estimate(ctx, orders.tolist(), method).eval_loss.double().numpy()

    calls = SURROGATE_CALLS * T * T
    with measured() as fitting:
        model = fit_to_estimator(call, T, calls, seed=11)
    sigma = random_orders(T, THROUGHPUT_ORDERS, seed=7)
    call(sigma[:100])                                                        # warm up
    with measured() as est_time:
        call(sigma)
    sigma = random_orders(T, SURROGATE_TIMED, seed=8)
    with measured() as sur_time:
        model.score(sigma)
    return model, {"fitted_to": method, "estimator_calls": calls, "fit_seconds": fitting.seconds,
                   "orders_per_second": SURROGATE_TIMED / sur_time.seconds,
                   "estimator_orders_per_second": THROUGHPUT_ORDERS / est_time.seconds}


def unit_cost(method: str) -> float:
    """Rough seconds per order of a method on the default run, to share the units out evenly over the ranks."""
    m = METHODS[method]
    if m.scored_on != "all":
        return {"replay": 1.0, "expensive": 5.0}[m.scored_on]
    return 0.5 if m.readout == "exact" and method != "naive" else 0.05


def trajectory_units(truth: dict, names: list[str], methods: list[str]) -> list[Unit]:
    """The paper's trajectory figure: each method's estimated eval loss at the steps where the named dev orders'
    retrains measured it."""
    orders = {n: truth[n]["order"] for n in names}
    steps = {n: sorted(truth[n]["trajectory"]["step"]) for n in names}
    return [Unit(m, orders, steps=steps, cost=len(names) * 4 * unit_cost(m)) for m in methods] if names else []


def trajectory_summary(truth: dict, names: list[str], methods: list[str], results: list[dict]) -> dict:
    """Estimated and true eval loss along the steps for the trajectory dev orders, and per method (of
    estimate.trajectory_methods) the mean error along the steps and the parameter error ‖γ_est − γ_true‖ /
    ‖θ_T − γ_true‖ at the end."""
    by_method = dict(zip(methods, results))
    rows, errors = [], {m: {"loss": [], "param": []} for m in by_method}
    for name in names:
        true_curve = dict(zip(truth[name]["trajectory"]["step"], truth[name]["trajectory"]["eval_loss"]))
        for method, out in by_method.items():
            for step, true_loss in sorted(true_curve.items()):
                est = out["along"][name][str(step)]
                rows.append({"method": method, "order": name, "family": family(name), "step": step,
                             "true_loss": true_loss, "est_loss": est})
                errors[method]["loss"].append(abs(est - true_loss))
            errors[method]["param"].append(out["param_error"][name])

    def mean(xs):   # a diverged method (non-finite estimates) has no error to report: null, never NaN
        return statistics.fmean(xs) if xs and all(np.isfinite(xs)) else None

    summary = {m: {"mean_abs_loss_error_along_steps": mean(v["loss"]), "param_error": mean(v["param"])}
               for m, v in errors.items() if v["loss"]}
    return {"rows": rows, "error": summary, "orders": names}
