"""`fut-subspace`: the order's own Adam replay in closed form, in the span of a few cached gradients.

With the second moment frozen at the reference's (measured: it changes the estimates by less than their error)
AdamW's deviation from the reference trajectory is linear. For an order σ, with μ_t = m_t(σ) − m_t the first-moment
difference and δ_t = γ_t − θ_t the parameter deviation:

    μ_{t+1} = β1 μ_t + (1 − β1) (f_{t,σ(t)} + H_{σ(t)} δ_t + λ P̄⁻¹ δ_t),        δ_{t+1} = a_t δ_t − b_t P̄ μ_{t+1},

where f_{t,j} = ĝ(θ_t, B_j) − g(θ_t, B_t) is the gradient the order feeds in instead of the reference's, P̄ the
reference's Adam preconditioner 1/(√v̂ + ε) at mid-window (b_t carries each step's bias corrections), a_t = 1 − η_t λ
and H_j ≈ U Λ Uᵀ the cached top eigenspace of the Hessian of a batch of B_j's domain, or (`hessian_ops`, the
multi-epoch replays) that batch's whole Hessian applied to δ and projected on the basis below. λ ≥ 0 (`damping`, 0
unless chosen on dev orders: the multi-epoch replays) is a restoring curvature λ P̄⁻¹, uniform in Adam's geometry,
for the rest of the spectrum, which the eigenspaces miss and which makes training forget an order's early differences
over several epochs; in coefficients it adds λ s. Every vector the recursion
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

# The Galerkin operators' pseudo-inverse cut-off, relative to the Gram matrix's largest eigenvalue.
GALERKIN_RTOL = 1e-10


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
    lrs: list[float]                                 # η_t of every step S of the replayed run
    adam_steps: list[int]                            # the optimizer's step count after step t
    hp: AdamHyper
    # The units whose gradients the basis holds, when they are not the T window batches of one epoch (`groups`
    # then has one entry per unit): `visits`, the (unit, step) of each own/after-step row in basis order (the
    # reference trains the unit at that step); `reference`, the units of the reference's batch at each step (its
    # gradient is their mean). Sample-level orders: units are sequences; several epochs: a batch visited E times.
    visits: list[tuple[int, int]] | None = None      # default: batch t at step t
    reference: list[list[int]] | None = None         # default: [[t] for each step]
    # Each unit's own curvature along its own directions, when the order trains a unit at other steps than the
    # reference (sequences) or reads its gradient again after training it (several epochs): the domain eigenspace
    # misses how a unit's loss falls after a step on that unit itself. `own_directions[u]`: basis rows of gradients
    # g_{u,k} of unit u (the same number K for every unit); rows after the eigenspaces hold h_{u,k} = H_u P̄ g_{u,k},
    # unit by unit ([U·K, d] through `rows`).
    own_directions: list[list[int]] | None = None
    # Each eigenspace's whole curvature-batch Hessian seen from the basis, when the replay applies it in place of
    # the top eigenspace (several epochs): `hessian_grams[i]` = B P̄ H_i P̄ Bᵀ [N, N] for the curvature batch
    # and checkpoint of eigen_keys[i], with H_i's own rows (through `rows`) included.
    hessian_grams: list[torch.Tensor] | None = None

    def unit_visits(self) -> list[tuple[int, int]]:
        return self.visits if self.visits is not None else [(t, t) for t in range(len(self.lrs))]

    def reference_units(self) -> list[list[int]]:
        return self.reference if self.reference is not None else [[t] for t in range(len(self.lrs))]


def basis_layout(units: int, n_pair_checkpoints: int, ranks: Sequence[int], visits: int | None = None,
                 own_curvature: int = 0) -> dict:
    """Where each kind of basis row starts: pairs (`units` per pair checkpoint), own gradients and after-step
    gradients (one per visit; default one per unit), one block per eigenspace, then `own_curvature` rows of
    own-direction curvature."""
    visits = units if visits is None else visits
    own0 = n_pair_checkpoints * units
    after0 = own0 + visits
    offsets, pos = [], after0 + visits
    for r in ranks:
        offsets.append(pos)
        pos += r
    return {"own": own0, "after": after0, "eig": offsets, "curv": pos, "size": pos + own_curvature}


@dataclass
class Subspace:
    """The closed-form replay's matrices. Float64: they are small, and the recursion sums T steps of them."""
    gram: torch.Tensor                   # [N, N] B P̄ Bᵀ
    eig_keys: list[tuple[int, str]]      # (checkpoint, group) of each eigenspace block, in basis order
    eig_offsets: list[int]               # where each block starts in the basis
    eig_values: list[torch.Tensor]       # [r] per block
    # [S, U, N] coefficients (in B) of f_{t,u} = ĝ(θ_t, u) − g(θ_t, reference batch t) for every step and unit: a
    # batch of several units forces with their mean; zero for the reference's own batch (one unit)
    forcing: torch.Tensor
    batch_group: list[int]               # index into the groups of each unit (window batch or sequence)
    group_names: list[str]
    step_block: torch.Tensor             # [S, n_groups] eigenspace block in force at step t for each group
    lin: torch.Tensor                    # [N] B P̄ ∇L_E(θ_S), S the run's last step
    a: torch.Tensor                      # [S]
    b: torch.Tensor                      # [S]
    beta1: float
    readout_coef: torch.Tensor           # [n_groups + 1]: c_g per group, then κ (quadratic readout)
    precond_drift: float                 # max over steps of the median |P_t / P̄ − 1|: how stale the frozen v is
    # Median over the probe orders of |estimate − estimate without the pairs at T| / |estimate − L_T|: how much
    # the estimates lean on the straight-line-plus-curvature model of each gradient's path (0: not measured).
    knot_disagreement: float = 0.0
    # Own-direction curvature (SubspaceSources.own_directions): the replay adds Σ_k c_{u,k} (g_{u,k}ᵀδ) for the
    # unit of each step (the mean over a batch's units), `own_curv` [U, K, N] the coefficients c_{u,k} of
    # (h_{u,l} − UΛUᵀP̄ g_{u,l}) (G P̄ Gᵀ)⁺_{lk}, and g_{u,k}ᵀδ = (B P̄ g_{u,k})ᵀ s read from the Gram matrix's rows
    # `own_rows` [U, K]; None when not used.
    own_curv: torch.Tensor | None = None
    own_rows: torch.Tensor | None = None
    damping: float = 0.0                 # λ: the restoring term λ P̄⁻¹ δ (module docstring)
    # Galerkin curvature (SubspaceSources.hessian_grams): [n_blocks, N, N] the coefficients K_i = G⁺ B P̄ H_i P̄ Bᵀ
    # of H_i δ's projection on the basis (G = B P̄ Bᵀ) for δ = P̄ Bᵀ s, applied as K_i s in place of the block's top
    # eigenspace; None: the eigenspaces.
    hessian_ops: torch.Tensor | None = None

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
        if self.own_curv is not None:
            out.update({"own_curv": self.own_curv, "own_rows": self.own_rows})
        if self.hessian_ops is not None:
            out["hessian_ops"] = self.hessian_ops
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict) -> "Subspace":
        n_blocks = len(meta["eig_keys"])
        return cls(gram=t["gram"], forcing=t["forcing"], eig_keys=[tuple(k) for k in meta["eig_keys"]],
                   eig_offsets=t["eig_offsets"].tolist(), eig_values=[t[f"eig_values.{i}"] for i in range(n_blocks)],
                   batch_group=t["batch_group"].tolist(), group_names=meta["group_names"], step_block=t["step_block"],
                   lin=t["lin"], a=t["a"], b=t["b"], beta1=meta["beta1"], readout_coef=t["readout_coef"],
                   precond_drift=meta["precond_drift"], knot_disagreement=meta["knot_disagreement"],
                   own_curv=t.get("own_curv"), own_rows=t.get("own_rows"), hessian_ops=t.get("hessian_ops"),
                   damping=meta.get("damping", 0.0))          # files written before λ existed replay without it

    def metadata(self) -> dict:
        return {"eig_keys": [list(k) for k in self.eig_keys], "group_names": self.group_names, "beta1": self.beta1,
                "precond_drift": self.precond_drift, "knot_disagreement": self.knot_disagreement,
                "damping": self.damping}

    # --- the replay -------------------------------------------------------------------------------------

    def _curvature_rows(self, block: int) -> tuple[slice, torch.Tensor]:
        lo = self.eig_offsets[block]
        vals = self.eig_values[block]
        return slice(lo, lo + len(vals)), vals

    def replay(self, sigma: torch.Tensor, steps: int | None = None, rank: int | None = None) -> torch.Tensor:
        """Coefficients s of δ_steps = P̄ Bᵀ s for each order [n, N], float64, with the top `rank` eigenpairs of
        each eigenspace (default all). An order is a row of σ: [n, S] one unit per step (batch orders), or
        [n, S, m] m units per step whose mean gradient is the batch's (sample-level orders; the curvature term is
        the mean of the units' groups' too). The recursion runs in float32 (measured: 3e-7 relative to float64),
        orders grouped by the curvature group at each step, so each group's eigenspace block is one matrix
        product."""
        steps = self.steps if steps is None else steps
        units = sigma if sigma.dim() == 3 else sigma[:, :, None]
        n, m, dt = units.shape[0], units.shape[2], torch.float32
        gram, forcing = self.gram.to(dt), self.forcing.to(dt)
        blocks = [(cols, vals.to(dt) * (torch.arange(len(vals)) < (rank or len(vals))), gram[cols].t().contiguous())
                  for cols, vals in (self._curvature_rows(b) for b in range(len(self.eig_values)))]
        ops = None if self.hessian_ops is None else self.hessian_ops.to(dt).transpose(1, 2).contiguous()
        groups = torch.tensor(self.batch_group)[units]                 # [n, S, m]
        share = torch.stack([(groups == g).sum(2) for g in range(len(self.group_names))], 2).to(dt) / m
        if self.own_curv is not None:
            own_curv, own_gram = self.own_curv.to(dt), gram[self.own_rows]          # [U, N] each
        S = torch.zeros(n, self.dim, dtype=dt)
        Q = torch.zeros_like(S)
        for t in range(steps):
            inc = forcing[t][units[:, t]].mean(1)                        # [n, N]: the mean of the units' terms
            for g in share[:, t].nonzero()[:, 1].unique().tolist():
                rows = share[:, t, g].nonzero().flatten()
                block = int(self.step_block[t, g])
                if ops is not None:                                  # K s, weighted by the group's share
                    inc[rows] += (S[rows] @ ops[block]) * share[rows, t, g, None]
                    continue
                cols, vals, G = blocks[block]
                # U δ = (B P̄ Bᵀ)[U rows] s, weighted by the group's share of the step's units
                inc[rows, cols.start: cols.stop] += (S[rows] @ G) * vals * share[rows, t, g, None]
            if self.own_curv is not None:                            # Σ_k c_{u,k} (g_{u,k}ᵀ δ), mean over units
                u = units[:, t]
                inc += torch.einsum("nmk,nmkd->nd", torch.einsum("nmkd,nd->nmk", own_gram[u], S), own_curv[u]) / m
            if self.damping:                                          # λ P̄⁻¹ δ = Bᵀ (λ s)
                inc += self.damping * S
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

