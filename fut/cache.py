"""Stage 2: the update cache, one safetensors shard per reference checkpoint t = 0..T.

Shard t holds, for every window batch j:
  grad        [T, d]  g(θ_t, B_j), full space (`cache.dtype`): what `fut-state` replays and the paper's
                      finite-difference terms (secant Jacobian diagonals between consecutive checkpoints,
                      FUT++'s second differences) are derived from, so they are not stored twice;
  proj_gamma  [T, k]  P Γ(θ_t, B_j; m_t, v_t), the paper's update term with the reference Adam state;
  eval_grad   [d]     ∇L_E(θ_t) on the mixed eval set, and proj_eval_grad [k] its projection;
  eig_values  [r], eig_vectors [r, d]  top eigenpairs (largest |λ|) of the Hessian of a mixed batch at θ_t,
                      at every `cache.curvature_stride`-th checkpoint.
Shards are written atomically with the cache's provenance (reference run, cache params, projector, dtype,
versions); a rerun skips shards that are complete and match, so an interrupted build resumes.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .adam import AdamHyper, clip_scale, update_term
from .config import Params
from .curvature import LossFunction, lanczos_top_eigen
from .data import Prepared
from .device import configure_threads
from .flat import ParamLayout
from .model import build_model
from .projection import Projector, make_projector
from .reference import load_checkpoint, reference_hash, trajectory_key
from .storage import check_metadata, read_metadata, save_tensors, versions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_hash(params: Params, prepared: Prepared, ref_dir: Path) -> str:
    return trajectory_key(params, prepared, ref_dir) + "/" + params.section_hash("cache")


def shard_path(cache_dir: Path, t: int) -> Path:
    return Path(cache_dir) / f"shard_{t:04d}.safetensors"


def curvature_batch(prepared: Prepared, size: int) -> torch.Tensor:
    """One sequence from each of `size` window batches spread evenly over the window (all domains)."""
    T, b = prepared.window.shape[:2]
    return torch.stack([prepared.window[(i * T) // size, i % b] for i in range(size)])


def has_curvature(t: int, params: Params) -> bool:
    return t % params.cache.curvature_stride == 0 and t < params.window.steps


class CacheBuilder:
    def __init__(self, params: Params, prepared: Prepared, ref_dir: Path, cache_dir: Path):
        configure_threads(params.train)
        self.params, self.prepared = params, prepared
        self.ref_dir, self.cache_dir = Path(ref_dir), Path(cache_dir)
        self.ref_hash = reference_hash(params, prepared)
        start = load_checkpoint(ref_dir, 0, self.ref_hash)
        self.layout = ParamLayout.of(start.theta)
        model = build_model(params.model, prepared.vocab_size, params.data.seq_len, prepared.eos_id)
        self.loss = LossFunction(model, self.layout)
        c = params.cache
        self.projector: Projector = make_projector(c.projection, self.layout.dim, c.k, c.seed)
        self.hp = AdamHyper.from_config(params.optimizer)
        self.meta = {"cache_hash": cache_hash(params, prepared, ref_dir), "projector": self.projector.metadata(),
                     "dtype": c.dtype, "dim": self.layout.dim, "versions": versions()}

    def is_complete(self, t: int) -> bool:
        path = shard_path(self.cache_dir, t)
        if not path.is_file():
            return False
        try:
            check_metadata(path, read_metadata(path), {**self.meta, "t": t})
        except Exception:   # a mismatch, or a header safetensors cannot parse: rebuild the shard
            return False
        return True

    def build_shard(self, t: int, eig_start: torch.Tensor | None) -> torch.Tensor | None:
        state = load_checkpoint(self.ref_dir, t, self.ref_hash)
        theta = self.layout.flatten(state.theta)
        m, v = self.layout.flatten(state.m), self.layout.flatten(state.v)
        t0 = time.perf_counter()
        grads = torch.stack([self.loss.grad(theta, batch) for batch in self.prepared.window])
        t_pairs = time.perf_counter()
        eval_grad = self.loss.grad(theta, self.prepared.eval_mixed)
        t1 = time.perf_counter()
        gammas = torch.stack([update_term(theta, g * clip_scale(g.norm(), self.hp.grad_clip), m, v,
                                          state.adam_step + 1, self.hp)[0] for g in grads])
        proj_gamma = self.projector.project(gammas)
        proj_eval = self.projector.project(eval_grad)
        t2 = time.perf_counter()
        tensors = {"grad": grads.to(DTYPES[self.params.cache.dtype]), "proj_gamma": proj_gamma,
                   "eval_grad": eval_grad, "proj_eval_grad": proj_eval}
        top = None
        if has_curvature(t, self.params):
            c = self.params.cache
            batch = curvature_batch(self.prepared, c.curvature_batch)
            vals, vecs = lanczos_top_eigen(lambda x: self.loss.hvp(theta, batch, x[None])[0], self.layout.dim,
                                           c.curvature_rank, c.curvature_iterations, seed=c.seed + t,
                                           start=eig_start)
            tensors.update(eig_values=vals, eig_vectors=vecs)
            top = vecs[0]
        t3 = time.perf_counter()
        seconds = {"grad_seconds": t_pairs - t0, "eval_grad_seconds": t1 - t_pairs, "projection_seconds": t2 - t1,
                   "curvature_seconds": t3 - t2}
        save_tensors(shard_path(self.cache_dir, t), tensors,
                     {**self.meta, "t": t, "adam_step": state.adam_step, "build": seconds})
        return top

    def build(self, progress: bool = True) -> dict:
        """Build the missing shards; returns how many were built and reused."""
        T = self.params.window.steps
        done = [t for t in range(T + 1) if self.is_complete(t)]
        eig_start = None
        for t in tqdm(range(T + 1), desc="cache", disable=not progress):
            if t in done:
                continue
            # Lanczos starts from the previous checkpoint's top eigenvector: neighbouring Hessians are close.
            eig_start = self.build_shard(t, eig_start)
        return {"shards_built": T + 1 - len(done), "shards_reused": len(done)}


class UpdateCache:
    """Read access to a built cache, shard by shard (memory-mapped; only what is asked for is read)."""

    def __init__(self, params: Params, prepared: Prepared, ref_dir: Path, cache_dir: Path):
        self.params, self.cache_dir = params, Path(cache_dir)
        self.hash = cache_hash(params, prepared, ref_dir)
        self.steps = params.window.steps
        expected = {"cache_hash": self.hash}
        for t in range(self.steps + 1):
            path = shard_path(self.cache_dir, t)
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the cache is incomplete; run the cache stage (dvc repro cache)")
            check_metadata(path, read_metadata(path), {**expected, "t": t})

    def tensor(self, t: int, name: str) -> torch.Tensor:
        with safe_open(str(shard_path(self.cache_dir, t)), framework="pt") as fh:
            return fh.get_tensor(name)

    def grads(self, t: int) -> torch.Tensor:
        return self.tensor(t, "grad").float()

    def eigen(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The eigenspace in force at step t: the nearest checkpoint at or before t that has one."""
        s = t - t % self.params.cache.curvature_stride
        return self.tensor(s, "eig_values"), self.tensor(s, "eig_vectors")

    def build_cost(self) -> dict[str, float]:
        """Total one-time cost, summed over the shards' own records (true across resumed builds)."""
        cost: dict[str, float] = {}
        for t in range(self.steps + 1):
            for key, sec in read_metadata(shard_path(self.cache_dir, t))["build"].items():
                cost[key] = cost.get(key, 0.0) + sec
        pairs = (self.steps + 1) * self.steps
        return {**cost, "seconds": sum(cost.values()), "pairs": pairs, "seconds_per_pair": cost["grad_seconds"] / pairs,
                "projection_overhead": cost["projection_seconds"] / cost["grad_seconds"]}

    def bytes(self) -> dict[str, int]:
        sizes = {"grad": 0, "projected": 0, "eval_grad": 0, "curvature": 0}
        for t in range(self.steps + 1):
            with safe_open(str(shard_path(self.cache_dir, t)), framework="pt") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    n = 1
                    for s in sl.get_shape():
                        n *= s
                    item = {"F32": 4, "BF16": 2, "F16": 2}[sl.get_dtype()]
                    key = {"grad": "grad", "proj_gamma": "projected", "proj_eval_grad": "projected",
                           "eval_grad": "eval_grad"}.get(name, "curvature")
                    sizes[key] += n * item
        sizes["total_file_bytes"] = sum(shard_path(self.cache_dir, t).stat().st_size for t in range(self.steps + 1))
        return sizes
