"""Stage 3: estimators of the window's outcome under another batch order, all from the cache.

Every parameter-space estimator tracks the deviation δ_t = γ_t − θ_t from the reference trajectory:
    δ_{t+1} = δ_t − η_t (Γ̂_t − Γ_t),
where Γ_t = Γ(θ_t, B_t; m_t, v_t) is the reference step (so θ_{t+1} = θ_t − η_t Γ_t) and Γ̂_t the method's
estimate of the step the order σ takes. The identity order therefore gives δ = 0 exactly, and the deviation
never drowns in the rounding of θ.

- `fut`, `fut++` (the paper): Γ̂_t = Γ(θ_t, B_σ(t); m_t, v_t) + D1 ∘ δ_t (+ ½ D2 ∘ δ_t² for fut++), with the
  reference Adam state, D1/D2 the elementwise first/second finite differences of Γ(·, B_σ(t); m_t, v_t) between
  consecutive reference checkpoints.
- `fut-state:<curvature>` (ours): Adam replayed with the order's own m, v on the linearised gradient
  g(θ_t, B_σ(t)) + C_t δ_t, C_t = 0 (`none`), the paper's secant diagonal with a positive-part guard (`secant`),
  the cached top eigenspace of the Hessian of a batch of B_σ(t)'s domain (`eig`) or of a batch mixed from
  the whole window (`eig-mixed`), or the exact Hessian of B_σ(t) (`hvp`) or of the batch that `eig` / `eig-mixed`
  take eigenspaces of (`hvp-domain` / `hvp-mixed`: accuracy references, a curvature product per step).
  Between cached checkpoints (`cache.checkpoint_stride` s > 1) the gradient is expanded around the nearest
  cached one, c = t − t mod s: g(θ_t, B_j) ≈ g(θ_c, B_j) + H_c (θ_t − θ_c) with the cached eigenspace of B_j's
  domain (the mixed one without domain eigenspaces), and the exact stored g(θ_t, B_t) for the reference's
  own batch, so the identity order still gives δ = 0 exactly.
- `tracin`: first-order influence along the reference path, ΔL = Σ_t ⟨∇L_E(θ_{t+1}), −η_t(Γ_{t,σ(t)} − Γ_{t,t})⟩,
  in projected space (`tracin`) or full space (`tracin:full`).
- `naive`: the order does not matter; L_E(θ_T).
Readouts: `exact` evaluates the eval loss at γ_T = θ_T + δ_T; `linear` is L_E(θ_T) + ⟨∇L_E(θ_T), δ_T⟩.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .adam import AdamHyper, adam_direction, adam_moments, clip_scale
from .cache import UpdateCache, batch_group, curvature_batches
from .config import METHODS, STRIDED_METHODS, Params
from .curvature import LossFunction
from .data import Prepared, load_prepared
from .device import autocast, configure_threads, resolve_device
from .flat import ParamLayout
from .model import build_model
from .orders import validate_order
from .projection import prefix
from .reference import load_checkpoint, reference_hash
from .training import window_lrs

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


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den elementwise, 0 where the checkpoints did not move a coordinate (den ≈ 0)."""
    ok = den.abs() > 1e-12
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


