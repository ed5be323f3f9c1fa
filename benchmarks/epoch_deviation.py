"""Where the multi-epoch replay departs from training: fut-subspace's parameter deviation δ_t = γ_t − θ_t against
the true one, along retrained E-epoch orders, every half epoch (dev orders only).

For each E, each of the multi_epoch stage's dev orders is retrained through the reference's code path, keeping its
parameters every T/2 steps; the replay's δ_t (the stored subspace, read out in full space) is compared with the
true θ_t(order) − θ_t(reference) in the norm the replay works in, ‖x‖ = √(xᵀ P̄⁻¹ x): their ratio and cosine. The
test orders are not read.

    python benchmarks/epoch_deviation.py [--params params.yaml] [--epochs 2 3] [--multi-epoch data/multi_epoch]

Needs the `multi_epoch` stage's output. Prints a table and writes benchmarks/results/epoch_deviation.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.options import pipeline_paths  # noqa: E402
from fut import config, protocol  # noqa: E402
from fut.epochs import EpochReference, epoch_checkpoints  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.orders import family  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.schedules import as_units  # noqa: E402
from fut.storage import atomic_write_json  # noqa: E402
from fut.subspace import delta  # noqa: E402
from fut.training import run_window  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pipeline_paths(ap, "--cache", "--multi-epoch")
    ap.add_argument("--epochs", type=int, nargs="+", default=None, help="default: multi_epoch.epochs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/epoch_deviation.json")
    args = ap.parse_args(argv)
    params = config.load(args.params)
    run = ReferenceRun(params, args.data, args.reference)
    ctx = EstimationContext(run, args.cache)
    out, lines = {}, []
    for E in args.epochs or params.multi_epoch.epochs:
        ref = EpochReference(ctx.cache, E, args.multi_epoch / "cache")
        sub, _ = ref.load()
        thetas, preconds, _, _ = ref.trajectory()
        # the basis rows only (δ = P̄ Bᵀ s): the replay's matrices, Galerkin ones included, are the stage's
        src = ref.sources(thetas, preconds, epoch_checkpoints(ref.T, E), galerkin=False)
        norm = lambda x: float((x * x / src.precond).sum().sqrt())
        marks = list(range(ref.T // 2, ref.steps + 1, ref.T // 2))
        dev = protocol.dev_truth(args.multi_epoch / "groundtruth" / f"epochs_{E}")
        rows = {}
        for name, order in protocol.scored({n: r["order"] for n, r in dev.items()}).items():
            kept = {}
            run_window(params, run.prepared, run.start, order,
                       on_step=lambda t, trainer, loss: kept.update({t: run.layout.flatten(trainer.state().theta)})
                       if t in marks else None)
            rows[name] = []
            for k in marks:
                true = kept[k] - thetas[k]
                est = delta(sub.replay(as_units([order]), steps=k), src.rows, src.precond, src.dim, src.chunk)[0]
                both = norm(true) * norm(est)     # 0 where the order has so far trained as the reference
                rows[name].append({"step": k, "true_norm": norm(true), "replay_norm": norm(est),
                                   "cosine": float((true * est / src.precond).sum()) / both if both > 0 else None})
        summary = []
        for i, k in enumerate(marks):
            for fam in ("random", "domain_blocks"):
                at = [r[i] for n, r in rows.items() if family(n) == fam and r[i]["cosine"] is not None]
                if at:
                    summary.append({"epochs": E, "step": k, "family": fam, "n": len(at),
                                    "norm_ratio": statistics.median(a["replay_norm"] / a["true_norm"] for a in at),
                                    "cosine": statistics.median(a["cosine"] for a in at)})
                    s = summary[-1]
                    lines.append(f"| {E} | {k} | {fam} | {s['n']} | {s['norm_ratio']:.2f} | {s['cosine']:.2f} |")
                    print(lines[-1], flush=True)
        out[str(E)] = {"orders": rows, "summary": summary}
    print("| E | step | family | orders | ‖δ replay‖ / ‖δ true‖ (median) | cosine (median) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))
    atomic_write_json(args.out, {"split": "dev", "results": out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
