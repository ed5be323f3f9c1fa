"""Several epochs: the reference run of E passes over the window, and fut-subspace's matrices for its orders.

The E-epoch reference trains the window's batches in their order E times from the window start (the one-epoch
reference's, through `run_window`). Its fut-subspace basis has the units of the one-epoch one, each batch visited E
times: the pairs g(θ_c, B_j) for every batch at every epoch boundary c = 0, T, ..., E·T, each step's own gradient
g(θ_t, B_{t mod T}) and the gradient right after it g(θ_{t+1}, B_{t mod T}) (a batch's gradient path has up to 3E + 1
knots), the batch-level cache's domain eigenspaces at checkpoint 0 (θ_0 is the same), and each batch's Hessian at θ_0
along its own preconditioned gradients (fut/subspace.py `own_directions`). The replay applies each domain's whole
curvature-batch Hessian at θ_0 to the deviation, projected on the basis (Galerkin: B P̄ H P̄ Bᵀ, one Hessian-vector
product per basis row and domain, shared over torchrun ranks by fut/hessian_jobs.py), not only its top eigenspace:
chosen on dev orders (benchmarks/epoch_curvature.py). Its curvature batch has multi_epoch.curvature_batch[E]
sequences of the domain's window batches (by default 24 at E = 2, three times the batch-level cache's 8, and 8 at
E = 3: chosen on dev orders by benchmarks/epoch_curvature_source.py and epoch_curvature_scale.py; the first also
measured that the Hessian at the later epoch boundaries does worse than θ_0's). That Hessian is applied times
multi_epoch.curvature_scale[E] (`scaled_curvature`), chosen on dev orders with the damping
(benchmarks/epoch_curvature_scale.py): it stands for every batch of its domain all along the run.
Adam's preconditioner is frozen at the E-epoch run's mid-point. The replay is damped with λ = multi_epoch.damping[E]
(fut/subspace.py): without it, the replay's deviation keeps growing after the first epoch while training's stays
bounded (training forgets an order's early differences; benchmarks/epoch_deviation.py), and λ was chosen on dev
orders (benchmarks/epoch_curvature.py). The trajectory and the gradients are made in memory (E·T steps take seconds);
the stored file, <dir>/epochs_<E>.safetensors, holds the replay's matrices with its provenance (the pair checkpoints
included) and the reference's final eval loss, and is rebuilt when either differs.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial
from pathlib import Path

import torch

from . import hessian_jobs
from .cache import BASIS_FLOATS, UpdateCache, batch_group, curvature_batches
from .device import autocast
from .schedules import as_units, epoch_order_set
from .storage import ArtefactMismatch, load_tensors, read_metadata, save_tensors
from .subspace import GALERKIN_RTOL, Subspace, SubspaceSources, build_subspace
from .training import run_window, window_lrs

log = logging.getLogger(__name__)

OWN_DIRECTIONS = "pair at 0, own and after-step gradient at each visit"
CURVATURE = f"galerkin: each group's curvature batch Hessian at θ_0 on the whole basis, rtol {GALERKIN_RTOL:g}"


def epoch_path(out_dir: Path, epochs: int) -> Path:
    return Path(out_dir) / f"epochs_{epochs}.safetensors"


def epoch_checkpoints(steps: int, epochs: int) -> list[int]:
    """The pair checkpoints: every epoch boundary of the E-epoch run, its start and end included. Chosen on dev
    orders (benchmarks/epoch_curvature.py) against the start and the end only."""
    return [steps * e for e in range(epochs + 1)]


def scaled_curvature(src: SubspaceSources, scale: float) -> SubspaceSources:
    """The sources with each Galerkin Hessian (`hessian_grams`) times `scale`: how strongly the replay applies the
    curvature batch's Hessian at θ_0 (multi_epoch.curvature_scale, chosen on dev orders by
    benchmarks/epoch_curvature_scale.py)."""
    return dataclasses.replace(src, hessian_grams=[scale * m for m in src.hessian_grams])


def reference_order(steps: int, epochs: int) -> list[int]:
    """The E-epoch reference: the window's batches in their order, E times."""
    return list(range(steps)) * epochs


