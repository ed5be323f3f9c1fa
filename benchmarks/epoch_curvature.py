"""What each batch's own-direction curvature, the pairs at the epoch boundaries, the Galerkin curvature and the
damping buy the multi-epoch replay (fut/epochs.py), on dev orders only.

For each E, dev orders are estimated by fut-subspace over the E-epoch run: with each domain's curvature-batch
Hessian applied to the whole deviation and projected on the basis (Galerkin, fut/subspace.py `hessian_ops`: the
adopted choice) or only its top eigenspace, both with the rows h = H_j P̄ g at θ_0 along batch j's pair at 0 and
its own and after-step gradients at each of its E visits; with the eigenspaces, also along its pair at 0 only and
without own-direction curvature, all with pairs at every epoch boundary (`epoch_checkpoints`, adopted); and the
eigenspaces with pairs at 0 and E·T only; all without damping. Then the three layouts of the own-direction rows
(Galerkin; eigenspaces; eigenspaces with pairs at 0 and E·T only) with each damping λ of `--damping` (the restoring
term λ P̄⁻¹ δ, fut/subspace.py), the quadratic readout refitted. Each is read out exactly (θ + δ evaluated) and with
its quadratic readout fitted on the probe orders, and scored against retrained dev orders: the multi_epoch stage's,
plus `--extra` orders per family drawn from `--seed` + E (not a test seed) and retrained here into `--work`
(resumable), since the stage's dev set is too small to choose by. The test orders are not read.
`multi_epoch.damping[E]` is the λ whose worse family (random or domain blocks) has the highest R² under the
quadratic readout, the default, with the Galerkin curvature: printed as `chosen`; the layout adopted is the one
whose best λ scores higher by that rule at every E (`best_damping_per_layout`).
With `--calibrate K ...`, each variant's estimates of the random dev orders are also scored after a calibration
on K of them (benchmarks/options.py `calibrated_scores`: a line or a shift fitted to K retrained orders, the
others scored, the median over `--draws` draws): what K calibration retrains in the cache would buy.

    python benchmarks/epoch_curvature.py [--params params.yaml] [--epochs 2 3] [--extra 10 6 6] [--seed 7000]
                                         [--damping 0 50 100 200 400 600 800 1200] [--calibrate 2 4 8]

Needs the `multi_epoch` stage's output (its dev ground truth, and its caches' folder for their provenance). Prints a
table and writes benchmarks/results/epoch_curvature.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.options import calibrated_scores, pipeline_paths, scores, worse_family_r2  # noqa: E402
from fut import config, protocol  # noqa: E402
from fut.epochs import EpochReference, epoch_checkpoints  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.groundtruth import retrain_all  # noqa: E402
from fut.orders import family  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.schedules import as_units, epoch_order_set  # noqa: E402
from fut.storage import atomic_write_json, read_json  # noqa: E402
from fut.subspace import build_subspace, delta, fit_readout  # noqa: E402


def dev_options(ap: argparse.ArgumentParser) -> None:
    """The options of the dev set (`dev_set`), shared with benchmarks/epoch_curvature_scale.py."""
    pipeline_paths(ap, "--cache", "--multi-epoch")
    ap.add_argument("--epochs", type=int, nargs="+", default=None, help="default: multi_epoch.epochs")
    ap.add_argument("--extra", type=int, nargs=3, default=[10, 6, 6], metavar=("RESHUFFLED", "REPEATED", "DOMAINS"),
                    help="extra dev orders retrained here, per family")
    ap.add_argument("--seed", type=int, default=7000, help="their seed is this plus E (not multi_epoch's seeds)")
    ap.add_argument("--work", type=Path, default=ROOT / "data/epoch_curvature")


def dev_params(ap: argparse.ArgumentParser, args: argparse.Namespace) -> config.Params:
    """The params file's params, once `--seed` is checked: the extra dev orders must not be the stage's orders."""
    params = config.load(args.params)
    if args.seed in (params.multi_epoch.seed, params.multi_epoch.test_seed):
        ap.error(f"--seed must differ from multi_epoch.seed and multi_epoch.test_seed, got {args.seed}")
    return params


def dev_set(params: config.Params, run: ReferenceRun, E: int, args: argparse.Namespace, counts: dict[str, int]
            ) -> tuple[np.ndarray, torch.Tensor, dict[str, list[int]]]:
    """The E-epoch dev orders: the multi_epoch stage's scored ones and the `counts` extra ones, retrained into
    `args.work` (resumable). Their true final eval losses, their units, and the rows of each family."""
    dev = protocol.dev_truth(args.multi_epoch / "groundtruth" / f"epochs_{E}")
    orders = protocol.scored({n: r["order"] for n, r in dev.items()})
    truth = {n: dev[n]["eval_loss"] for n in orders}
    extra = epoch_order_set(run.T, E, run.prepared.window_domains,
                            read_json(args.reference / "summary.json")["batch_losses_start"], counts,
                            args.seed + E, prefix="extra-")
    for n, r in retrain_all(params, extra, args.data, args.reference, args.work / f"epochs_{E}", (), 0,
                            f"extra {E}-epoch dev orders").items():
        orders[n], truth[n] = extra[n], r["eval_loss"]
    names = list(orders)
    fam = [family(n.removeprefix("extra-")) for n in names]
    groups = {f: [i for i, x in enumerate(fam) if x == f] for f in ("random", "domain_blocks")}
    groups["all"] = list(range(len(names)))
    return np.array([truth[n] for n in names]), as_units([orders[n] for n in names]), groups


def damping_scores(src, ref: EpochReference, exact, naive: float, dev: tuple, dampings: list[float]):
    """fut-subspace over `src`'s sources with each damping of `dampings`, the quadratic readout refitted on `ref`'s
    probe orders, scored per family on the dev set `dev` (`dev_set`'s): yields (λ, scores)."""
    c, (y, sigma, groups) = ref.params.cache, dev
    built = build_subspace(src, exact, naive, c.probes, c.seed, probe_sigma=ref.probe_orders())
    for lam in dampings:
        sub = dataclasses.replace(built, damping=lam)
        sub.readout_coef = fit_readout(sub, src, exact, naive, ref.probe_orders())
        est = sub.quadratic(sub.replay(sigma), naive).numpy()
        yield lam, {f: scores(est, y, naive, r) for f, r in groups.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    dev_options(ap)
    ap.add_argument("--damping", type=float, nargs="+", default=[0, 50, 100, 200, 400, 600, 800, 1200],
                    help="the dampings λ >= 0 tried with the adopted sources")
    ap.add_argument("--calibrate", type=int, nargs="*", default=[], metavar="K",
                    help="also score the random dev orders after a calibration on K of them (K >= 2)")
    ap.add_argument("--draws", type=int, default=50, help="draws of the K calibration orders")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/epoch_curvature.json")
    args = ap.parse_args(argv)
    if args.calibrate and min(args.calibrate) < 2:
        ap.error(f"--calibrate needs K >= 2 orders to fit a line, got {min(args.calibrate)}")
    params = dev_params(ap, args)
    if min(args.damping) < 0:
        ap.error(f"--damping must be >= 0, got {min(args.damping)}")
    run = ReferenceRun(params, args.data, args.reference)
    ctx = EstimationContext(run, args.cache)
    c, out, lines, sizes, chosen, per_layout, calibrated = params.cache, {}, [], {}, {}, {}, []
    for E in args.epochs or params.multi_epoch.epochs:
        ref = EpochReference(ctx.cache, E, args.multi_epoch / "cache")
        counts = dict(zip(("random_reshuffled", "random_repeated", "domains"), args.extra))
        y, sigma, groups = dev_set(params, run, E, args, counts)
        thetas, preconds, naive, _ = ref.trajectory()
        adopted = ref.sources(thetas, preconds, epoch_checkpoints(ref.T, E))
        eigenspaces = dataclasses.replace(adopted, hessian_grams=None)
        T, K = ref.T, len(adopted.own_directions[0])
        rows = adopted.rows
        pair_only = dataclasses.replace(eigenspaces, own_directions=[d[:1] for d in adopted.own_directions],
                                        rows=lambda cols: torch.cat([rows(cols)[:-T * K], rows(cols)[-T * K::K]]))
        plain = dataclasses.replace(eigenspaces, own_directions=None, rows=lambda cols: rows(cols)[:-T * K])
        exact = partial(run.eval_losses_at, thetas[ref.steps])

        def score(label: str, sub, src) -> dict:
            S = sub.replay(sigma)
            readouts = {"quadratic": sub.quadratic(S, naive).numpy(),
                        "exact": exact(delta(S, src.rows, src.precond, src.dim, src.chunk)).numpy()}
            for readout, est in readouts.items():
                key = f"E={E} {label} {readout}"
                out[key] = {f: scores(est, y, naive, r) for f, r in groups.items()}
                r, d, a = out[key]["random"], out[key]["domain_blocks"], out[key]["all"]
                lines.append(f"| {E} | {label} | {readout} | {r['r2_order_effect']:.3f} | {r['spearman']:.3f} | "
                             f"{r['bias_ppl']:+.3f} | {d['r2_order_effect']:.3f} | {d['bias_ppl']:+.3f} | "
                             f"{a['r2_order_effect']:.3f} | {a['bias_ppl']:+.3f} |")
                print(lines[-1], flush=True)
                for k in args.calibrate:
                    cal = out[key].setdefault("random_calibrated", {})[str(k)] = calibrated_scores(
                        est, y, naive, groups["random"], k, args.draws, seed=k)
                    if cal:
                        calibrated.append(f"| {E} | {label} | {readout} | {k} | " + " | ".join(
                            f"{cal[h]['r2_order_effect']:.3f} | {cal[h]['spearman']:.3f}" for h in ("affine", "shift"))
                            + f" | {cal['affine']['n_scored']} |")
            return out[f"E={E} {label} quadratic"]

        ends_only = ref.sources(thetas, preconds, [0, ref.steps], galerkin=False)
        layouts = {"galerkin, pair and visits": adopted, "pair and visits": eigenspaces,
                   "pair and visits, pairs at 0 and E·T only": ends_only}
        built = {}
        for label, src in (*layouts.items(), ("pair at 0", pair_only), ("none", plain)):
            built[label] = build_subspace(src, exact, naive, c.probes, c.seed, probe_sigma=ref.probe_orders())
            score(label, built[label], src)
        worst = {label: {} for label in layouts}
        for label, src in layouts.items():
            for lam in args.damping:         # each layout's matrices, each damping's readout refitted
                sub = dataclasses.replace(built[label], damping=lam)
                sub.readout_coef = fit_readout(sub, src, exact, naive, ref.probe_orders())
                worst[label][lam] = worse_family_r2(score(f"{label}, damping {lam:g}", sub, src))
        best = {label: max(w, key=w.get) for label, w in worst.items()}
        per_layout[E] = {label: {"damping": lam, "worse_family_r2": worst[label][lam]} for label, lam in best.items()}
        chosen[E] = best["galerkin, pair and visits"]
        for label, lam in best.items():
            print(f"E = {E}, {label}: best damping {lam:g} (worse family's quadratic R² {worst[label][lam]:.3f})")
        print(f"chosen: E = {E}, damping {chosen[E]:g}")
        sizes[E] = {f: len(r) for f, r in groups.items()}
    print(f"dev orders per E: {sizes}")
    print("| E | own curvature | readout | R² random | Spearman random | bias random | R² domain blocks | "
          "bias domain blocks | R² all | bias all |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    print("chosen damping per E:", {E: f"{lam:g}" for E, lam in chosen.items()})
    if calibrated:
        print("random dev orders after a calibration on K of them (median over draws; the others scored):")
        print("| E | own curvature | readout | K | R² line | Spearman line | R² shift | Spearman shift | scored |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(calibrated))
    atomic_write_json(args.out, {"split": "dev", "extra": counts, "seed": args.seed, "n": sizes, "results": out,
                                 "damping": args.damping, "chosen_damping": chosen,
                                 "best_damping_per_layout": per_layout})
    return 0


if __name__ == "__main__":
    sys.exit(main())