def knots(j: int, pair_checkpoints: Sequence[int], visits: Sequence[tuple[int, int]] | None = None
          ) -> dict[int, tuple[str, int]]:
    """The points where g(θ_t, u_j) is cached: t -> (kind, index); `visits` are the (row, step) of unit j's
    own/after rows (default: batch j, trained at step j, row j). The own gradient at each visit s and the one after
    it at s + 1 take precedence over a pair at the same checkpoint (the same value, or closer); pairs are indexed
    by their checkpoint, own/after knots by their row."""
    pts: dict[int, tuple[str, int]] = {c: ("pair", c) for c in pair_checkpoints}
    for row, s in sorted(visits if visits is not None else [(j, j)], key=lambda v: v[1]):
        pts[s + 1] = ("after", row)
    for row, s in (visits if visits is not None else [(j, j)]):
        pts[s] = ("own", row)
    return pts


def interpolation(t: int, j: int, pair_checkpoints: Sequence[int], visits: Sequence[tuple[int, int]] | None = None
                  ) -> list[tuple[tuple[str, int], float, int]]:
    """ĝ(θ_t, u_j) as weights on its knots: [(knot, weight, knot's checkpoint)], linear between the knots around
    t (the trajectory's departure from the straight line is the caller's curvature term)."""
    pts = knots(j, pair_checkpoints, visits)
    lo = max(p for p in pts if p <= t)
    above = [p for p in pts if p >= t]
    if lo == t or not above:
        return [(pts[lo], 1.0, lo)]
    hi = min(above)
    a = (t - lo) / (hi - lo)
    return [(pts[lo], 1 - a, lo), (pts[hi], a, hi)]


