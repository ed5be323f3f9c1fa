"""What each batch's own-direction curvature buys the multi-epoch replay (fut/epochs.py), on the dev orders only.

For each E, the multi_epoch stage's dev orders are estimated by fut-subspace over the E-epoch run with and without
the rows h_j = H_j P̄ g(θ_0, B_j) (the adopted choice and the plain replay), each read out exactly (θ + δ evaluated)
and with its quadratic readout fitted on the probe orders, and scored against the stage's retrained dev orders.
The test orders are not read.

    python benchmarks/epoch_curvature.py [--params params.yaml] [--epochs 2 3] [--multi-epoch data/multi_epoch]

Needs the `multi_epoch` stage's output (its dev ground truth, and its caches' folder for their provenance). Prints a table and writes
benchmarks/results/epoch_curvature.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fut import config, protocol  # noqa: E402
from fut.epochs import EpochReference, epoch_checkpoints  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.orders import family  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.schedules import as_units  # noqa: E402
from fut.stats import r2_order_effect, rank_correlation  # noqa: E402
from fut.storage import atomic_write_json  # noqa: E402
from fut.subspace import build_subspace, delta  # noqa: E402


def scores(est: np.ndarray, truth: np.ndarray, naive: float, rows: list[int]) -> dict:
    e, t = est[rows], truth[rows]
    return {"r2_order_effect": r2_order_effect(e, t, naive), "spearman": rank_correlation(e, t),
            "bias_ppl": float(np.mean(np.exp(e) - np.exp(t))), "n": len(rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--epochs", type=int, nargs="+", default=None, help="default: multi_epoch.epochs")
    ap.add_argument("--data", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--reference", type=Path, default=ROOT / "data/reference")
    ap.add_argument("--cache", type=Path, default=ROOT / "data/cache")
    ap.add_argument("--multi-epoch", type=Path, default=ROOT / "data/multi_epoch", help="the multi_epoch stage's output")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/epoch_curvature.json")
    args = ap.parse_args(argv)
    params = config.load(args.params)
    run = ReferenceRun(params, args.data, args.reference)
    ctx = EstimationContext(run, args.cache)
    c, out, lines = params.cache, {}, []
    for E in args.epochs or params.multi_epoch.epochs:
        ref = EpochReference(ctx.cache, E, args.multi_epoch / "cache")
        dev = protocol.dev_truth(args.multi_epoch / "groundtruth" / f"epochs_{E}")
        names = list(protocol.scored({n: r["order"] for n, r in dev.items()}))
        truth = np.array([dev[n]["eval_loss"] for n in names])
        sigma = as_units([dev[n]["order"] for n in names])
        groups = {"random": [i for i, n in enumerate(names) if family(n) == "random"], "all": list(range(len(names)))}
        thetas, preconds, naive, _ = ref.trajectory()
        with_curv = ref.sources(thetas, preconds, epoch_checkpoints(ref.T, E))
        T = ref.T
        plain = dataclasses.replace(with_curv, own_directions=None, rows=lambda cols: with_curv.rows(cols)[:-T])
        exact = ref.exact_readout(thetas[ref.steps])
        for label, src in (("own curvature at θ_0", with_curv), ("none", plain)):
            sub = build_subspace(src, exact, naive, c.probes, c.seed, probe_sigma=ref.probe_orders())
            S = sub.replay(sigma)
            readouts = {"quadratic": sub.quadratic(S, naive).numpy(),
                        "exact": exact(delta(S, src.rows, src.precond, src.dim, src.chunk)).numpy()}
            for readout, est in readouts.items():
                key = f"E={E} {label} {readout}"
                out[key] = {fam: scores(est, truth, naive, rows) for fam, rows in groups.items()}
                r, a = out[key]["random"], out[key]["all"]
                lines.append(f"| {E} | {label} | {readout} | {r['r2_order_effect']:.3f} | {r['spearman']:.3f} | "
                             f"{r['bias_ppl']:+.3f} | {a['r2_order_effect']:.3f} | {a['bias_ppl']:+.3f} |")
                print(lines[-1], flush=True)
    print("| E | curvature | readout | R² random | Spearman random | bias random | R² all | bias all |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    atomic_write_json(args.out, {"split": "dev", "results": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
