"""How many estimates the search surrogate needs (fut/surrogate.py), on dev orders only.

The estimate stage fits the additive position model to the default method's estimates of SURROGATE_CALLS·T²
seeded random orders (fut/stages/estimate.py). For each multiplier of `--calls`, the model is fitted the same way
(seed 11) and scored two ways: against the retrained dev random orders (R² of the order effect against naive,
Spearman), and against the method itself on `--held-out` other random orders (Pearson correlation: how much of the
method's order effect an additive model keeps). The stage takes the multiplier with the highest dev random R².
The test orders are not read.

    python benchmarks/surrogate_calls.py [--params params.yaml] [--calls 4 16 64] [--held-out 5000]

Needs the cache and groundtruth stages' outputs. Prints a table and writes benchmarks/results/surrogate_calls.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.options import pipeline_paths, scores  # noqa: E402
from fut import config, estimators, protocol  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.orders import family  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.report import fmt, table  # noqa: E402
from fut.storage import atomic_write_json  # noqa: E402
from fut.surrogate import fit_to_estimator, random_orders  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pipeline_paths(ap, "--cache", "--groundtruth")
    ap.add_argument("--calls", type=int, nargs="+", default=[4, 16, 64], help="estimates per T² to fit to")
    ap.add_argument("--held-out", type=int, default=5000, help="random orders the fits are compared with the method on")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/surrogate_calls.json")
    args = ap.parse_args(argv)
    if min(args.calls) < 1:
        ap.error(f"--calls must be positive integers, got {args.calls}")
    params = config.load(args.params)
    method = params.estimate.default
    ctx = EstimationContext(ReferenceRun(params, args.data, args.reference), args.cache)
    T = ctx.T

    def call(orders: np.ndarray) -> np.ndarray:
        return estimators.estimate(ctx, orders.tolist(), method).eval_loss.double().numpy()

    dev = protocol.dev_truth(args.groundtruth)
    named = protocol.scored({n: r["order"] for n, r in dev.items()})
    rand = [n for n in named if family(n) == "random"]
    orders, truth = np.array([named[n] for n in rand]), np.array([dev[n]["eval_loss"] for n in rand])
    every = list(range(len(rand)))
    held = random_orders(T, args.held_out, seed=99)
    method_held = call(held)
    rows = {}
    for mult in args.calls:
        t0 = time.perf_counter()
        model = fit_to_estimator(call, T, mult * T * T, seed=11)
        seconds = time.perf_counter() - t0
        rows[str(mult)] = {"estimator_calls": mult * T * T, "seconds": seconds,
                           "dev_random": scores(model.score(orders), truth, ctx.naive_loss, every),
                           "held_out_corr_with_method": float(np.corrcoef(model.score(held), method_held)[0, 1])}
    result = {"split": "dev", "method": method, "T": T, "n_dev_random": len(rand), "held_out": args.held_out,
              "method_dev_random": scores(call(orders), truth, ctx.naive_loss, every), "calls": rows,
              "chosen": max(rows, key=lambda k: rows[k]["dev_random"]["r2_order_effect"])}
    atomic_write_json(args.out, result)
    itself = result["method_dev_random"]
    print(f"{method} itself on the {len(rand)} dev random orders: R² {fmt(itself['r2_order_effect'])}, "
          f"Spearman {fmt(itself['spearman'])}")
    print("\n".join(table([[mult, r["estimator_calls"], r["seconds"], r["dev_random"]["r2_order_effect"],
                             r["dev_random"]["spearman"], r["held_out_corr_with_method"]] for mult, r in rows.items()],
                           ["calls per T²", "estimates", "seconds", "R² random (dev)", "Spearman random (dev)",
                            "corr. with the method"])))
    print(f"chosen: {result['chosen']} per T²; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