def replay_steps(src: SubspaceSources) -> tuple[torch.Tensor, torch.Tensor]:
    """The replay's step δ ← a_t δ − b_t P̄ q_t (q the momentum of the gradient differences): a_t = 1 − η_t λ_wd and
    b_t = η_t / (1 − β1^k) c_t, with c_t = √((1 − β2^k) / (1 − β2^k_mid)) Adam's bias correction, as if its raw
    second moment stayed at the mid-point's."""
    hp, steps = src.hp, src.adam_steps
    bc2_mid = 1 - hp.beta2 ** steps[len(steps) // 2]
    scale = [math.sqrt((1 - hp.beta2 ** k) / bc2_mid) for k in steps]
    b = torch.tensor([lr / (1 - hp.beta1 ** k) * c for lr, k, c in zip(src.lrs, steps, scale)], dtype=torch.float64)
    a = torch.tensor([1 - lr * hp.weight_decay for lr in src.lrs], dtype=torch.float64)
    return a, b


def build_subspace(src: SubspaceSources, probe_readout: Callable[[torch.Tensor], torch.Tensor] | None,
                   base_loss: float, probes: int, seed: int, progress: Callable[[str], None] = lambda s: None,
                   probe_sigma: torch.Tensor | None = None, damping: float = 0.0) -> Subspace:
    """The matrices of the closed-form replay with damping λ = `damping`, and the quadratic readout's coefficients
    fitted to `probe_readout(δ [n, d]) -> exact eval losses [n]` on `probes` seeded random and domain-block orders
    (or on `probe_sigma`, orders of the units, where the units are not one epoch's batches)."""
    S_, hp, cks = len(src.lrs), src.hp, list(src.pair_checkpoints)
    U, visits = len(src.groups), src.unit_visits()
    group_names = sorted(set(src.groups))
    layout = basis_layout(U, len(cks), [len(v) for v in src.eigen_values], len(visits),
                          sum(map(len, src.own_directions or [])))
    N, offsets = layout["size"], layout["eig"]
    thetas = torch.stack([src.theta(t) for t in range(S_ + 1)])         # [S+1, d]
    gram = torch.zeros(N, N, dtype=torch.float64)
    lin = torch.zeros(N, dtype=torch.float64)
    proj = [torch.zeros(len(v), S_ + 1, dtype=torch.float64) for v in src.eigen_values]   # U θ_t per eigenspace
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

    units = Units(src.groups, visits, src.reference_units(), layout)
    forcing = _forcing(S_, N, cks, cks, units, block_at, [v.double() for v in src.eigen_values], proj)
    a, b = replay_steps(src)
    sub = Subspace(gram=gram, forcing=forcing, eig_keys=list(src.eigen_keys), eig_offsets=offsets,
                   eig_values=[v.double() for v in src.eigen_values],
                   batch_group=[group_names.index(g) for g in src.groups], group_names=group_names,
                   step_block=torch.tensor([[block_at(t, g) for g in group_names] for t in range(S_)]),
                   lin=lin, a=a, b=b, beta1=hp.beta1, readout_coef=torch.zeros(len(group_names) + 1, dtype=torch.float64),
                   precond_drift=src.precond_drift, damping=damping)
    if src.hessian_grams is not None:
        sub.hessian_ops = galerkin_operators(gram, src.hessian_grams)
    if src.own_directions:
        sub.own_rows, sub.own_curv = _own_curvature(gram, src.own_directions, layout, src.groups, block_at,
                                                     [v.double() for v in src.eigen_values], sub.hessian_ops)
    given = probe_sigma is not None
    if not given:
        probe_sigma = torch.tensor(probe_orders(S_, src.groups, probes, seed))
    if probe_readout is not None and len(probe_sigma) > 0:
        progress(f"subspace: quadratic readout fitted to the exact readout of {len(probe_sigma)} probe orders")
        sub.readout_coef = fit_readout(sub, src, probe_readout, base_loss, probe_sigma)
    sigma = probe_sigma if given or len(probe_sigma) >= 16 else torch.tensor(probe_orders(S_, src.groups, 16, seed))
    if S_ in cks and len(cks) > 1 and len(sigma) > 0:
        progress("subspace: knot disagreement (the estimate without the pairs at the end) on the probe orders")
        inner = [c for c in cks if c != S_]
        alt = type(sub)(**{**sub.__dict__, "forcing": _forcing(S_, N, cks, inner, units, block_at, sub.eig_values,
                                                                 proj)})
        est, other = sub.quadratic(sub.replay(sigma), base_loss), sub.quadratic(alt.replay(sigma), base_loss)
        sub.knot_disagreement = float(((est - other).abs() / (est - base_loss).abs().clamp_min(1e-12)).median())
    return sub


def fit_readout(sub: Subspace, src: SubspaceSources, probe_readout: Callable[[torch.Tensor], torch.Tensor],
                base_loss: float, probe_sigma: torch.Tensor) -> torch.Tensor:
    """The quadratic readout's coefficients (c_g, κ): least squares against the exact readout of the probe orders'
    replayed δ."""
    S = sub.replay(probe_sigma)
    exact = probe_readout(delta(S, src.rows, src.precond, src.dim, src.chunk)).double()
    f = sub.readout_features(S)
    return torch.linalg.lstsq(f[:, 1:], (exact - base_loss - f[:, 0])[:, None]).solution.flatten()


def galerkin_operators(gram: torch.Tensor, hessian_grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """K_i = G⁺ M_i [n, N, N] for M_i = B P̄ H_i P̄ Bᵀ: Bᵀ K_i s is the projection of H_i δ (δ = P̄ Bᵀ s) on the basis
    in Adam's metric, H_i applied to the whole deviation and only its image truncated. G⁺ drops the directions
    whose eigenvalue is under GALERKIN_RTOL of the largest (the basis's gradients are nearly collinear); chosen on
    dev orders (benchmarks/epoch_curvature.py)."""
    pinv = torch.linalg.pinv(gram, rtol=GALERKIN_RTOL, hermitian=True)
    return torch.stack([pinv @ (0.5 * (m + m.t())).double() for m in hessian_grams])


def _own_curvature(gram: torch.Tensor, directions: list[list[int]], layout: dict, groups: Sequence[str],
                   block_at: Callable[[int, str], int], eig_values: list[torch.Tensor],
                   hessian_ops: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of each unit's directions g_{u,k} [U, K] and the coefficients c_u [U, K, N] of
    (h_{u,l} − C P̄ g_{u,l}) (G_u P̄ G_uᵀ)⁺_{lk}, C the group's curvature the replay applies anyway (UΛUᵀ, or the
    Galerkin operator K): with them H_u δ ≈ C δ + Σ_k c_{u,k} g_{u,k}ᵀδ is exact for δ in the span of the P̄ g_{u,k}
    (where steps on u move the parameters)."""
    rows = torch.tensor(directions)
    U, K = rows.shape
    coef = torch.zeros(U, K, gram.shape[0], dtype=torch.float64)
    for u in range(U):
        block = block_at(0, groups[u])
        lo, vals = layout["eig"][block], eig_values[block]
        for k, r in enumerate(directions[u]):
            coef[u, k, layout["curv"] + u * K + k] = 1.0
            if hessian_ops is not None:
                coef[u, k] -= hessian_ops[block][:, r]
            else:
                coef[u, k, lo: lo + len(vals)] -= vals * gram[lo: lo + len(vals), r]     # U P̄ g from the Gram matrix
        # (G P̄ Gᵀ)⁺: a unit's directions may repeat (a batch's own gradient at step 0 is its pair at 0)
        mix = torch.linalg.pinv(gram[rows[u]][:, rows[u]], hermitian=True)
        coef[u] = mix @ coef[u]
    return rows, coef


@dataclass
class Units:
    """The basis's units (fut/subspace.py SubspaceSources): each one's curvature group, the (unit, step) of each
    own/after row, the reference's units at each step, and the basis layout."""
    groups: Sequence[str]
    visits: list[tuple[int, int]]
    reference: list[list[int]]
    layout: dict

    def visits_of(self, u: int) -> list[tuple[int, int]]:
        return [(row, s) for row, (uu, s) in enumerate(self.visits) if uu == u]


def _forcing(S: int, N: int, cks: list[int], knot_checkpoints: list[int], units: Units,
             block_at: Callable[[int, str], int], eig_values: list[torch.Tensor], proj: list[torch.Tensor]
             ) -> torch.Tensor:
    """f_{t,u} in basis coefficients [S, U, N]: ĝ(θ_t, u) interpolated between its knots (pairs at
    `knot_checkpoints` only, a subset of the basis's `cks`) plus H (θ_t − θ_lin(t)), minus the mean of the same
    for the reference's units at t (their knot at t is their own gradient, so that is the reference gradient)."""
    U, layout = len(units.groups), units.layout
    visits = [units.visits_of(u) for u in range(U)]
    forcing = torch.zeros(S, U, N, dtype=torch.float64)
    for t in range(S):
        for u in range(U):
            block = block_at(t, units.groups[u])
            vals, p = eig_values[block], proj[block]
            line = torch.zeros_like(p[:, 0])
            for (kind, idx), w, at in interpolation(t, u, knot_checkpoints, visits[u]):
                forcing[t, u, cks.index(idx) * U + u if kind == "pair" else layout[kind] + idx] += w
                line += w * p[:, at]
            lo = layout["eig"][block]
            forcing[t, u, lo: lo + len(vals)] += vals * (p[:, t] - line)     # H (θ_t − θ_lin(t))
        forcing[t] -= forcing[t, units.reference[t]].mean(0)
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