class EpochReference:
    """The E-epoch reference run of `store`'s window, and its fut-subspace (built once, then read back)."""

    def __init__(self, store: UpdateCache, epochs: int, out_dir: Path):
        self.store, self.run, self.params, self.E = store, store.run, store.params, epochs
        self.T = self.run.T
        self.steps = self.T * epochs
        self.path = epoch_path(out_dir, epochs)
        # An E that multi_epoch.epochs lacks has no damping and no file: load() says which stage builds it.
        self.damping = self.params.multi_epoch.damping.get(str(epochs), 0.0)
        self.curvature_scale = self.params.multi_epoch.curvature_scale.get(str(epochs), 1.0)
        self.curvature_batch = self.params.multi_epoch.curvature_batch.get(str(epochs),
                                                                           self.params.cache.curvature_batch)
        # the sources' layout, the curvature's batch and scale and the damping are part of the file's provenance: a
        # file of others is rebuilt
        self.meta = {**store.provenance, "kind": "epochs", "epochs": epochs, "own_directions": OWN_DIRECTIONS,
                     "curvature": CURVATURE, "curvature_batch": self.curvature_batch,
                     "curvature_scale": self.curvature_scale,
                     "pair_checkpoints": epoch_checkpoints(self.T, epochs), "damping": self.damping}

    def load(self) -> tuple[Subspace, float]:
        """The stored subspace and the E-epoch reference's final eval loss (for estimates: nothing is built)."""
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found: no {self.E}-epoch cache; run the multi_epoch stage with "
                                    f"{self.E} in multi_epoch.epochs (dvc repro multi_epoch)")
        tensors, meta = load_tensors(self.path, self.meta)
        return Subspace.from_tensors(tensors, meta["subspace"]), meta["record"]["eval_loss"]

    def load_or_build(self) -> tuple[Subspace, dict]:
        """The subspace and the run's record (final eval loss, build seconds)."""
        if self.path.is_file():
            try:
                tensors, meta = load_tensors(self.path, self.meta)
                return Subspace.from_tensors(tensors, meta["subspace"]), meta["record"]
            except ArtefactMismatch as err:
                log.warning("%s will be rebuilt: %s", self.path.name, err)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sub, record = self._build()
        save_tensors(self.path, sub.tensors(), {**self.meta, "subspace": sub.metadata(), "record": record})
        return sub, record

    def trajectory(self) -> tuple[list[torch.Tensor], list[torch.Tensor], float, float]:
        """The E-epoch reference run: θ_t for t = 0..E·T and Adam's preconditioner after each step (flat, on the
        CPU), the final eval loss (as the batch-level naive estimate reads it) and the seconds it took."""
        run, hp, layout = self.run, self.run.hp, self.run.layout
        t0 = time.perf_counter()
        thetas, preconds = [run.theta(0).cpu()], []

        def on_step(t: int, trainer, loss: float) -> None:
            st = trainer.state()
            thetas.append(layout.flatten(st.theta))
            v_hat = layout.flatten(st.v) / (1 - hp.beta2 ** st.adam_step)
            preconds.append(1 / (v_hat.sqrt() + hp.eps))

        log.info("%d-epoch reference run (%d steps)", self.E, self.steps)
        run_window(self.params, run.prepared, run.start, reference_order(self.T, self.E), on_step=on_step)
        final_loss = run.loss_on(thetas[self.steps], run.prepared.eval_mixed)
        return thetas, preconds, final_loss, time.perf_counter() - t0

    def sources(self, thetas: list[torch.Tensor], preconds: list[torch.Tensor],
                pair_checkpoints: list[int], galerkin: bool = True) -> SubspaceSources:
        """fut-subspace's sources over the E-epoch run: pairs at `pair_checkpoints`, every step's own and
        after-step gradient, the batch-level cache's eigenspaces at checkpoint 0, and each batch's Hessian at θ_0
        along its own preconditioned gradients, H_j P̄ g for g its pair at 0 and its own and after-step gradients at
        each of its E visits (1 + 2E directions, `own_directions`): a batch is trained again after the order trained
        it, and the domain eigenspace misses how its loss falls after a step on it. Chosen on dev orders
        (benchmarks/epoch_curvature.py, undamped, quadratic readout): against the pair direction alone, the E = 2
        random orders' R² went from 0.55 to 0.73 and the domain blocks' from 0.40 to 0.82 (with pairs at every
        epoch boundary; from 0.57 to 0.71 and 0.30 to 0.78 with pairs at 0 and E·T only). With `galerkin`, each
        eigenspace's curvature batch Hessian at θ_0 seen from the whole basis (`hessian_grams`, fut/subspace.py),
        which the replay applies in place of the eigenspace. The basis is held in memory.
        """
        run, p, T, S = self.run, self.params, self.T, self.steps
        prepared = run.prepared
        window = prepared.window.to(run.device)

        def grad(t: int, j: int) -> torch.Tensor:
            with autocast(p.train, run.device):
                return run.loss.grad(thetas[t].to(run.device), window[j]).cpu().float()

        pairs = [torch.stack([grad(c, j) for j in range(T)]) for c in pair_checkpoints]
        own = torch.stack([grad(t, t % T) for t in range(S)])
        after = torch.stack([grad(t + 1, t % T) for t in range(S)])
        with autocast(p.train, run.device):
            eval_grad = run.loss.grad(thetas[S].to(run.device), prepared.eval_mixed.to(run.device)).cpu().float()
        keys = [(c, g) for c, g in self.store.eigen_keys() if c == 0]     # cache.curvature_checkpoints holds 0
        eigen = [self.store.eigen(c, g) for c, g in keys]
        mid = preconds[S // 2]
        stack = torch.cat(pairs + [own, after])
        own0 = len(pair_checkpoints) * T
        directions = [[pair_checkpoints.index(0) * T + j] + [own0 + t for t in range(j, S, T)]
                      + [own0 + S + t for t in range(j, S, T)] for j in range(T)]
        with autocast(p.train, run.device):
            curv = torch.cat([run.loss.hvp(thetas[0].to(run.device), window[j],
                                           (mid * stack[rows]).to(run.device)).cpu().float()
                              for j, rows in enumerate(directions)])
        basis = torch.cat([stack] + [vecs for _, vecs in eigen] + [curv])
        hessian_grams = None
        if galerkin:
            batches = curvature_batches(prepared, self.curvature_batch, p.cache.curvature)
            hessian_grams = hessian_jobs.hessian_grams(run, thetas[0], [batches[g] for _, g in keys], basis, mid)
        drift = max(float((q / mid - 1).abs().median()) for q in preconds)
        return SubspaceSources(
            pair_checkpoints=list(pair_checkpoints), eigen_keys=keys, eigen_values=[v for v, _ in eigen],
            groups=[batch_group(prepared, j) for j in range(T)], rows=lambda cols: basis[:, cols],
            dim=run.layout.dim, chunk=max(1, BASIS_FLOATS // len(basis)), theta=lambda t: thetas[t], precond=mid,
            precond_drift=drift, eval_grad=eval_grad, lrs=window_lrs(p, self.E),
            adam_steps=[run.start.adam_step + t + 1 for t in range(S)], hp=run.hp,
            visits=[(t % T, t) for t in range(S)], reference=[[t % T] for t in range(S)],
            own_directions=directions, hessian_grams=hessian_grams)

    def probe_orders(self) -> torch.Tensor:
        c = self.params.cache
        probes = epoch_order_set(self.T, self.E, self.run.prepared.window_domains, [0.0] * self.T,
                                 {"random_reshuffled": c.probes - c.probes // 4, "domains": c.probes // 4}, c.seed)
        return as_units(list(probes.values()))

    def _build(self) -> tuple[Subspace, dict]:
        thetas, preconds, final_loss, train_seconds = self.trajectory()
        t1 = time.perf_counter()
        src = scaled_curvature(self.sources(thetas, preconds, self.meta["pair_checkpoints"]), self.curvature_scale)
        grad_seconds = time.perf_counter() - t1
        c = self.params.cache
        sub = build_subspace(src, partial(self.run.eval_losses_at, thetas[self.steps]), final_loss, c.probes, c.seed,
                             progress=log.info, probe_sigma=self.probe_orders(), damping=self.damping)
        record = {"eval_loss": final_loss, "train_seconds": train_seconds, "grad_seconds": grad_seconds,
                  "subspace_seconds": time.perf_counter() - t1 - grad_seconds,
                  "gradients": self.T * len(src.pair_checkpoints) + 2 * self.steps + 1,
                  "hvps": sum(map(len, src.own_directions))
                  + (0 if src.hessian_grams is None else sum(len(m) for m in src.hessian_grams))}
        return sub, record

    def bytes(self) -> int:
        return self.path.stat().st_size

    def record(self) -> dict:
        return read_metadata(self.path)["record"]
