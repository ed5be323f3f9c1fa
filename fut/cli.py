"""`python -m fut`: retrain or estimate orders from a file, printing JSON for scripts.

  python -m fut retrain  --orders FILE [--params params.yaml]
  python -m fut estimate --orders FILE [--method NAME] [--params params.yaml]

FILE holds one order per line, comma-separated batch indices. Both print a JSON list, one object per order:
{"order": [...], "eval_loss": x, "eval_ppl": y} (plus "method" for estimate).
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
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
