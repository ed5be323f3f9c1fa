"""Stage 3: estimators of the window's outcome under another batch order, all from the cache (the methods
themselves are declared in fut/methods.py).

Every parameter-space estimator tracks the deviation δ_t = γ_t − θ_t from the reference trajectory:
    δ_{t+1} = δ_t − η_t (Γ̂_t − Γ_t),
where Γ_t = Γ(θ_t, B_t; m_t, v_t) is the reference step (θ_{t+1} = θ_t − η_t Γ_t) and Γ̂_t the method's estimate of
the step the order σ takes. The identity order therefore gives δ = 0 exactly, and δ never drowns in the rounding of
θ. Γ is computed only by fut.adam.update_term, the arithmetic of torch.optim.AdamW.

- `fut:<curvature>` (the paper's state): Γ̂_t = Γ(θ_t, B_σ(t); m_t, v_t) + J δ_t with the reference moments and
  J δ = f′(g) ∘ (C δ) + λδ, C the curvature (guarded secant, cached eigenspace or the exact Hessian-vector
  product); `fut:secant-raw` is the paper's literal elementwise secant J = ΔΓ/Δθ between consecutive checkpoints,
  and `fut++:secant` adds ½ D2 ∘ δ² from the same batch's second difference of Γ over θ_{t−1}, θ_t, θ_{t+1} (its
  own spacing), guarded: where the second-order term outgrows the first-order one, the expansion is not valid and
  the term is clipped to the first-order term's size.
- `fut-state:<curvature>` (ours): Adam replayed with the order's own m and v on g(θ_t, B_σ(t)) + C δ_t.
- `fut-subspace` (ours, the default): fut/subspace.py, in closed form from the cache's subspace matrices.
- `tracin`, `tracin:full`: first-order influence along the reference path, ΔL = Σ_t ⟨∇L_E(θ_{t+1}),
  −η_t(Γ_{t,σ(t)} − Γ_{t,t})⟩ with frozen moments (projected / full space); `tracin:momentum` follows each
  gradient through the momentum: a change Δg at step t moves m at every later step s by (1−β1)β1^{s−t}Δg.
- `fut:projected`: the paper's first-order recursion on the projected update terms PΓ, read out with the
  projected eval gradient at θ_T.
- `naive`: the order does not matter; L_E(θ_T).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

from .adam import AdamHyper, adam_moments, clip_scale, update_term, update_term_slope
from .cache import UpdateCache, batch_group
from .methods import METHODS
from .orders import validate_order
from .projected import ProjectedStore
from .projection import prefix
from .reference import ReferenceRun
from .subspace import Subspace, delta as subspace_delta

log = logging.getLogger(__name__)


@dataclass
class Estimate:
    method: str
    eval_loss: torch.Tensor            # [n_orders]
    deviation: torch.Tensor | None     # δ_T [n_orders, d] on the CPU, for parameter-space methods
    seconds: float
    # Per order, the first window step t whose δ_t (or, as step T, the readout) held NaN or inf; None: finite.
    # A diverged estimate is reported as such (nulls in the metrics), never propagated as a number.
    non_finite_step: list[int | None]
    # fut-subspace: per order, what says how far to trust it (Subspace.indicators); None for other methods.
    indicators: dict[str, list[float]] | None = None


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den elementwise, 0 where the checkpoints did not move a coordinate (den ≈ 0)."""
    ok = den.abs() > 1e-12
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


