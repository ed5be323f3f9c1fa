"""Where the multi-epoch replay's error comes from: its approximations added one at a time, each rung scored on the
dev orders against retraining and against the rung before it (dev orders only).

fut-subspace's E-epoch replay (fut/epochs.py) makes four approximations of training an order, and this script takes
them one at a time, in full parameter space, for every dev order of `benchmarks/epoch_curvature.py`'s set:

0. `adam`: AdamW with the order's own moments, in flat form (fut/adam.py `update_term`): it must reproduce the
   retrained loss (the check that the ladder's machinery is training's).
1. `v from the reference`: the order's first moment, but the reference's preconditioner P_t at each step, so Adam's
   second moment does not respond to the order.
2. `frozen P̄`: the deviation δ = θ' − θ from the reference trajectory driven by the exact gradient difference
   through the replay's frozen preconditioner P̄ and step sizes (fut/subspace.py `replay_steps`: δ ← aδ − b P̄ q,
   q the momentum of g(θ_t + δ, B_σ(t)) − g(θ_t, B_t)); beside it, `, following P_t`, with each step's P_t taken
   as P̄ times the mean of P_t / P̄ on the reference run, in place of the replay's bias-correction factor.
3. `linear, exact Hessian`: the order's gradient linearised around the reference, g(θ_t, B_σ(t)) + H(θ_t,
   B_σ(t)) δ, with every step's own batch Hessian at its own θ_t.
4. `linear, curvature batch`: the replay's curvature in full space: each domain's curvature-batch Hessian at θ_0
   (multi_epoch.curvature_batch[E] sequences) times multi_epoch.curvature_scale[E], plus the damping λ P̄⁻¹ δ of
   multi_epoch.damping[E]; also at scale 1 without damping (`, unscaled`).
5. `fut-subspace`: the stored replay itself (the basis, the gradients interpolated between its knots, the
   Galerkin projection), read out exactly and with its quadratic readout.

Rungs 0 to 4 are read out exactly (the eval loss at θ_E·T + δ). The gap between two rungs is what one
approximation costs (each side variant is scored against the rung before it, as is the rung after it); the test
orders are not read.

    python benchmarks/epoch_error_ladder.py [--params params.yaml] [--epochs 2] [--extra 10 6 6] [--seed 7000]

Needs the `multi_epoch` stage's output. Prints a table and writes benchmarks/results/epoch_error_ladder.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.epoch_curvature import dev_options, dev_params, dev_set  # noqa: E402
from benchmarks.options import scores  # noqa: E402
from fut.adam import update_term  # noqa: E402
from fut.cache import batch_group, curvature_batches  # noqa: E402
from fut.epochs import EpochReference  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.storage import atomic_write_json  # noqa: E402
from fut.subspace import delta, replay_steps  # noqa: E402

RUNGS = ("adam", "v from the reference", "frozen P̄", "frozen P̄, following P_t", "linear, exact Hessian",
         "linear, curvature batch, unscaled", "linear, curvature batch", "fut-subspace exact", "fut-subspace quadratic")
# variants beside the ladder: each is scored against the rung before it, and the next rung against that same one
SIDE = ("frozen P̄, following P_t", "linear, curvature batch, unscaled")


class Ladder:
    """The E-epoch reference trajectory (θ_t and Adam's preconditioner P_t) and the rungs' full-space runs of a set
    of orders [n, E·T]."""

    def __init__(self, ref: EpochReference):
        self.run = ref.run
        if self.run.hp.grad_clip is not None:
            raise SystemExit("epoch_error_ladder: optimizer.grad_clip must be null (the rungs do not clip)")
        self.thetas, self.preconds, _, _ = ref.trajectory()
        self.S, self.T = ref.steps, ref.T
        self.window = self.run.prepared.window
        # the reference's own gradient g(θ_t, B_t) at each step, which the δ rungs' gradient differences subtract
        self.own = [self.grad(self.thetas[t], self.window[t % self.T]) for t in range(self.S)]
        # the replay's sources (its basis rows, for the exact readout) and its steps δ ← a δ − b P̄ q
        self.src = ref.sources(self.thetas, self.preconds, ref.meta["pair_checkpoints"], galerkin=False)
        self.mid, self.lrs, self.steps = self.src.precond, self.src.lrs, self.src.adam_steps
        self.a, self.b = (x.tolist() for x in replay_steps(self.src))

    def grad(self, theta: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return self.run.loss.grad(theta, batch).float()

    def adam(self, orders: torch.Tensor, own_v: bool) -> torch.Tensor:
        """Rungs 0 and 1: θ' after the E·T steps of each order [n, d], with the order's own second moment or the
        reference's preconditioner at each step."""
        run, hp = self.run, self.run.hp
        m0, v0 = run.layout.flatten(run.start.m), run.layout.flatten(run.start.v)
        out = []
        for order in tqdm(orders.tolist(), desc="adam" if own_v else "v from the reference", leave=False):
            theta, m, v = self.thetas[0].clone(), m0.clone(), v0.clone()
            for t, j in enumerate(order):
                g = self.grad(theta, self.window[j])
                if own_v:
                    gamma, m, v = update_term(theta, g, m, v, self.steps[t], hp)
                else:
                    m = torch.lerp(m, g, 1 - hp.beta1)
                    gamma = m / (1 - hp.beta1 ** self.steps[t]) * self.preconds[t] + hp.weight_decay * theta
                theta = theta - self.lrs[t] * gamma
            out.append(theta - self.thetas[self.S])
        return torch.stack(out)

    def frozen(self, orders: torch.Tensor, follow_precond: bool = False) -> torch.Tensor:
        """Rung 2: δ after E·T steps [n, d], exact gradient differences through the frozen P̄ and the replay's
        steps, or (`follow_precond`) with each step's P_t taken as P̄ times the mean of P_t / P̄ on the reference
        run in place of the replay's bias-correction factor."""
        hp = self.run.hp
        b = self.b if not follow_precond else [
            lr / (1 - hp.beta1 ** k) * float((p / self.mid).mean()) for lr, k, p in zip(self.lrs, self.steps,
                                                                                       self.preconds)]
        out = []
        for order in tqdm(orders.tolist(), desc="frozen P̄" + (", following P_t" if follow_precond else ""),
                          leave=False):
            d, q = torch.zeros_like(self.mid), torch.zeros_like(self.mid)
            for t, j in enumerate(order):
                q = torch.lerp(q, self.grad(self.thetas[t] + d, self.window[j]) - self.own[t], 1 - hp.beta1)
                d = self.a[t] * d - b[t] * self.mid * q
            out.append(d)
        return torch.stack(out)

    def linear(self, orders: torch.Tensor, curvature, damping: float, label: str) -> torch.Tensor:
        """Rungs 3 and 4: δ after E·T steps [n, d] with g(θ_t + δ, B_j) ≈ g(θ_t, B_j) + H δ, where
        `curvature(t, j, rows [k, d]) -> [k, d]` applies the rung's Hessian for batch j at step t; orders that
        train the same batch at a step share one graph. The damping adds λ P̄⁻¹ δ as the replay does."""
        n = len(orders)
        d, q = torch.zeros(n, len(self.mid)), torch.zeros(n, len(self.mid))
        for t in tqdm(range(self.S), desc=label, leave=False):
            diff = torch.empty_like(d)
            for j in orders[:, t].unique().tolist():
                rows = (orders[:, t] == j).nonzero().flatten()
                diff[rows] = self.grad(self.thetas[t], self.window[j]) - self.own[t] + curvature(t, j, d[rows])
            if damping:
                diff += damping * d / self.mid
            q = torch.lerp(q, diff, 1 - self.run.hp.beta1)
            d = self.a[t] * d - self.b[t] * self.mid * q
        return d

    def exact_hessian(self, t: int, j: int, rows: torch.Tensor) -> torch.Tensor:
        return self.run.loss.hvp(self.thetas[t], self.window[j], rows).float()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    dev_options(ap)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/epoch_error_ladder.json")
    args = ap.parse_args(argv)
    params = dev_params(ap, args)
    run = ReferenceRun(params, args.data, args.reference)
    if run.device.type != "cpu":
        ap.error("epoch_error_ladder runs on the CPU (train.device: cpu): its rung 0 checks training's numbers")
    ctx = EstimationContext(run, args.cache)
    out, lines, seconds = {}, [], {}
    for E in args.epochs or [2]:
        ref = EpochReference(ctx.cache, E, args.multi_epoch / "cache")
        sub, naive = ref.load()
        counts = dict(zip(("random_reshuffled", "random_repeated", "domains"), args.extra))
        y, sigma, groups = dev_set(params, run, E, args, counts)
        ladder = Ladder(ref)
        batches = curvature_batches(run.prepared, ref.curvature_batch, params.cache.curvature)
        group = [batch_group(run.prepared, j) for j in range(ref.T)]

        def curvature_batch(scale: float):
            return lambda t, j, rows: scale * run.loss.hvp(ladder.thetas[0], batches[group[j]], rows).float()

        exact = lambda deltas: run.eval_losses_at(ladder.thetas[ref.steps], deltas).numpy()
        src = ladder.src
        S = sub.replay(sigma)
        runs = {
            "adam": lambda: ladder.adam(sigma, own_v=True),
            "v from the reference": lambda: ladder.adam(sigma, own_v=False),
            "frozen P̄": lambda: ladder.frozen(sigma),
            "frozen P̄, following P_t": lambda: ladder.frozen(sigma, follow_precond=True),
            "linear, exact Hessian": lambda: ladder.linear(sigma, ladder.exact_hessian, 0.0, "exact Hessian"),
            "linear, curvature batch, unscaled": lambda: ladder.linear(sigma, curvature_batch(1.0), 0.0,
                                                                       "curvature batch, unscaled"),
            "linear, curvature batch": lambda: ladder.linear(sigma, curvature_batch(ref.curvature_scale),
                                                             ref.damping, "curvature batch"),
            "fut-subspace exact": lambda: delta(S, src.rows, src.precond, src.dim, src.chunk),
        }
        est = {}
        for rung, make in runs.items():
            t0 = time.perf_counter()
            est[rung] = exact(make())
            seconds[f"E={E} {rung}"] = time.perf_counter() - t0
            print(f"E = {E}: {rung} done in {seconds[f'E={E} {rung}']:.0f} s", flush=True)
        est["fut-subspace quadratic"] = sub.quadratic(S, naive).numpy()
        previous = None
        for rung in RUNGS:
            key = f"E={E} {rung}"
            out[key] = {"vs_truth": {f: scores(est[rung], y, naive, r) for f, r in groups.items()},
                        "vs_previous": None if previous is None else
                        {f: scores(est[rung], est[previous], naive, r) for f, r in groups.items()},
                        "max_abs_loss_vs_truth": float(np.abs(est[rung] - y).max())}
            r, d, a = (out[key]["vs_truth"][f] for f in ("random", "domain_blocks", "all"))
            p = out[key]["vs_previous"]
            step = "—" if p is None else f"{p['random']['r2_order_effect']:.3f} | {p['random']['spearman']:.3f}"
            lines.append(f"| {E} | {rung} | {r['r2_order_effect']:.3f} | {r['spearman']:.3f} | {r['bias_ppl']:+.3f} | "
                         f"{d['r2_order_effect']:.3f} | {a['r2_order_effect']:.3f} | {step} |")
            previous = rung if rung not in SIDE else previous
        out[f"E={E} n"] = {f: len(r) for f, r in groups.items()}
    print("| E | rung | R² random | Spearman random | bias random (PPL) | R² domain blocks | R² all | "
          "random vs the rung before: R² | Spearman |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    atomic_write_json(args.out, {"split": "dev", "extra": args.extra, "seed": args.seed, "results": out,
                                 "seconds": seconds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
