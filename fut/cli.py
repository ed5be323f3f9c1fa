"""`python -m fut`: retrain or estimate orders from a file, printing JSON for scripts.

  python -m fut retrain  --orders FILE [--params params.yaml]
  python -m fut estimate --orders FILE [--method NAME] [--params params.yaml]
  python -m fut sweep [--jobs N] [--only POINT ...] [--params params.yaml]
  python -m fut reliability [--out reports/metrics/reliability.json] [--params params.yaml]
  python -m fut plan [--params params.yaml] [--no-timing]
  torchrun --nproc-per-node N -m fut cache [--params params.yaml]   (or python -m fut cache)

FILE holds one order per line, comma-separated batch indices. Both print a JSON list, one object per order:
{"order": [...], "eval_loss": x, "eval_ppl": y} (plus "method" for estimate). `sweep` runs the ablations
that need their own reference run (params `sweep`; see fut/sweep.py) and writes reports/sweeps/POINT.json.
`plan` prints what the cache of these params will cost (files, bytes, gradient evaluations, estimated time)
and exits with status 1 when its disk cannot hold it. `cache` builds the cache, shared over the ranks when
launched by torchrun (any number of processes or nodes; each rank builds its share of the work units, rank 0
writes the manifest), else with `cache.workers` ranks it launches itself. `reliability` runs the fault,
bad-input and determinism scenarios of fut/reliability.py on tiny params (a few minutes) and writes their
counts and outcomes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import config
from .config import METHODS
from .evaluation import ppl
from .orders import OrderError, parse_orders_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fut", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("retrain", "estimate"):
        p = sub.add_parser(name)
        p.add_argument("--orders", required=True, type=Path, help="one order per line, comma-separated indices")
        p.add_argument("--params", default=Path("params.yaml"), type=Path)
        p.add_argument("--data", default=Path("data/prepared"), type=Path)
        p.add_argument("--reference", default=Path("data/reference"), type=Path)
        if name == "estimate":
            p.add_argument("--method", default=None, choices=METHODS, help="default: estimate.default in params")
            p.add_argument("--cache", default=Path("data/cache"), type=Path)
    p = sub.add_parser("sweep", help="one whole run per value of each sweep knob (params `sweep`)")
    p.add_argument("--params", default=Path("params.yaml"), type=Path)
    p.add_argument("--corpus", default=Path("data/prepared/corpus"), type=Path,
                   help="the default run's corpus text, one DOMAIN.txt per domain")
    p.add_argument("--work", default=Path("data/sweeps"), type=Path, help="scratch folder of the running points")
    p.add_argument("--out", default=Path("reports/sweeps"), type=Path)
    p.add_argument("--jobs", type=int, default=None, help="points in parallel (default: sweep.jobs)")
    p.add_argument("--only", nargs="+", default=None, help="run only these points, e.g. default steps=12")
    for name in ("plan", "cache"):
        p = sub.add_parser(name, help="print the cache's cost and check the disk" if name == "plan" else
                           "build or resume the cache (as torchrun ranks or cache.workers of them)")
        p.add_argument("--params", default=Path("params.yaml"), type=Path)
        p.add_argument("--data", default=Path("data/prepared"), type=Path)
        p.add_argument("--reference", default=Path("data/reference"), type=Path)
        p.add_argument("--cache", default=Path("data/cache"), type=Path)
        if name == "plan":
            p.add_argument("--no-timing", action="store_true", help="skip timing a gradient and an HVP here")
    p = sub.add_parser("retrain-job", help="a torchrun rank's part of a parallel retrain (launched by fut itself)")
    p.add_argument("job", type=Path)
    p.add_argument("--params", required=True, type=Path)
    p = sub.add_parser("reliability", help="kill, corruption, NaN, bad-input and rerun scenarios on tiny params")
    p.add_argument("--params", default=Path("params.yaml"), type=Path, help="the defaults the tiny params shrink")
    p.add_argument("--out", default=Path("reports/metrics/reliability.json"), type=Path)
    p.add_argument("--work", default=None, type=Path, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "reliability":
        return _reliability(args)
    if args.command in ("plan", "cache"):
        return _cache(args)
    if args.command == "retrain-job":
        from .groundtruth import run_retrain_job

        run_retrain_job(args.job, config.load(args.params))
        return 0
    try:
        params = config.load(args.params)
        if not args.orders.is_file():
            raise OrderError(f"--orders {str(args.orders)!r}: file not found")
        orders = parse_orders_file(args.orders.read_text(), params.window.steps, permutation=False)
    except (config.ConfigError, OrderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "retrain":
        from .groundtruth import Oracle

        oracle = Oracle(params, args.data, args.reference)
        out = [{"order": o, "eval_loss": (r := oracle.retrain(o))["eval_loss"], "eval_ppl": r["eval_ppl"]}
               for o in orders]
    else:
        from .estimators import EstimationContext, estimate

        method = args.method or params.estimate.default
        ctx = EstimationContext(params, args.data, args.reference, args.cache)
        est = estimate(ctx, orders, method, params.estimate.readout, params.estimate.k)
        out = [{"order": o, "method": method, "eval_loss": float(x), "eval_ppl": ppl(float(x))}
               for o, x in zip(orders, est.eval_loss)]
    json.dump(out, sys.stdout)
    print()
    return 0


def _cache(args) -> int:
    from .data import load_prepared
    from .storage import ArtefactMismatch, InsufficientDisk

    try:
        params = config.load(args.params)
        prepared = load_prepared(args.data, params)
    except (config.ConfigError, FileNotFoundError, ArtefactMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "cache":
        from .cache import build_cache

        build_cache(params, args.data, args.reference, args.cache)
        return 0
    from .plan import cache_plan, check_disk, describe, with_time

    plan = cache_plan(params, prepared, args.cache)
    if not args.no_timing:
        plan = with_time(plan, params, prepared)
    print(describe(plan))
    json.dump(plan, sys.stdout)
    print()
    try:
        check_disk(plan, args.cache)
    except InsufficientDisk as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _sweep(args) -> int:
    from .sweep import run_sweep

    try:
        params = config.load(args.params)
        if not args.corpus.is_dir():
            raise ValueError(f"--corpus {str(args.corpus)!r}: no such folder; run the prepare stage first "
                             "(dvc repro prepare)")
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: expected an int >= 1")
        run_sweep(params, args.corpus, args.work, args.out, args.jobs, args.only)
    except (config.ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _reliability(args) -> int:
    import tempfile

    from .reliability import run_all
    from .storage import atomic_write_json

    with tempfile.TemporaryDirectory(prefix="fut-reliability-") as tmp:
        result = run_all(args.params, args.work or Path(tmp))
    atomic_write_json(args.out, result)
    print(f"{args.out}: {result['fault_scenarios_passed']}/{result['fault_scenarios_tested']} fault scenarios passed, "
          f"{result['bad_inputs_refused']}/{result['bad_inputs_tested']} bad inputs refused, deterministic rerun: "
          f"{result['deterministic_rerun']}")
    ok = (result["fault_scenarios_passed"] == result["fault_scenarios_tested"]
          and result["bad_inputs_refused"] == result["bad_inputs_tested"] and result["deterministic_rerun"])
    return 0 if ok else 1
