"""How strongly the multi-epoch replay should apply its Galerkin curvature (fut/epochs.py), on dev orders only.

The replay applies each domain's curvature-batch Hessian at θ_0 (8 sequences) to the deviation. For each E, each
scale α of `--scales` multiplies those Hessians (`scaled_curvature`), and each damping λ of `--damping` is tried
with it, the quadratic readout refitted; the dev orders are those of benchmarks/epoch_curvature.py (the
multi_epoch stage's and the extra ones retrained there). `multi_epoch.curvature_scale[E]` and
`multi_epoch.damping[E]` are the pair whose worse family (random or domain blocks) has the highest quadratic R²,
the rule benchmarks/epoch_curvature.py chose the damping by: printed as `chosen`. The test orders are not read.

    python benchmarks/epoch_curvature_scale.py [--params params.yaml] [--epochs 2 3] [--scales 0.5 0.75 1 1.25]
                                               [--damping 0 50 100 200 400 600 800]

Needs the `multi_epoch` stage's output. Prints a table and writes benchmarks/results/epoch_curvature_scale.json.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.epoch_curvature import damping_scores, dev_options, dev_params, dev_set  # noqa: E402
from benchmarks.options import worse_family_r2  # noqa: E402
from fut.epochs import EpochReference, epoch_checkpoints, scaled_curvature  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.storage import atomic_write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    dev_options(ap)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5],
                    help="the scales α > 0 of the Galerkin curvature tried")
    ap.add_argument("--damping", type=float, nargs="+", default=[0, 50, 100, 200, 400, 600, 800],
                    help="the dampings λ >= 0 tried with each scale")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/epoch_curvature_scale.json")
    args = ap.parse_args(argv)
    params = dev_params(ap, args)
    if min(args.scales) <= 0 or min(args.damping) < 0:
        ap.error(f"--scales must be > 0 and --damping >= 0, got {args.scales} and {args.damping}")
    run = ReferenceRun(params, args.data, args.reference)
    ctx = EstimationContext(run, args.cache)
    out, chosen = {}, {}
    print("| E | α | λ | R² random | Spearman random | R² domain blocks | R² all |\n|---|---|---|---|---|---|---|")
    for E in args.epochs or params.multi_epoch.epochs:
        ref = EpochReference(ctx.cache, E, args.multi_epoch / "cache")
        dev = dev_set(params, run, E, args, dict(zip(("random_reshuffled", "random_repeated", "domains"), args.extra)))
        thetas, preconds, naive, _ = ref.trajectory()
        src = ref.sources(thetas, preconds, epoch_checkpoints(ref.T, E))
        exact = partial(run.eval_losses_at, thetas[ref.steps])
        worst = {}
        for alpha in args.scales:
            for lam, got in damping_scores(scaled_curvature(src, alpha), ref, exact, naive, dev, args.damping):
                out[f"E={E} scale {alpha:g} damping {lam:g}"] = got
                r2 = {f: got[f]["r2_order_effect"] for f in got}
                worst[(alpha, lam)] = worse_family_r2(got)
                print(f"| {E} | {alpha:g} | {lam:g} | {r2['random']:.3f} | {got['random']['spearman']:.3f} | "
                      f"{r2['domain_blocks']:.3f} | {r2['all']:.3f} |", flush=True)
        alpha, lam = max(worst, key=worst.get)
        chosen[E] = {"scale": alpha, "damping": lam, "worse_family_r2": worst[(alpha, lam)],
                     "worse_family_r2_at_scale_1": max((w for (a, _), w in worst.items() if a == 1.0), default=None)}
        print(f"chosen: E = {E}, scale {alpha:g}, damping {lam:g} (worse family's quadratic R² {worst[(alpha, lam)]:.3f})")
    atomic_write_json(args.out, {"split": "dev", "seed": args.seed, "scales": args.scales, "damping": args.damping,
                                 "results": out, "chosen": chosen})
    return 0


if __name__ == "__main__":
    sys.exit(main())