class EstimationContext:
    """Everything the estimators read: reference trajectory, cache, eval set and the loss function. The replay
    runs on `train.device` (tensors read from disk are moved there; evaluation under the training's autocast,
    as the retrained truth is evaluated); what it hands back to callers (estimates, deviations) is on the CPU."""

    def __init__(self, params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path,
                 checkpoint_stride: int | None = None):
        """`checkpoint_stride`: read g(θ_t, B_j) only at these checkpoints (a multiple of the cache's own
        stride; default the cache's), which measures a sparser cache on this one."""
        configure_threads(params.train)
        self.stride = checkpoint_stride or params.cache.checkpoint_stride
        if self.stride % params.cache.checkpoint_stride:
            raise ValueError(f"checkpoint_stride {self.stride}: expected a multiple of cache.checkpoint_stride "
                             f"({params.cache.checkpoint_stride}), the checkpoints the cache has pairs at")
        self.params = params
        self.device = resolve_device(params.train)
        self.prepared: Prepared = load_prepared(data_dir, params)
        self.ref_dir = Path(ref_dir)
        self.ref_hash = reference_hash(params, self.prepared)
        self.cache = UpdateCache(params, self.prepared, ref_dir, cache_dir)
        self._states: dict = {}
        self._grads: dict = {}
        self._own: tuple[int, torch.Tensor | None] = (-1, None)
        self._eigen: dict = {}
        self.T = params.window.steps
        self.lrs = window_lrs(params)
        self.hp = AdamHyper.from_config(params.optimizer)
        start = load_checkpoint(ref_dir, 0, self.ref_hash)
        self.layout = ParamLayout.of(start.theta)
        model = build_model(params.model, self.prepared.vocab_size, params.data.seq_len, self.prepared.eos_id)
        self.loss = LossFunction(model.to(self.device), self.layout)
        self.theta_T = self.flat_state(self.T)[0]
        self.eval_seqs = self.prepared.eval_mixed.to(self.device)
        self.naive_loss = self.eval_loss(self.theta_T)

    def flat_state(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """θ_t, m_t, v_t (flat) and the Adam step count of the reference checkpoint t."""
        if t not in self._states:
            s = load_checkpoint(self.ref_dir, t, self.ref_hash)
            # Replays walk forward (and back to the last cached checkpoint): the last few states suffice.
            self._states = dict(list(self._states.items())[-3:])
            self._states[t] = (*(self.layout.flatten(x).to(self.device) for x in (s.theta, s.m, s.v)), s.adam_step)
        return self._states[t]

    def grads(self, t: int) -> torch.Tensor:
        """g(θ_t, B_j) for every batch j [T, d], one shard in memory at a time (two while stepping)."""
        if t not in self._grads:
            self._grads = {k: v for k, v in self._grads.items() if k == t - 1}
            self._grads[t] = self.cache.grads(t).to(self.device)
        return self._grads[t]

    def batch_grads(self, t: int, batches: torch.Tensor) -> torch.Tensor:
        """g(θ_t, B_j) for each j in `batches` [n, d]: stored at a cached checkpoint, else expanded around the
        nearest cached one c ≤ t with its eigenspace (exact for the reference's own batch B_t)."""
        c = t - t % self.stride
        g = self.grads(c)[batches.to(self.device)]   # advanced indexing: already a copy
        if c < t:
            moved = self.flat_state(t)[0] - self.flat_state(c)[0]
            groups = [batch_group(self.prepared, j) if "domain" in self.params.cache.curvature else "window"
                      for j in batches.tolist()]
            for group in sorted(set(groups)):
                vals, vecs = self.eigen(c, group)
                g[torch.tensor([x == group for x in groups], device=self.device)] += ((vecs @ moved) * vals) @ vecs
        # The reference step's own gradient, as the reference step uses it (float32 even in a bfloat16 cache).
        g[(batches == t).to(self.device)] = self.own_grad(t)
        return g

    def own_grad(self, t: int) -> torch.Tensor:
        """g(θ_t, B_t), the reference's own gradient at step t (read once per step, used twice)."""
        if self._own[0] != t:
            self._own = (t, self.cache.own_grad(t).to(self.device))
        return self._own[1]

    def eigen(self, t: int, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached eigenspace of `group` in force at step t (values, vectors), on the device; the current
        checkpoint's are kept."""
        key = (t - t % self.params.cache.curvature_stride, group)
        if key not in self._eigen:
            self._eigen = {k: v for k, v in self._eigen.items() if k[0] == key[0]}
            self._eigen[key] = tuple(x.to(self.device) for x in self.cache.eigen(t, group))
        return self._eigen[key]

    def curvature_batches(self) -> dict[str, torch.Tensor]:
        """The batches whose Hessians the cache's eigenspaces are of, by group (all kinds)."""
        return curvature_batches(self.prepared, self.params.cache.curvature_batch, ["domain", "window"])

    def params_at(self, delta: torch.Tensor | None) -> torch.Tensor:
        """The estimated final parameters θ_T + δ (θ_T for None), on the device."""
        return self.theta_T if delta is None else self.theta_T + delta.to(self.device)

    @torch.no_grad()
    def loss_on(self, flat: torch.Tensor, seqs: torch.Tensor) -> float:
        """Mean next-token loss of `seqs` at the flat parameters (on the device, in the training's precision)."""
        with autocast(self.params.train, self.device):
            return float(self.loss.loss(flat, seqs.to(self.device)))

    def eval_loss(self, flat: torch.Tensor) -> float:
        return self.loss_on(flat, self.eval_seqs)


def _clip(g: torch.Tensor, hp: AdamHyper) -> torch.Tensor:
    if hp.grad_clip is None:
        return g
    return g * clip_scale(g.norm(dim=-1, keepdim=True), hp.grad_clip)


def _paper_gamma(ctx: EstimationContext, g: torch.Tensor, theta, m, v, step: int) -> torch.Tensor:
    """Γ(θ, B; m, v) for gradient(s) g of B at θ, with the given (reference) Adam state."""
    m1, v1 = adam_moments(_clip(g, ctx.hp), m, v, ctx.hp)
    return adam_direction(m1, v1, step + 1, ctx.hp) + ctx.hp.weight_decay * theta


def replay_paper(ctx: EstimationContext, sigma: torch.Tensor, second_order: bool, steps: int,
                 on_step=None) -> torch.Tensor:
    """FUT / FUT++ with the reference Adam state and finite-difference Taylor terms; returns δ_steps [n, d]."""
    delta = torch.zeros(sigma.shape[0], ctx.layout.dim, device=ctx.device)
    sigma = sigma.to(ctx.device)
    d1_prev = None
    for t in range(steps):
        theta, m, v, step = ctx.flat_state(t)
        theta_next = ctx.flat_state(t + 1)[0]
        grads, grads_next = ctx.grads(t), ctx.grads(t + 1)
        ref = _paper_gamma(ctx, grads[t], theta, m, v, step)
        gam = _paper_gamma(ctx, grads[sigma[:, t]], theta, m, v, step)
        # Secant diagonal of ∂Γ(·, B_σ(t); m_t, v_t)/∂θ between θ_t and θ_{t+1}.
        gam_next = _paper_gamma(ctx, grads_next[sigma[:, t]], theta_next, m, v, step)
        dtheta = theta_next - theta
        d1 = _safe_div(gam_next - gam, dtheta)
        est = gam + d1 * delta
        if second_order and d1_prev is not None:
            est = est + 0.5 * _safe_div(d1 - d1_prev, dtheta) * delta * delta
        d1_prev = d1
        delta = delta - ctx.lrs[t] * (est - ref)
        if on_step is not None:
            on_step(t + 1, delta)
    return delta


def replay_state(ctx: EstimationContext, sigma: torch.Tensor, curvature: str, steps: int,
                 on_step=None) -> torch.Tensor:
    """fut-state: the order's own Adam moments on linearised gradients; returns δ_steps [n, d]."""
    n = sigma.shape[0]
    _, m0, v0, _ = ctx.flat_state(0)
    delta = torch.zeros(n, ctx.layout.dim, device=ctx.device)
    on_device = sigma.to(ctx.device)
    m, v = m0.expand(n, -1).clone(), v0.expand(n, -1).clone()
    for t in range(steps):
        theta, m_ref, v_ref, step = ctx.flat_state(t)
        ref = _paper_gamma(ctx, ctx.own_grad(t), theta, m_ref, v_ref, step)
        g = ctx.batch_grads(t, sigma[:, t])
        if curvature == "eig-mixed":
            vals, vecs = ctx.eigen(t, "window")
            g = g + ((delta @ vecs.t()) * vals) @ vecs
        elif curvature == "eig":   # g is this step's own copy (batch_grads): updated in place
            groups = [batch_group(ctx.prepared, j) for j in sigma[:, t].tolist()]
            for group in sorted(set(groups)):
                rows = torch.tensor([i for i, x in enumerate(groups) if x == group], device=ctx.device)
                vals, vecs = ctx.eigen(t, group)
                g[rows] += ((delta[rows] @ vecs.t()) * vals) @ vecs
        elif curvature == "secant":
            dtheta = ctx.flat_state(t + 1)[0] - theta
            g = g + _safe_div(ctx.grads(t + 1)[on_device[:, t]] - g, dtheta).clamp_min(0) * delta
        elif curvature.startswith("hvp"):
            # Exact Hessian of the batch itself (`hvp`), or of the curvature batch the cache's eigenspaces
            # are computed from (`hvp-domain`, `hvp-mixed`): references that separate which batch's curvature
            # is used from the eigenspace's truncation.
            batches = ctx.curvature_batches()
            for j in sigma[:, t].unique().tolist():
                rows = (on_device[:, t] == j).nonzero().flatten()
                batch = {"hvp": ctx.prepared.window[j], "hvp-domain": batches.get(batch_group(ctx.prepared, j)),
                         "hvp-mixed": batches.get("window")}[curvature]
                g[rows] += ctx.loss.hvp(theta, batch.to(ctx.device), delta[rows])
        m, v = adam_moments(_clip(g, ctx.hp), m, v, ctx.hp)
        est = adam_direction(m, v, step + 1, ctx.hp) + ctx.hp.weight_decay * (theta + delta)
        delta = delta - ctx.lrs[t] * (est - ref)
        if on_step is not None:
            on_step(t + 1, delta)
    return delta


def tracin(ctx: EstimationContext, sigma: torch.Tensor, projected: bool, k: int | None) -> torch.Tensor:
    """Direct estimate of the eval loss, L_E(θ_T) + Σ_t ⟨∇L_E(θ_{t+1}), −η_t(Γ_{t,σ(t)} − Γ_{t,t})⟩."""
    total = torch.zeros(sigma.shape[0], dtype=torch.float64)
    for t in range(ctx.T):
        if projected:
            gam = ctx.cache.tensor(t, "proj_gamma")
            e = ctx.cache.tensor(t + 1, "proj_eval_grad")
            if k is not None:
                gam, e = prefix(gam, k), prefix(e, k)
        else:
            theta, m, v, step = ctx.flat_state(t)
            grads = ctx.grads(t)
            gam = torch.stack([_paper_gamma(ctx, grads[j], theta, m, v, step) for j in range(ctx.T)])
            e = ctx.cache.tensor(t + 1, "eval_grad").to(ctx.device)
        scores = (gam @ e).cpu()                          # ⟨∇L_E, Γ_{t,j}⟩ for every batch j
        total += -ctx.lrs[t] * (scores[sigma[:, t]] - scores[t]).double()
    return ctx.naive_loss + total.float()


def deviation(ctx: EstimationContext, sigma: torch.Tensor, method: str, steps: int, on_step=None) -> torch.Tensor:
    """δ after `steps` steps [n, d]; `on_step(t, δ_t)` sees every step on the way."""
    if method in ("fut", "fut++"):
        return replay_paper(ctx, sigma, second_order=method == "fut++", steps=steps, on_step=on_step)
    if method.startswith("fut-state:"):
        return replay_state(ctx, sigma, curvature=method.split(":")[1], steps=steps, on_step=on_step)
    raise ValueError(f"method {method!r} does not estimate parameters")


def readout(ctx: EstimationContext, delta: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "linear":
        e = ctx.cache.tensor(ctx.T, "eval_grad").to(ctx.device)
        return ctx.naive_loss + (delta @ e).cpu()
    return torch.tensor([ctx.eval_loss(ctx.theta_T + dl) for dl in delta])


def estimate_along_steps(ctx: EstimationContext, order: Sequence[int], method: str,
                         steps: Sequence[int]) -> tuple[dict[int, float], torch.Tensor]:
    """Estimated eval loss after each of `steps` window steps of `order` (exact readout at θ_s + δ_s), and the
    deviation δ after the last of them (on the context's device), from one replay."""
    sigma = torch.tensor([validate_order(order, ctx.T, permutation=False)], dtype=torch.long)
    wanted, out = set(steps), {}

    def read(t: int, delta: torch.Tensor) -> None:
        if t in wanted:
            out[t] = ctx.eval_loss(ctx.flat_state(t)[0] + delta[0])

    return out, deviation(ctx, sigma, method, max(steps), on_step=read)[0]


def estimate(ctx: EstimationContext, orders: Sequence[Sequence[int]], method: str, readout_kind: str = "exact",
             k: int | None = None, chunk: int = 12) -> Estimate:
    """Estimated final eval loss of each order (batched over orders in chunks) by `method`. Measured with the
    default model on 2 cores: 0.62 s per order at 8-12 orders per chunk, 0.74 at 24 and 1.1 at 32 (the replay's
    [n, d] temporaries outgrow what memory bandwidth rewards)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if ctx.stride > 1 and method not in STRIDED_METHODS:
        raise ValueError(f"method {method!r} reads g(θ_t, B_j) at every checkpoint, but this cache is read at one "
                         f"checkpoint in {ctx.stride}; use one of {', '.join(STRIDED_METHODS)}")
    sigma = torch.tensor([validate_order(o, ctx.T, permutation=False) for o in orders], dtype=torch.long)
    start = time.perf_counter()
    losses, deviations, bad_step = [], [], [None] * len(sigma)
    for c in range(0, len(sigma), chunk):
        s = sigma[c: c + chunk]

        def watch(t: int, delta: torch.Tensor) -> None:
            for i in _non_finite_rows(delta).nonzero().flatten().tolist():
                if bad_step[c + i] is None:
                    bad_step[c + i] = t

        if method == "naive":
            losses.append(torch.full((len(s),), ctx.naive_loss))
        elif method.startswith("tracin"):
            losses.append(tracin(ctx, s, projected=method == "tracin", k=k))
        else:
            delta = deviation(ctx, s, method, ctx.T, on_step=watch)
            losses.append(readout(ctx, delta, readout_kind))
            deviations.append(delta.cpu())
        watch(ctx.T, losses[-1][:, None])
    seconds = time.perf_counter() - start
    steps = [t for t in bad_step if t is not None]
    if steps:
        log.warning("%s: %d of %d orders went non-finite (NaN or inf), the first at window step %d; they are "
                    "reported as diverged", method, len(steps), len(sigma), min(steps))
    return Estimate(method, torch.cat(losses), torch.cat(deviations) if deviations else None, seconds, bad_step)


def _non_finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Which rows of x [n, d] hold a NaN or inf: a row sum first (cheap), confirmed elementwise where it is not
    finite, so a sum that merely overflows does not count."""
    suspect = (~torch.isfinite(x.sum(dim=1))).nonzero().flatten()
    bad = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    bad[suspect] = ~torch.isfinite(x[suspect]).all(dim=1)
    return bad.cpu()
