"""`fut-subspace`: the order's own Adam replay in closed form, in the span of a few cached gradients.

With the second moment frozen at the reference's (measured: it changes the estimates by less than their error)
AdamW's deviation from the reference trajectory is linear. For an order σ, with μ_t = m_t(σ) − m_t the first-moment
difference and δ_t = γ_t − θ_t the parameter deviation:

    μ_{t+1} = β1 μ_t + (1 − β1) (f_{t,σ(t)} + H_{σ(t)} δ_t),        δ_{t+1} = a_t δ_t − b_t P̄ μ_{t+1},

where f_{t,j} = ĝ(θ_t, B_j) − g(θ_t, B_t) is the gradient the order feeds in instead of the reference's, P̄ the
reference's Adam preconditioner 1/(√v̂ + ε) at mid-window (b_t carries each step's bias corrections), a_t = 1 − η_t λ
and H_j ≈ U Λ Uᵀ the cached top eigenspace of the Hessian of a batch of B_j's domain. Every vector the recursion
creates lies in the span of the basis B = [pair gradients g(θ_c, B_j) at a few checkpoints c, the reference's own
gradients g(θ_t, B_t), the gradients after each batch's own step g(θ_{j+1}, B_j), the eigenvectors U]: μ = Bᵀq and
δ = P̄ Bᵀs. So the replay runs on coefficient vectors of length N = |B| (a few hundred), reading B only through its
Gram matrix B P̄ Bᵀ: an order costs microseconds, not T passes over the d parameters.

ĝ(θ_t, B_j) between cached points is piecewise linear in t through knots at the pair checkpoints, at t = j (the own
gradient, exact) and at t = j + 1 (the gradient right after B_j's own step: where g(·, B_j) jumps, measured), plus
the curvature term H_j (θ_t − θ_lin(t)) for the trajectory's departure from the straight line between the knots.
For σ(t) = t the forcing is exactly zero, so the identity order gives δ = 0 and the reference result exactly.

Readouts: `exact` evaluates the eval loss at θ_T + δ_T (one eval forward per order); `quadratic` is
L_T + ∇L_Eᵀδ + Σ_g c_g ½ δᵀU_gΛ_gU_gᵀδ + κ ½ δᵀP̄⁻¹δ, with the coefficients (c_g, κ) fitted once, at build time,
to the exact readout of seeded probe orders' estimated parameters (no retraining: the fit only says how the
training batches' curvature translates to the eval set's).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .adam import AdamHyper


@dataclass
class SubspaceSources:
    """What the subspace is built from. The basis B is read through `rows(cols)` (B[:, cols] [N, len], its rows
    in the order of `basis_order`), so it never has to fit in memory at once; full-space vectors on the CPU."""
    pair_checkpoints: list[int]                      # checkpoints with g(θ_c, B_j) for every batch j (0, T incl.)
    eigen_keys: list[tuple[int, str]]                # (checkpoint, group) of each cached eigenspace
    eigen_values: list[torch.Tensor]                 # [r] per eigenspace
    groups: list[str]                                # curvature group of each window batch
    rows: Callable[[slice], torch.Tensor]            # B[:, cols]
    dim: int
    chunk: int                                       # columns read at once
    theta: Callable[[int], torch.Tensor]             # θ_t of the reference run
    precond: torch.Tensor                            # P̄ [d]
    precond_drift: float                             # max over steps of the median |P_t / P̄ − 1| (frozen v)
    eval_grad: torch.Tensor                          # ∇L_E(θ_T) [d]
    lrs: list[float]
    adam_steps: list[int]                            # the optimizer's step count after window step t
    hp: AdamHyper


def basis_layout(T: int, n_pair_checkpoints: int, ranks: Sequence[int]) -> dict:
    """Where each kind of basis row starts: pairs (T per pair checkpoint), own gradients (T), after-step
    gradients (T), then one block per eigenspace."""
    own0 = n_pair_checkpoints * T
    after0 = own0 + T
    offsets, pos = [], after0 + T
    for r in ranks:
        offsets.append(pos)
        pos += r
    return {"own": own0, "after": after0, "eig": offsets, "size": pos}


@dataclass
class Subspace:
    """The closed-form replay's matrices. Float64: they are small, and the recursion sums T steps of them."""
    gram: torch.Tensor                   # [N, N] B P̄ Bᵀ
    forcing: torch.Tensor                # [T, T, N] coefficients (in B) of f_{t,j}; zero where j == t
    eig_keys: list[tuple[int, str]]      # (checkpoint, group) of each eigenspace block, in basis order
    eig_offsets: list[int]               # where each block starts in the basis
    eig_values: list[torch.Tensor]       # [r] per block
    batch_group: list[int]               # index into the groups of each window batch
    group_names: list[str]
    step_block: torch.Tensor             # [T, n_groups] eigenspace block in force at step t for each group
    lin: torch.Tensor                    # [N] B P̄ ∇L_E(θ_T)
    a: torch.Tensor                      # [T]
    b: torch.Tensor                      # [T]
    beta1: float
    readout_coef: torch.Tensor           # [n_groups + 1]: c_g per group, then κ (quadratic readout)
    precond_drift: float                 # max over steps of the median |P_t / P̄ − 1|: how stale the frozen v is
    # Median over the probe orders of |estimate − estimate without the pairs at T| / |estimate − L_T|: how much
    # the estimates lean on the straight-line-plus-curvature model of each gradient's path (0: not measured).
    knot_disagreement: float = 0.0

    @property
    def dim(self) -> int:
        return self.gram.shape[0]

    @property
    def steps(self) -> int:
        return self.forcing.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"gram": self.gram, "forcing": self.forcing, "lin": self.lin, "a": self.a, "b": self.b,
               "step_block": self.step_block, "batch_group": torch.tensor(self.batch_group),
               "eig_offsets": torch.tensor(self.eig_offsets), "readout_coef": self.readout_coef}
        out.update({f"eig_values.{i}": v for i, v in enumerate(self.eig_values)})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict) -> "Subspace":
        n_blocks = len(meta["eig_keys"])
        return cls(gram=t["gram"], forcing=t["forcing"], eig_keys=[tuple(k) for k in meta["eig_keys"]],
                   eig_offsets=t["eig_offsets"].tolist(), eig_values=[t[f"eig_values.{i}"] for i in range(n_blocks)],
                   batch_group=t["batch_group"].tolist(), group_names=meta["group_names"], step_block=t["step_block"],
                   lin=t["lin"], a=t["a"], b=t["b"], beta1=meta["beta1"], readout_coef=t["readout_coef"],
                   precond_drift=meta["precond_drift"], knot_disagreement=meta["knot_disagreement"])

    def metadata(self) -> dict:
        return {"eig_keys": [list(k) for k in self.eig_keys], "group_names": self.group_names, "beta1": self.beta1,
                "precond_drift": self.precond_drift, "knot_disagreement": self.knot_disagreement}

    # --- the replay -------------------------------------------------------------------------------------

    def _curvature_rows(self, block: int) -> tuple[slice, torch.Tensor]:
        lo = self.eig_offsets[block]
        vals = self.eig_values[block]
        return slice(lo, lo + len(vals)), vals

    def replay(self, sigma: torch.Tensor, steps: int | None = None, rank: int | None = None) -> torch.Tensor:
        """Coefficients s of δ_steps = P̄ Bᵀ s for each order (rows of σ [n, T]) [n, N], float64, with the top
        `rank` eigenpairs of each eigenspace (default all). The recursion runs in float32 (measured: 3e-7 relative
        to float64), orders grouped by the curvature group of their batch at each step, so each group's
        eigenspace block is one matrix product."""
        steps = self.steps if steps is None else steps
        n, dt = sigma.shape[0], torch.float32
        gram, forcing = self.gram.to(dt), self.forcing.to(dt)
        blocks = [(cols, vals.to(dt) * (torch.arange(len(vals)) < (rank or len(vals))), gram[cols].t().contiguous())
                  for cols, vals in (self._curvature_rows(b) for b in range(len(self.eig_values)))]
        groups = torch.tensor(self.batch_group)[sigma]                 # [n, T]
        S = torch.zeros(n, self.dim, dtype=dt)
        Q = torch.zeros_like(S)
        for t in range(steps):
            inc = forcing[t, sigma[:, t]]                                # [n, N], a copy
            for g in groups[:, t].unique().tolist():
                rows = (groups[:, t] == g).nonzero().flatten()
                cols, vals, G = blocks[int(self.step_block[t, g])]
                inc[rows, cols.start: cols.stop] += (S[rows] @ G) * vals  # U δ = (B P̄ Bᵀ)[U rows] s
            Q.mul_(self.beta1).add_(inc, alpha=1 - self.beta1)
            S.mul_(float(self.a[t])).sub_(Q, alpha=float(self.b[t]))
        return S.double()

    # --- readouts ---------------------------------------------------------------------------------------

    def readout_features(self, S: torch.Tensor) -> torch.Tensor:
        """[n, n_groups + 2]: ∇L_Eᵀδ, ½ δᵀU_gΛ_gU_gᵀδ per group (the eigenspaces in force at the last step), and
        ½ δᵀP̄⁻¹δ (= ½ sᵀ B P̄ Bᵀ s)."""
        cols = [S @ self.lin]
        last = self.steps - 1
        for g in range(len(self.group_names)):
            rows, vals = self._curvature_rows(int(self.step_block[last, g]))
            Y = S @ self.gram[rows].t()
            cols.append(0.5 * (Y * Y * vals).sum(1))
        cols.append(0.5 * ((S @ self.gram) * S).sum(1))
        return torch.stack(cols, 1)

    def quadratic(self, S: torch.Tensor, base_loss: float) -> torch.Tensor:
        """The calibrated quadratic readout of the eval loss [n] (float64)."""
        f = self.readout_features(S)
        return base_loss + f[:, 0] + f[:, 1:] @ self.readout_coef

    def indicators(self, S: torch.Tensor, base_loss: float) -> dict[str, torch.Tensor]:
        """What says how far to trust each order's estimate, without retraining (validated against the true error
        in the estimate and ablations stages): `error_indicator_ppl`, the estimated order effect |PPL − PPL_T|
        times the run's `knot_disagreement` (the estimate's error grows with the effect it estimates, and with
        how much the replay's model of the gradients between cached points matters: the share of the effect that
        changes when the pairs at T are left out and the gradient after each batch's own step is extrapolated with
        the curvature instead); and `precond_drift`, how far Adam's preconditioner moves during the window (the
        replay freezes it). The last two are the same for every order of a run."""
        est = self.quadratic(S, base_loss).exp()
        effect = (est - math.exp(base_loss)).abs()
        return {"error_indicator_ppl": effect * self.knot_disagreement,
                "knot_disagreement": torch.full_like(est, self.knot_disagreement),
                "precond_drift": torch.full_like(est, self.precond_drift)}


