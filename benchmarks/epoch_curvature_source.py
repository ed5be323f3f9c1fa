"""Which Hessian the multi-epoch replay's Galerkin curvature should be (fut/epochs.py), on dev orders only.

The replay applies each domain's curvature-batch Hessian at θ_0 (`multi_epoch.curvature_batch` sequences) at every
step, times α = `multi_epoch.curvature_scale[E]` < 1, chosen on dev orders (benchmarks/epoch_curvature_scale.py).
Two readings of α: the Hessian moves along the run, away from θ_0's; or a Hessian of few sequences overstates the
curvature the replay needs. For each E this builds the Galerkin matrices B P̄ H P̄ Bᵀ (fut/hessian_jobs.py) of the
same curvature batches at every epoch boundary θ_eT (e = 0..E), and of curvature batches of each of `--sizes`
sequences at θ_0 (spread over the domain's window batches as `multi_epoch.curvature_batch`'s are); says how large
each is against θ_0's (the trace of B P̄ H P̄ Bᵀ, and the largest eigenvalue of the operator K = G⁺ B P̄ H P̄ Bᵀ the
replay applies, per domain); and scores the replay with each in place of θ_0's, at α = 1 and at the adopted α, with
each damping of `--damping` (the quadratic readout refitted), on the dev orders of benchmarks/epoch_curvature.py.
The best damping per source and α is picked by that benchmark's rule (the worse family's R²). The test orders are
not read. benchmarks/results/epoch_curvature_source.json was written at f2348f9, when the replay's curvature batch
was the batch-level cache's (8 sequences; `--sizes 24`).

    python benchmarks/epoch_curvature_source.py [--params params.yaml] [--epochs 2] [--sizes 8]
                                                [--damping 0 50 100 200 400 600]

Needs the `multi_epoch` stage's output. Prints a table and writes benchmarks/results/epoch_curvature_source.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.epoch_curvature import damping_scores, dev_options, dev_params, dev_set  # noqa: E402
from benchmarks.options import worse_family_r2  # noqa: E402
from fut import hessian_jobs  # noqa: E402
from fut.cache import curvature_batches  # noqa: E402
from fut.epochs import EpochReference, epoch_checkpoints  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.storage import atomic_write_json  # noqa: E402
from fut.subspace import build_subspace, galerkin_operators  # noqa: E402


def size_against(grams: list[torch.Tensor], base: list[torch.Tensor], gram: torch.Tensor) -> dict:
    """Per domain: trace(M) / trace(M at θ_0) and the largest eigenvalue of K = G⁺ M (real: K is similar to a
    symmetric matrix on G's range)."""
    ops = galerkin_operators(gram, grams)
    return {"trace_ratio": [float(torch.trace(m) / torch.trace(b)) for m, b in zip(grams, base)],
            "top_eigenvalue": [float(torch.linalg.eigvals(k).real.max()) for k in ops]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    dev_options(ap)
    ap.add_argument("--sizes", type=int, nargs="*", default=[8],
                    help="curvature batch sizes (sequences per domain) tried at θ_0, besides "
                         "multi_epoch.curvature_batch")
    ap.add_argument("--damping", type=float, nargs="+", default=[0, 50, 100, 200, 400, 600],
                    help="the dampings λ >= 0 tried with each source and scale")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/epoch_curvature_source.json")
    args = ap.parse_args(argv)
    params = dev_params(ap, args)
    if args.sizes and min(args.sizes) < 1:
        ap.error(f"--sizes must be >= 1 sequences, got {min(args.sizes)}")
    if min(args.damping) < 0:
        ap.error(f"--damping must be >= 0, got {min(args.damping)}")
    run = ReferenceRun(params, args.data, args.reference)
    ctx = EstimationContext(run, args.cache)
    c, results, spectra, best = params.cache, {}, {}, {}
    print("| E | curvature | α | λ | R² random | Spearman random | R² domain blocks | R² all |\n"
          "|---|---|---|---|---|---|---|---|")
    for E in args.epochs or params.multi_epoch.epochs:
        ref = EpochReference(ctx.cache, E, args.multi_epoch / "cache")
        dev = dev_set(params, run, E, args, dict(zip(("random_reshuffled", "random_repeated", "domains"), args.extra)))
        thetas, preconds, naive, _ = ref.trajectory()
        src = ref.sources(thetas, preconds, epoch_checkpoints(ref.T, E))      # θ_0's Galerkin matrices
        basis, keys = src.rows(slice(None)), [g for _, g in src.eigen_keys]

        def grams_of(theta: torch.Tensor, size: int) -> list[torch.Tensor]:
            batches = curvature_batches(run.prepared, size, c.curvature)
            return hessian_jobs.hessian_grams(run, theta, [batches[g] for g in keys], basis, src.precond)

        k = params.multi_epoch.curvature_batch[str(E)]
        sources = {f"θ_0, {k} sequences": src.hessian_grams}
        sources.update({f"θ_{t}, {k} sequences": grams_of(thetas[t], k)
                        for t in epoch_checkpoints(ref.T, E)[1:]})
        sources.update({f"θ_0, {size} sequences": grams_of(thetas[0], size) for size in args.sizes})
        exact = partial(run.eval_losses_at, thetas[ref.steps])
        gram = build_subspace(src, None, naive, c.probes, c.seed, probe_sigma=ref.probe_orders()).gram
        spectra[E] = {label: {"domains": keys, **size_against(grams, src.hessian_grams, gram)}
                      for label, grams in sources.items()}
        adopted = params.multi_epoch.curvature_scale[str(E)]
        best[E] = {}
        for label, grams in sources.items():
            for alpha in sorted({1.0, adopted}):
                scaled = dataclasses.replace(src, hessian_grams=[alpha * m for m in grams])
                worst = {}
                for lam, got in damping_scores(scaled, ref, exact, naive, dev, args.damping):
                    results[f"E={E} {label} scale {alpha:g} damping {lam:g}"] = got
                    worst[lam] = worse_family_r2(got)
                    print(f"| {E} | {label} | {alpha:g} | {lam:g} | {got['random']['r2_order_effect']:.3f} | "
                          f"{got['random']['spearman']:.3f} | {got['domain_blocks']['r2_order_effect']:.3f} | "
                          f"{got['all']['r2_order_effect']:.3f} |", flush=True)
                lam = max(worst, key=worst.get)
                best[E][f"{label} scale {alpha:g}"] = {"damping": lam, "worse_family_r2": worst[lam]}
    print("\nHow large each curvature is against θ_0's (per domain): trace of B P̄ H P̄ Bᵀ, and the largest "
          "eigenvalue of the replay's operator")
    print("| E | curvature | trace / θ_0's | largest eigenvalue |\n|---|---|---|---|")
    for E, rows in spectra.items():
        for label, s in rows.items():
            print(f"| {E} | {label} | {' '.join(f'{r:.3f}' for r in s['trace_ratio'])} | "
                  f"{' '.join(f'{v:.0f}' for v in s['top_eigenvalue'])} |")
    print("\nBest damping per curvature and α (worse family's quadratic R²)")
    print("| E | curvature, α | λ | worse family's R² |\n|---|---|---|---|")
    for E, rows in best.items():
        for label, b in rows.items():
            print(f"| {E} | {label} | {b['damping']:g} | {b['worse_family_r2']:.3f} |")
    atomic_write_json(args.out, {"split": "dev", "seed": args.seed, "sizes": args.sizes, "damping": args.damping,
                                 "curvature_batch": params.multi_epoch.curvature_batch, "spectra": spectra,
                                 "results": results, "best": best})
    return 0


if __name__ == "__main__":
    sys.exit(main())