class EstimationContext:
    """Everything the estimators read: the reference run, the cache, the eval set. The replay runs on
    `train.device` (tensors read from disk are moved there; evaluation under the training's autocast, as the
    retrained truth is evaluated); what it hands back to callers (estimates, deviations) is on the CPU."""

    def __init__(self, run: ReferenceRun, cache_dir: Path, projection_dir: Path | None = None):
        """`projection_dir`: the projected update terms (fut/projected.py), read by `tracin` and `fut:projected`."""
        self.run, self.params = run, run.params
        self.cache = UpdateCache(run, cache_dir)
        self.projection_dir = projection_dir
        self.device, self.T, self.lrs, self.hp, self.layout = run.device, run.T, run.lrs, run.hp, run.layout
        self.prepared = run.prepared
        self._grads: dict = {}
        self._own: tuple[int, torch.Tensor | None] = (-1, None)
        self._eigen: dict = {}
        self.eval_seqs = self.prepared.eval_mixed.to(self.device)
        self.theta_T = run.theta(self.T)
        self.naive_loss = self.eval_loss(self.theta_T)

    def flat_state(self, t: int):
        return self.run.flat(t)

    def grads(self, t: int) -> torch.Tensor:
        """g(θ_t, B_j) for every batch j [T, d], one shard in memory at a time (two while stepping)."""
        if t not in self._grads:
            self._grads = {k: v for k, v in self._grads.items() if k == t - 1}
            self._grads[t] = self.cache.grads(t).to(self.device)
        return self._grads[t]

    def batch_grads(self, t: int, batches: torch.Tensor) -> torch.Tensor:
        """g(θ_t, B_j) for each j in `batches` [n, d] (a copy), the reference step's own gradient where j = t
        (as the reference step used it: float32 even in a bfloat16 cache)."""
        g = self.grads(t)[batches.to(self.device)]
        g[(batches == t).to(self.device)] = self.own_grad(t)
        return g

    def own_grad(self, t: int) -> torch.Tensor:
        """g(θ_t, B_t), the reference's own gradient at step t (read once per step, used twice)."""
        if self._own[0] != t:
            self._own = (t, self.cache.own_grad(t).to(self.device))
        return self._own[1]

    def eigen(self, t: int, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached eigenspace of `group` in force at step t (values, vectors), on the device."""
        key = (t, group)
        if key not in self._eigen:
            vals, vecs = self.cache.eigen(t, group)
            for k, (v, u) in self._eigen.items():      # the same file in force at another step: share it
                if k[1] == group and torch.equal(v, vals.to(self.device)):
                    self._eigen[key] = (v, u)
                    break
            else:
                self._eigen[key] = (vals.to(self.device), vecs.to(self.device))
        return self._eigen[key]

    @cached_property
    def projected(self) -> ProjectedStore:
        if self.projection_dir is None:
            raise ValueError("the projected methods (tracin, fut:projected) read the projection stage's output: "
                             "pass its folder (data/projection)")
        return ProjectedStore(self.params, self.cache, self.projection_dir)

    @cached_property
    def subspace(self) -> Subspace:
        return self.cache.subspace()

    @cached_property
    def _subspace_sources(self):
        return self.cache.subspace_sources()

    def subspace_delta(self, S: torch.Tensor) -> torch.Tensor:
        """fut-subspace's δ = P̄ Bᵀ s in full space [n, d] (on the CPU)."""
        src = self._subspace_sources
        return subspace_delta(S, src.rows, src.precond, src.dim, src.chunk)

    def params_at(self, delta: torch.Tensor | None) -> torch.Tensor:
        """The estimated final parameters θ_T + δ (θ_T for None), on the device."""
        return self.theta_T if delta is None else self.theta_T + delta.to(self.device)

    def loss_on(self, flat: torch.Tensor, seqs: torch.Tensor) -> float:
        return self.run.loss_on(flat, seqs)

    def eval_loss(self, flat: torch.Tensor) -> float:
        return self.loss_on(flat, self.eval_seqs)


def _clip(g: torch.Tensor, hp: AdamHyper) -> torch.Tensor:
    if hp.grad_clip is None:
        return g
    return g * clip_scale(g.norm(dim=-1, keepdim=True), hp.grad_clip)


def curvature_product(ctx: EstimationContext, t: int, batches: torch.Tensor, delta: torch.Tensor,
                      kind: str) -> torch.Tensor:
    """C δ for each row of δ [n, d], C the curvature `kind` of the row's batch at step t."""
    out = torch.zeros_like(delta)
    if kind == "none":
        return out
    on_device = batches.to(ctx.device)
    if kind == "secant":
        theta = ctx.flat_state(t)[0]
        dtheta = ctx.flat_state(t + 1)[0] - theta
        g = ctx.batch_grads(t, batches)
        return _safe_div(ctx.grads(t + 1)[on_device] - g, dtheta).clamp_min(0) * delta
    for j in batches.unique().tolist():
        rows = (on_device == j).nonzero().flatten()
        if kind == "eig":
            vals, vecs = ctx.eigen(t, batch_group(ctx.prepared, j))
            out[rows] = ((delta[rows] @ vecs.t()) * vals) @ vecs
        else:   # hvp: the exact Hessian of the batch itself
            out[rows] = ctx.run.loss.hvp(ctx.flat_state(t)[0], ctx.prepared.window[j].to(ctx.device), delta[rows])
    return out


def _second_difference(ctx: EstimationContext, t: int, batches: torch.Tensor, m, v, step: int) -> torch.Tensor:
    """D2 of Γ(·, B_j; m_t, v_t) along the trajectory from θ_{t−1}, θ_t, θ_{t+1}, with their own spacing."""
    on_device = batches.to(ctx.device)
    th = [ctx.flat_state(s)[0] for s in (t - 1, t, t + 1)]
    gam = [update_term(th[i], _clip(ctx.grads(t - 1 + i)[on_device], ctx.hp), m, v, step + 1, ctx.hp)[0]
           for i in range(3)]
    h_minus, h_plus = th[1] - th[0], th[2] - th[1]
    slope_plus, slope_minus = _safe_div(gam[2] - gam[1], h_plus), _safe_div(gam[1] - gam[0], h_minus)
    return _safe_div(2 * (slope_plus - slope_minus), h_plus + h_minus)


def replay(ctx: EstimationContext, sigma: torch.Tensor, state: str, curvature: str, second_order: bool = False,
           steps: int | None = None, on_step=None) -> torch.Tensor:
    """Full-space replay; returns δ_steps [n, d] on the device. `state`: `reference` (the paper's frozen
    moments) or `own` (the order's own Adam state). `on_step(t, δ_t)` sees every step on the way."""
    steps = ctx.T if steps is None else steps
    n, hp = sigma.shape[0], ctx.hp
    _, m, v, _ = ctx.flat_state(0)
    delta = torch.zeros(n, ctx.layout.dim, device=ctx.device)
    m, v = m.expand(n, -1).clone(), v.expand(n, -1).clone()
    for t in range(steps):
        theta, m_ref, v_ref, step = ctx.flat_state(t)
        ref = update_term(theta, _clip(ctx.own_grad(t), hp), m_ref, v_ref, step + 1, hp)[0]
        g = ctx.batch_grads(t, sigma[:, t])
        if state == "own":
            g = g + curvature_product(ctx, t, sigma[:, t], delta, curvature)
            est, m, v = update_term(theta + delta, _clip(g, hp), m, v, step + 1, hp)
        else:
            g = _clip(g, hp)
            est = update_term(theta, g, m_ref, v_ref, step + 1, hp)[0]
            if curvature == "secant-raw":       # the paper as written: J = ΔΓ/Δθ elementwise
                theta_next = ctx.flat_state(t + 1)[0]
                dtheta = theta_next - theta
                nxt = update_term(theta_next, _clip(ctx.grads(t + 1)[sigma[:, t].to(ctx.device)], hp),
                                  m_ref, v_ref, step + 1, hp)[0]
                first = _safe_div(nxt - est, dtheta) * delta
            else:
                first = (update_term_slope(g, m_ref, v_ref, step + 1, hp)
                         * curvature_product(ctx, t, sigma[:, t], delta, curvature) + hp.weight_decay * delta)
            est = est + first
            if second_order and t > 0:
                second = 0.5 * _second_difference(ctx, t, sigma[:, t], m_ref, v_ref, step) * delta * delta
                est = est + torch.maximum(torch.minimum(second, first.abs()), -first.abs())
        delta = delta - ctx.lrs[t] * (est - ref)
        if on_step is not None:
            on_step(t + 1, delta)
    return delta


def secant_raw_gain(ctx: EstimationContext, coordinates: int = 20_000, seed: int = 0) -> dict:
    """Why the paper's literal secant fails: with J = ΔΓ/Δθ elementwise, each step multiplies every coordinate of δ
    by (1 − η_t J). The distribution of η_t J over every (checkpoint t, batch j) on a seeded sample of
    coordinates: its quantiles, the share of factors |1 − η J| > 1 (the step amplifies δ there) and > 10, and for
    each coordinate the product of |1 − η_t J_{t,j}| along the window for a random batch per step."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(ctx.layout.dim, generator=gen)[:coordinates].to(ctx.device)
    values, log_gain = [], torch.zeros(len(idx), device=ctx.device, dtype=torch.float64)
    for t in range(ctx.T):
        theta, m, v, step = ctx.flat_state(t)
        theta_next = ctx.flat_state(t + 1)[0]
        gam = update_term(theta, _clip(ctx.grads(t), ctx.hp), m, v, step + 1, ctx.hp)[0][:, idx]
        nxt = update_term(theta_next, _clip(ctx.grads(t + 1), ctx.hp), m, v, step + 1, ctx.hp)[0][:, idx]
        eta_j = ctx.lrs[t] * _safe_div(nxt - gam, (theta_next - theta)[idx])          # [T batches, coordinates]
        values.append(eta_j.flatten().cpu())
        pick = torch.randint(ctx.T, (len(idx),), generator=gen).to(ctx.device)
        log_gain += (1 - eta_j[pick, torch.arange(len(idx), device=ctx.device)]).abs().double().clamp_min(1e-300).log()
    x = torch.cat(values).double()
    q = (0.01, 0.25, 0.5, 0.75, 0.99, 0.999)
    sample = x[torch.randperm(len(x), generator=gen)[:1_000_000]]
    return {"coordinates": len(idx), "factors": len(x),
            "eta_j_quantiles": dict(zip(map(str, q), torch.quantile(sample, torch.tensor(q, dtype=x.dtype)).tolist())),
            "share_amplifying": float(((1 - x).abs() > 1).double().mean()),
            "share_factor_above_10": float(((1 - x).abs() > 10).double().mean()),
            "window_gain_quantiles": dict(zip(map(str, q), torch.quantile(
                log_gain.cpu(), torch.tensor(q, dtype=torch.float64)).exp().tolist()))}


def tracin(ctx: EstimationContext, sigma: torch.Tensor, kind: str, k: int | None) -> torch.Tensor:
    """Direct estimate of the eval loss: L_E(θ_T) + Σ_t score_t(σ(t)) − score_t(t)."""
    total = torch.zeros(sigma.shape[0], dtype=torch.float64)
    for t, scores in enumerate(_influence_scores(ctx, kind, k)):
        total += (scores[sigma[:, t]] - scores[t]).double()
    return ctx.naive_loss + total.float()


def _influence_scores(ctx: EstimationContext, kind: str, k: int | None) -> list[torch.Tensor]:
    """Per step t, the first-order change of the final eval loss from training batch j at t, for every j [T]."""
    hp, T = ctx.hp, ctx.T
    if kind == "momentum":
        # K_t = Σ_{s ≥ t} η_s (1−β1) β1^{s−t} / (1 − β1^{step_s}) · P_s ∇L_E(θ_{s+1}), by a backward recursion;
        # score_t(j) = −⟨g(θ_t, B_j), K_t⟩.
        out, K = [None] * T, None
        for s in reversed(range(T)):
            theta, m, v, step = ctx.flat_state(s)
            _, v1 = adam_moments(ctx.own_grad(s), m, v, hp)
            precond = 1 / ((v1 / (1 - hp.beta2 ** (step + 1))).sqrt() + hp.eps)
            term = ctx.lrs[s] * (1 - hp.beta1) / (1 - hp.beta1 ** (step + 1)) * precond \
                * ctx.cache.eval_grad(s + 1).to(ctx.device)
            K = term if K is None else term + hp.beta1 * K
            out[s] = -(ctx.grads(s) @ K).cpu()
        return out
    out = []
    for t in range(T):
        if kind == "projected":
            gam, e = ctx.projected.gamma(t), ctx.projected.eval_grad(t + 1)
            if k is not None:
                gam, e = prefix(gam, k), prefix(e, k)
        else:
            theta, m, v, step = ctx.flat_state(t)
            gam = update_term(theta, _clip(ctx.grads(t), hp), m, v, step + 1, hp)[0]
            e = ctx.cache.eval_grad(t + 1).to(ctx.device)
        out.append(-ctx.lrs[t] * (gam @ e).cpu())
    return out


def fut_projected(ctx: EstimationContext, sigma: torch.Tensor, k: int | None) -> torch.Tensor:
    """The first-order recursion on the projected update terms, read out with the projected eval gradient at
    θ_T: L_T + ⟨P∇L_E(θ_T), −Σ_t η_t (PΓ_{t,σ(t)} − PΓ_{t,t})⟩."""
    e = ctx.projected.eval_grad(ctx.T)
    e = prefix(e, k) if k is not None else e
    total = torch.zeros(sigma.shape[0], dtype=torch.float64)
    for t in range(ctx.T):
        gam = ctx.projected.gamma(t)
        gam = prefix(gam, k) if k is not None else gam
        scores = -ctx.lrs[t] * (gam @ e)
        total += (scores[sigma[:, t]] - scores[t]).double()
    return ctx.naive_loss + total.float()


def deviation(ctx: EstimationContext, sigma: torch.Tensor, method: str, steps: int | None = None,
              on_step=None) -> torch.Tensor:
    """δ after `steps` steps [n, d] (on the device) for a parameter-space method."""
    m = METHODS[method]
    if method.startswith("fut-subspace"):
        S = ctx.subspace.replay(sigma.cpu(), steps)
        return ctx.subspace_delta(S).to(ctx.device)
    if m.state not in ("own", "reference") or not m.estimates_parameters:
        raise ValueError(f"method {method!r} does not estimate parameters")
    return replay(ctx, sigma.to(ctx.device), m.state, m.curvature, second_order=method.startswith("fut++"),
                  steps=steps, on_step=on_step)


def readout(ctx: EstimationContext, delta: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        e = ctx.cache.eval_grad(ctx.T).to(ctx.device)
        return ctx.naive_loss + (delta @ e).cpu()
    return torch.tensor([ctx.eval_loss(ctx.theta_T + dl) for dl in delta])


def estimate_along_steps(ctx: EstimationContext, order: Sequence[int], method: str,
                         steps: Sequence[int]) -> tuple[dict[int, float], torch.Tensor]:
    """Estimated eval loss after each of `steps` window steps of `order` (exact readout at θ_s + δ_s), and the
    deviation δ after the last of them (on the device)."""
    sigma = torch.tensor([validate_order(order, ctx.T, permutation=False)], dtype=torch.long)
    if method.startswith("fut-subspace"):
        out = {s: ctx.eval_loss(ctx.flat_state(s)[0] + deviation(ctx, sigma, method, s)[0]) for s in steps}
        return out, deviation(ctx, sigma, method, max(steps))[0]
    wanted, out = set(steps), {}

    def read(t: int, delta: torch.Tensor) -> None:
        if t in wanted:
            out[t] = ctx.eval_loss(ctx.flat_state(t)[0] + delta[0])

    return out, deviation(ctx, sigma, method, max(steps), on_step=read)[0]


def estimate(ctx: EstimationContext, orders: Sequence[Sequence[int]], method: str, readout_kind: str = "exact",
             k: int | None = None, chunk: int = 12) -> Estimate:
    """Estimated final eval loss of each order by `method` (full-space replays batched over orders in chunks;
    `readout_kind` applies to them, fut-subspace has its own). Measured with the default model on 2 cores: 8-12
    orders per chunk are fastest (the replay's [n, d] temporaries outgrow what memory bandwidth rewards)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    m = METHODS[method]
    strided = ctx.params.cache.checkpoint_stride > 1 or ctx.params.cache.eval_grad_stride > 1
    if strided and (m.every_checkpoint or m.needs_eval_gradients):
        raise ValueError(f"method {method!r} reads the cache at every checkpoint, but this cache has pairs at "
                         f"every {ctx.params.cache.checkpoint_stride}th and eval gradients at every "
                         f"{ctx.params.cache.eval_grad_stride}th only")
    sigma = torch.tensor([validate_order(o, ctx.T, permutation=False) for o in orders], dtype=torch.long)
    start = time.perf_counter()
    bad_step: list[int | None] = [None] * len(sigma)
    indicators = None
    if method == "naive":
        losses, deviations = torch.full((len(sigma),), ctx.naive_loss), None
    elif method.startswith("fut-subspace"):
        S = ctx.subspace.replay(sigma)
        indicators = {k: v.tolist() for k, v in ctx.subspace.indicators(S, ctx.naive_loss).items()}
        if m.readout == "quadratic":
            losses, deviations = ctx.subspace.quadratic(S, ctx.naive_loss).float(), None
        else:
            deviations = ctx.subspace_delta(S)
            losses = readout(ctx, deviations.to(ctx.device), "exact")
    elif m.readout == "direct":
        kind = {"tracin": "projected", "tracin:full": "full", "tracin:momentum": "momentum"}.get(method)
        losses = fut_projected(ctx, sigma, k) if kind is None else tracin(ctx, sigma, kind, k)
        deviations = None
    else:
        losses, parts = [], []
        for c in range(0, len(sigma), chunk):
            def watch(t: int, delta: torch.Tensor, c=c) -> None:
                for i in _non_finite_rows(delta).nonzero().flatten().tolist():
                    if bad_step[c + i] is None:
                        bad_step[c + i] = t

            delta = deviation(ctx, sigma[c: c + chunk], method, on_step=watch)
            losses.append(readout(ctx, delta, readout_kind))
            parts.append(delta.cpu())
        losses, deviations = torch.cat(losses), torch.cat(parts)
    for i in (~torch.isfinite(losses)).nonzero().flatten().tolist():
        bad_step[i] = bad_step[i] if bad_step[i] is not None else ctx.T
    seconds = time.perf_counter() - start
    steps = [t for t in bad_step if t is not None]
    if steps:
        log.warning("%s: %d of %d orders went non-finite (NaN or inf), the first at window step %d; they are "
                    "reported as diverged", method, len(steps), len(sigma), min(steps))
    return Estimate(method, losses, deviations, seconds, bad_step, indicators)


def _non_finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Which rows of x [n, d] hold a NaN or inf: a row sum first (cheap), confirmed elementwise where it is not
    finite, so a sum that merely overflows does not count."""
    suspect = (~torch.isfinite(x.sum(dim=1))).nonzero().flatten()
    bad = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    bad[suspect] = ~torch.isfinite(x[suspect]).all(dim=1)
    return bad.cpu()
