"""`python -m fut`: retrain or estimate orders from a file, printing JSON for scripts.

  python -m fut retrain  --orders FILE [--params params.yaml]
  python -m fut estimate --orders FILE [--method NAME] [--params params.yaml]
  python -m fut sweep [--jobs N] [--only POINT ...] [--params params.yaml]
  python -m fut plan [--params params.yaml] [--no-timing]
  torchrun --nproc-per-node N -m fut cache [--params params.yaml]   (or python -m fut cache)

FILE holds one order per line: comma-separated batch indices (a permutation of the window's T batches, or E·T
indices in which every batch appears E times: E epochs), or a sample-level order, T batches separated by `;`, each b
comma-separated indices of the window's sequences (sequence i is the (i mod b)-th of batch i // b; every sequence
once). One kind per file; `estimate` reads E-epoch orders from the multi_epoch stage's cache and sample-level ones
from the sample_orders stage's, with fut-subspace (or naive). Both print a JSON list, one object per order:
{"order": [...], "eval_loss": x, "eval_ppl": y} (plus "method" for estimate); `retrain` shows its progress on
stderr. `sweep` runs the ablations that need their own reference run (params `sweep`; see fut/sweep.py) and
writes reports/sweeps/POINT.json. `plan` prints what the cache of these params will cost (files, bytes, gradient
evaluations, estimated time) and exits with status 1 when its disk cannot hold it. `cache` builds the cache,
shared over the ranks when launched by torchrun (any number of processes or nodes; each rank builds its share of
the work units, rank 0 writes the manifest), else with `parallel.workers` ranks it launches itself.
A refused input (params, orders, missing or mismatched artefacts) is one line on stderr, `error: ...`, exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from . import config
from .methods import METHODS
from .orders import OrderError
from .schedules import as_units, kind_of, parse_orders_file
from .storage import ArtefactMismatch

# Refusals of the files a command reads: printed as one line, never as a traceback.
REFUSED = (config.ConfigError, OrderError, FileNotFoundError, ArtefactMismatch)


class _Parser(argparse.ArgumentParser):
    """A usage error is refused like any other input: one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} -h\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; one whose default is None says in its help what it defaults to."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _version() -> str:
    """The installed distribution's version; fut/__init__.py's when run from a source tree not installed."""
    try:
        return metadata.version("fut")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fut", description=__doc__.split("\n")[0], formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fut {_version()}", help="print fut's version")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        p.add_argument("--params", default=Path("params.yaml"), type=Path, help="the params file")
        return p

    def stage_dirs(p: argparse.ArgumentParser, cache: bool) -> None:
        p.add_argument("--data", default=Path("data/prepared"), type=Path, help="the prepare stage's output")
        p.add_argument("--reference", default=Path("data/reference"), type=Path,
                       help="the reference stage's output (the reference run's trajectory)")
        if cache:
            p.add_argument("--cache", default=Path("data/cache"), type=Path, help="the cache stage's output")

    for name, help in (("retrain", "retrain the window in each order (real training; progress on stderr); "
                                   "print each order's eval loss and PPL as JSON"),
                       ("estimate", "estimate each order's eval loss and PPL from the cache, without retraining; "
                                    "print them as JSON")):
        p = command(name, help)
        p.add_argument("--orders", required=True, type=Path,
                       help="file of orders, one per line: comma-separated batch indices (T, or E·T for E "
                            "epochs), or T ';'-separated batches of sequence indices (required)")
        stage_dirs(p, cache=name == "estimate")
        if name == "estimate":
            p.add_argument("--method", default=None, choices=METHODS, metavar="METHOD",
                           help=f"the estimator, one of {', '.join(METHODS)} (default: estimate.default in params)")
            p.add_argument("--projection", default=Path("data/projection"), type=Path,
                           help="the projection stage's output (read by tracin and fut:projected only)")
            p.add_argument("--sample-cache", default=Path("data/sample_orders/cache"), type=Path,
                           help="the sample_orders stage's per-sequence cache (read for sample-level orders)")
            p.add_argument("--epochs-cache", default=Path("data/multi_epoch/cache"), type=Path,
                           help="the multi_epoch stage's caches (read for E-epoch orders)")
    p = command("sweep", "one whole run per value of each sweep knob (params `sweep`)")
    p.add_argument("--corpus", default=Path("data/prepared/corpus"), type=Path,
                   help="the default run's corpus text, one DOMAIN.txt per domain")
    p.add_argument("--work", default=Path("data/sweeps"), type=Path, help="scratch folder of the running points")
    p.add_argument("--out", default=Path("reports/sweeps"), type=Path, help="where each point's JSON is written")
    p.add_argument("--jobs", type=int, default=None, help="points in parallel (default: sweep.jobs in params)")
    p.add_argument("--only", nargs="+", default=None, metavar="POINT",
                   help="run only these points, e.g. default steps=12 (default: every point)")
    p = command("plan", "print the cache's cost and check the disk can hold it")
    stage_dirs(p, cache=True)
    p.add_argument("--no-timing", action="store_true", help="skip timing a gradient and an HVP here")
    p = command("cache", "build or resume the cache (as torchrun ranks or parallel.workers of them)")
    stage_dirs(p, cache=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING)
    args = _parser().parse_args(argv)
    try:
        params = config.load(args.params)
    except config.ConfigError as err:
        return _refuse(err)
    commands = {"retrain": _retrain, "estimate": _estimate, "sweep": _sweep, "plan": _cache, "cache": _cache}
    return commands[args.command](args, params)


