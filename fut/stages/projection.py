"""Stage `projection`: the paper's projected update terms, from the cache's gradients (fut/projected.py).

    python -m fut.stages.projection [--params params.yaml] [--metrics reports/metrics/projection.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cache import UpdateCache
from ..config import Params, load
from ..projected import build_projected
from ..reference import ReferenceRun
from ..storage import atomic_write_json


def run(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, out_dir: Path) -> dict:
    store = UpdateCache(ReferenceRun(params, data_dir, ref_dir), cache_dir)
    return build_projected(store, out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fut.stages.projection", description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file (default: %(default)s)")
    for name, default in (("data", "data/prepared"), ("reference", "data/reference"), ("cache", "data/cache"),
                          ("out", "data/projection"), ("metrics", "reports/metrics/projection.json")):
        ap.add_argument(f"--{name}", type=Path, default=Path(default), help="(default: %(default)s)")
    args = ap.parse_args(argv)
    metrics = run(load(args.params), args.data, args.reference, args.cache, args.out)
    atomic_write_json(args.metrics, metrics)
    print(f"{args.out}: {metrics['projector']['kind']} projection to k = {metrics['projector']['k']} in "
          f"{metrics['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
