"""What each sequence's own-direction curvature buys the sample-level replay (fut/sequence_cache.py), on dev orders
only.

fut-subspace over the window's sequences is built three ways: with the rows h_i = H(θ_j, x_i) P̄ g(θ_j, x_i) at
each sequence's own step j (the adopted choice), with h_i at θ_0 along g(θ_0, x_i), and without own-direction
curvature. Each is read out exactly (θ_T + δ evaluated) and with its quadratic readout fitted on the probe orders,
and scored against retrained dev orders: the sample_orders stage's, plus `--extra-random` random re-batchings drawn
from `--seed` (not a test seed) and retrained here into `--work` (resumable), since the stage's 8 dev random
orders are too few to choose by. The test orders are not read.

    python benchmarks/sequence_curvature.py [--params params.yaml] [--extra-random 24] [--seed 5011]

Needs the `sample_orders` stage's output (its dev ground truth and its per-sequence cache). Prints a table and writes
benchmarks/results/sequence_curvature.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.options import pipeline_paths, scores  # noqa: E402
from fut import config, protocol  # noqa: E402
from fut.device import autocast  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.groundtruth import retrain_all  # noqa: E402
from fut.orders import family  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.sample_orders import start_losses  # noqa: E402
from fut.schedules import as_units, sample_order_set  # noqa: E402
from fut.sequence_cache import SequenceCache  # noqa: E402
from fut.storage import atomic_write_json, load_tensors  # noqa: E402
from fut.subspace import delta  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pipeline_paths(ap, "--cache", "--sample-orders")
    ap.add_argument("--extra-random", type=int, default=24, help="random re-batchings retrained here")
    ap.add_argument("--seed", type=int, default=5011, help="their seed (not sample_orders.seed or test_seed)")
    ap.add_argument("--work", type=Path, default=ROOT / "data/sequence_curvature")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sequence_curvature.json")
    args = ap.parse_args(argv)
    params = config.load(args.params)
    if args.seed in (params.sample_orders.seed, params.sample_orders.test_seed):
        ap.error(f"--seed must differ from sample_orders.seed and sample_orders.test_seed, got {args.seed}")
    run = ReferenceRun(params, args.data, args.reference)
    ctx = EstimationContext(run, args.cache)
    seq = SequenceCache(ctx.cache, args.sample_orders / "cache")
    seq.build()                                  # reads the stage's files (rebuilds only what is missing)
    T, b, n = seq.T, seq.b, seq.n

    dev = protocol.dev_truth(args.sample_orders / "groundtruth")
    orders = protocol.scored({k: r["order"] for k, r in dev.items()})
    truth = {k: dev[k]["eval_loss"] for k in orders}
    extra = sample_order_set(T, b, run.prepared.window_domains, start_losses(params, run),
                             {"random": args.extra_random}, args.seed, prefix="extra-")
    for k, r in retrain_all(params, extra, args.data, args.reference, args.work / "groundtruth", (), 0,
                            "extra dev re-batchings").items():
        orders[k], truth[k] = extra[k], r["eval_loss"]
    names = list(orders)
    y = np.array([truth[k] for k in names])
    sigma = as_units([orders[k] for k in names])
    groups = {"random": [i for i, k in enumerate(names) if family(k) == "random" or k.startswith("extra-random")],
              "all": list(range(len(names)))}

    adopted = seq.sources()
    rows = adopted.rows
    pairs_0 = load_tensors(seq.path("pairs_0.safetensors"), seq.meta)[0]["grad"]
    h0 = torch.empty(n, adopted.dim)
    for i in range(n):
        with autocast(params.train, run.device):
            h0[i] = run.loss.hvp(run.theta(0), seq.sequences[i: i + 1], (adopted.precond * pairs_0[i].float())[None])[0]
    del pairs_0
    variants = {
        "at its own step": adopted,
        "at θ_0": dataclasses.replace(adopted, own_directions=[[i] for i in range(n)],
                                      rows=lambda cols: torch.cat([rows(cols)[:-n], h0[:, cols]])),
        "none": dataclasses.replace(adopted, own_directions=None, rows=lambda cols: rows(cols)[:-n])}
    theta_T = run.theta(T)
    naive, out, lines = ctx.naive_loss, {}, []
    for label, src in variants.items():
        sub = seq.fit_subspace(src)
        S = sub.replay(sigma)
        readouts = {"quadratic": sub.quadratic(S, naive).numpy(),
                    "exact": run.eval_losses_at(theta_T, delta(S, src.rows, src.precond, src.dim, src.chunk)).numpy()}
        for readout, est in readouts.items():
            key = f"{label} {readout}"
            out[key] = {fam: scores(est, y, naive, r) for fam, r in groups.items()}
            r, a = out[key]["random"], out[key]["all"]
            lines.append(f"| {label} | {readout} | {r['r2_order_effect']:.3f} | {r['spearman']:.3f} | "
                         f"{r['bias_ppl']:+.3f} | {r['absdiff_ppl']:.3f} | {a['r2_order_effect']:.3f} | "
                         f"{a['spearman']:.3f} | {a['bias_ppl']:+.3f} |")
            print(lines[-1], flush=True)
    print(f"dev orders: {len(groups['random'])} random re-batchings, {len(names)} in all")
    print("| own curvature | readout | R² random | Spearman random | bias random | abs random | R² all | Spearman all "
          "| bias all |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    atomic_write_json(args.out, {"split": "dev", "extra_random": args.extra_random, "seed": args.seed,
                                 "n_random": len(groups["random"]), "n_all": len(names), "results": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