def _refuse(err: Exception, status: int = 2) -> int:
    """A refused input: one line on stderr, `error: ` and the message (which names the file and what to do)."""
    print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)
    return status


def _orders(path: Path, params: config.Params) -> list[list]:
    if not path.is_file():
        raise OrderError(f"--orders {str(path)!r}: file not found; pass a file with one order per line")
    w = params.window
    try:
        return parse_orders_file(path.read_text(), w.steps, w.batch_size, permutation=False)
    except OrderError as err:
        raise OrderError(f"--orders {str(path)!r}: {err}") from err


def _print_json(out: list[dict]) -> int:
    json.dump(out, sys.stdout)
    print()
    return 0


def _retrain(args, params: config.Params) -> int:
    try:
        orders = _orders(args.orders, params)
    except REFUSED as err:
        return _refuse(err)
    # The model code (transformers) is imported once the orders are accepted: a refusal takes a second or two.
    from .evaluation import ppl
    from .groundtruth import Oracle
    from .reference import ReferenceRun

    try:
        oracle = Oracle(ReferenceRun(params, args.data, args.reference))   # reads and checks data and window start
    except REFUSED as err:
        return _refuse(err)
    out = []
    for order in tqdm(orders, desc="retrain", unit="order", file=sys.stderr):
        loss = oracle.eval_loss(order)
        out.append({"order": order, "eval_loss": loss, "eval_ppl": ppl(loss)})
    return _print_json(out)


def _estimate(args, params: config.Params) -> int:
    method = args.method or params.estimate.default
    try:
        orders = _orders(args.orders, params)
        kinds = sorted({kind_of(o, params.window.steps) for o in orders})
        if len(kinds) > 1:
            raise OrderError(f"--orders {str(args.orders)!r} mixes kinds of orders ({kinds}); put batch orders, "
                             "sample-level orders and each number of epochs in files of their own")
        if kinds[0] != ("batches", 1) and method not in ("fut-subspace", "naive"):
            raise OrderError(f"--method {method}: sample-level and multi-epoch orders are estimated by "
                             "fut-subspace (or naive) only")
    except REFUSED as err:
        return _refuse(err)
    from .estimators import EstimationContext, estimate     # the model code, once the orders are accepted
    from .evaluation import ppl
    from .reference import ReferenceRun

    try:
        ctx = EstimationContext(ReferenceRun(params, args.data, args.reference), args.cache, args.projection)
        if kinds[0] != ("batches", 1):
            sub, naive = _beyond_batches(ctx, kinds[0], args)
    except REFUSED as err:
        return _refuse(err)
    if kinds[0] == ("batches", 1):
        est = estimate(ctx, orders, method, params.estimate.readout, params.estimate.k)
        losses, trust = est.eval_loss.tolist(), est.indicators or {}
    else:
        S = sub.replay(as_units(orders))
        losses = [naive] * len(orders) if method == "naive" else sub.quadratic(S, naive).tolist()
        trust = {} if method == "naive" else {k: v.tolist() for k, v in sub.indicators(S, naive).items()}
    return _print_json([{"order": o, "method": method, "eval_loss": float(x), "eval_ppl": ppl(float(x)),
                         **({"trust": {k: v[i] for k, v in trust.items()}} if trust else {})}
                        for i, (o, x) in enumerate(zip(orders, losses))])


def _beyond_batches(ctx, kind: tuple[str, int], args):
    """fut-subspace over sequence units or E epochs, and its naive loss, from the stage that built it."""
    from .epochs import EpochReference
    from .sequence_cache import SequenceCache

    if kind[0] == "sequences":
        return SequenceCache(ctx.cache, args.sample_cache).subspace(), ctx.naive_loss
    return EpochReference(ctx.cache, kind[1], args.epochs_cache).load()


def _cache(args, params: config.Params) -> int:
    from .reference import ReferenceRun
    from .storage import InsufficientDisk

    try:
        prepared = ReferenceRun(params, args.data, args.reference).prepared   # the data and the window start
    except REFUSED as err:
        return _refuse(err)
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
        return _refuse(err, status=1)
    return 0


def _sweep(args, params: config.Params) -> int:
    from .sweep import run_sweep

    try:
        if not args.corpus.is_dir():
            raise ValueError(f"--corpus {str(args.corpus)!r}: no such folder; run the prepare stage first "
                             "(dvc repro prepare)")
        if args.jobs is not None and args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: expected an int >= 1")
        run_sweep(params, args.corpus, args.work, args.out, args.jobs, args.only)
    except (config.ConfigError, ValueError) as err:
        return _refuse(err)
    return 0