# --- building --------------------------------------------------------------------------------------------

def knots(j: int, pair_checkpoints: Sequence[int]) -> dict[int, tuple[str, int]]:
    """The points where g(θ_t, B_j) is cached: t -> (kind, index). The own gradient at t = j and the one after
    its step at t = j + 1 take precedence over a pair at the same checkpoint (the same value, or closer)."""
    pts: dict[int, tuple[str, int]] = {c: ("pair", c) for c in pair_checkpoints}
    pts[j] = ("own", j)
    pts[j + 1] = ("after", j)
    return pts


def interpolation(t: int, j: int, pair_checkpoints: Sequence[int]) -> list[tuple[tuple[str, int], float, int]]:
    """ĝ(θ_t, B_j) as weights on its knots: [(knot, weight, knot's checkpoint)], linear between the knots around
    t (the trajectory's departure from the straight line is the caller's curvature term)."""
    pts = knots(j, pair_checkpoints)
    lo = max(p for p in pts if p <= t)
    above = [p for p in pts if p >= t]
    if lo == t or not above:
        return [(pts[lo], 1.0, lo)]
    hi = min(above)
    a = (t - lo) / (hi - lo)
    return [(pts[lo], 1 - a, lo), (pts[hi], a, hi)]


def build_subspace(src: SubspaceSources, probe_readout: Callable[[torch.Tensor], torch.Tensor] | None,
                   base_loss: float, probes: int, seed: int, progress: Callable[[str], None] = lambda s: None
                   ) -> Subspace:
    """The matrices of the closed-form replay, and the quadratic readout's coefficients fitted to
    `probe_readout(δ [n, d]) -> exact eval losses [n]` on `probes` seeded random and domain-block orders."""
    T, hp, cks = len(src.lrs), src.hp, list(src.pair_checkpoints)
    group_names = sorted(set(src.groups))
    layout = basis_layout(T, len(cks), [len(v) for v in src.eigen_values])
    N, offsets = layout["size"], layout["eig"]
    thetas = torch.stack([src.theta(t) for t in range(T + 1)])          # [T+1, d]
    gram = torch.zeros(N, N, dtype=torch.float64)
    lin = torch.zeros(N, dtype=torch.float64)
    proj = [torch.zeros(len(v), T + 1, dtype=torch.float64) for v in src.eigen_values]   # U θ_t per eigenspace
    progress(f"subspace: Gram matrix of {N} basis vectors, {src.chunk} parameters at a time")
    for a in range(0, src.dim, src.chunk):
        cols = slice(a, min(a + src.chunk, src.dim))
        B = src.rows(cols)
        BP = B * src.precond[cols]
        gram += (BP @ B.t()).double()
        lin += (BP @ src.eval_grad[cols]).double()
        for i, lo in enumerate(offsets):
            proj[i] += (B[lo: lo + len(src.eigen_values[i])] @ thetas[:, cols].t()).double()
    gram = 0.5 * (gram + gram.t())                        # exactly symmetric

    def block_at(t: int, g: str) -> int:
        return max((i for i, (c, gg) in enumerate(src.eigen_keys) if gg == g and c <= t),
                   key=lambda i: src.eigen_keys[i][0])

    forcing = _forcing(T, N, cks, cks, src.groups, layout, block_at, [v.double() for v in src.eigen_values], proj)
    bc2_mid = 1 - hp.beta2 ** src.adam_steps[T // 2]
    b = torch.tensor([src.lrs[t] / (1 - hp.beta1 ** src.adam_steps[t])
                      * math.sqrt((1 - hp.beta2 ** src.adam_steps[t]) / bc2_mid) for t in range(T)], dtype=torch.float64)
    a = torch.tensor([1 - lr * hp.weight_decay for lr in src.lrs], dtype=torch.float64)
    sub = Subspace(gram=gram, forcing=forcing, eig_keys=list(src.eigen_keys), eig_offsets=offsets,
                   eig_values=[v.double() for v in src.eigen_values],
                   batch_group=[group_names.index(g) for g in src.groups], group_names=group_names,
                   step_block=torch.tensor([[block_at(t, g) for g in group_names] for t in range(T)]),
                   lin=lin, a=a, b=b, beta1=hp.beta1, readout_coef=torch.zeros(len(group_names) + 1, dtype=torch.float64),
                   precond_drift=src.precond_drift)
    if probe_readout is not None and probes > 0:
        progress(f"subspace: quadratic readout fitted to the exact readout of {probes} probe orders")
        S = sub.replay(torch.tensor(probe_orders(T, src.groups, probes, seed)))
        exact = probe_readout(delta(S, src.rows, src.precond, src.dim, src.chunk)).double()
        f = sub.readout_features(S)
        sub.readout_coef = torch.linalg.lstsq(f[:, 1:], (exact - base_loss - f[:, 0])[:, None]).solution.flatten()
    if T in cks and len(cks) > 1:
        progress("subspace: knot disagreement (the estimate without the pairs at T) on the probe orders")
        inner = [c for c in cks if c != T]
        alt = type(sub)(**{**sub.__dict__, "forcing": _forcing(T, N, cks, inner, src.groups, layout, block_at,
                                                                 sub.eig_values, proj)})
        sigma = torch.tensor(probe_orders(T, src.groups, max(probes, 16), seed))
        est, other = sub.quadratic(sub.replay(sigma), base_loss), sub.quadratic(alt.replay(sigma), base_loss)
        sub.knot_disagreement = float(((est - other).abs() / (est - base_loss).abs().clamp_min(1e-12)).median())
    return sub


def _forcing(T: int, N: int, cks: list[int], knot_checkpoints: list[int], groups: Sequence[str], layout: dict,
             block_at: Callable[[int, str], int], eig_values: list[torch.Tensor], proj: list[torch.Tensor]
             ) -> torch.Tensor:
    """f_{t,j} in basis coefficients [T, T, N]: ĝ(θ_t, B_j) interpolated between its knots (pairs at
    `knot_checkpoints` only, a subset of the basis's `cks`) plus H (θ_t − θ_lin(t)), minus the own gradient."""
    forcing = torch.zeros(T, T, N, dtype=torch.float64)
    for t in range(T):
        for j in range(T):
            if j == t:
                continue
            block = block_at(t, groups[j])
            vals, p = eig_values[block], proj[block]
            line = torch.zeros_like(p[:, 0])
            for (kind, idx), w, at in interpolation(t, j, knot_checkpoints):
                forcing[t, j, cks.index(idx) * T + j if kind == "pair" else layout[kind] + idx] += w
                line += w * p[:, at]
            lo = layout["eig"][block]
            forcing[t, j, lo: lo + len(vals)] += vals * (p[:, t] - line)     # H (θ_t − θ_lin(t))
            forcing[t, j, layout["own"] + t] -= 1.0
    return forcing


def delta(S: torch.Tensor, rows: Callable[[slice], torch.Tensor], precond: torch.Tensor, dim: int,
          chunk: int) -> torch.Tensor:
    """δ = P̄ Bᵀ s in full space [n, d] (float32), B read `chunk` columns at a time."""
    out = torch.empty(S.shape[0], dim)
    for a in range(0, dim, chunk):
        cols = slice(a, min(a + chunk, dim))
        out[:, cols] = (S.float() @ rows(cols)) * precond[cols]
    return out


def probe_orders(T: int, groups: Sequence[str], n: int, seed: int) -> list[list[int]]:
    """Seeded orders the quadratic readout is fitted on: three quarters random permutations, the rest domain
    blocks (a random block order, a random order within each block), so both kinds of effect are represented."""
    rng = random.Random(seed)
    by_group: dict[str, list[int]] = {}
    for j, g in enumerate(groups):
        by_group.setdefault(g, []).append(j)
    out = []
    for i in range(n):
        if i % 4 == 3 and len(by_group) > 1:
            blocks = list(by_group.values())
            rng.shuffle(blocks)
            out.append([j for blk in blocks for j in rng.sample(blk, len(blk))])
        else:
            out.append(rng.sample(range(T), T))
    return out
