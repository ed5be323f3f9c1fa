"""Stage 2: the update cache, one safetensors shard per reference checkpoint t = 0..T.

Shard t holds, for every window batch j:
  grad        [T, d]  g(θ_t, B_j), full space (`cache.dtype`): what `fut-state` replays and the paper's
                      finite-difference terms (secant Jacobian diagonals between consecutive checkpoints,
                      FUT++'s second differences) are derived from, so they are not stored twice;
  proj_gamma  [T, k]  P Γ(θ_t, B_j; m_t, v_t), the paper's update term with the reference Adam state;
  eval_grad   [d]     ∇L_E(θ_t) on the mixed eval set, and proj_eval_grad [k] its projection;
  eig_values.<group> [r], eig_vectors.<group> [r, d]  top eigenpairs (largest |λ|) of the Hessian at θ_t of
                      one curvature batch per group, at every `cache.curvature_stride`-th checkpoint. Groups
                      (`cache.curvature`): `domain<i>`, a batch drawn from the window batches of domain i, and
                      `window`, a batch mixed from the whole window. The curvature of a batch depends on its
                      text: a Shakespeare batch's Hessian is not a Linux-docs batch's, and the replay of batch j
                      uses the eigenspace of j's domain.
Shards are written atomically with the cache's provenance (prepared data, tokenizer, reference run and its
stored trajectory, cache params, projector, dtype, versions) and every tensor's sha256; a rerun skips shards
that are complete, verified and match (continuing Lanczos from the stored eigenvectors, as the uninterrupted
build did), so an interrupted build resumes and ends with the same tensors. The reader refuses a shard that
differs, naming what differs, or whose tensors do not match their shapes or checksums.
"""
from __future__ import annotations

import logging
import math
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
from .model import build_model, count_parameters
from .projection import Projector, make_projector, projector_metadata
from .reference import load_checkpoint, reference_hash, trajectory_digest
from .storage import (ArtefactMismatch, CorruptArtefact, check_layout, check_metadata, load_tensors, read_header,
                      read_metadata, remove_temporaries, require_free_space, save_tensors, verify_tensor, versions)
from .training import NonFiniteError, first_non_finite

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE = "cpu"   # the cache is computed on the CPU (the model is never moved)


def cache_provenance(params: Params, prepared: Prepared, ref_dir: Path, dim: int) -> dict:
    """What every shard depends on, key by key, so a refused shard is refused naming what differs."""
    c = params.cache
    return {"prepare_hash": prepared.prepare_hash, "tokenizer_sha256": prepared.tokenizer_sha256,
            "reference_hash": reference_hash(params, prepared),
            "trajectory_sha256": trajectory_digest(ref_dir, params.window.steps),
            "cache_params": params.section_hash("cache"),
            "projector": projector_metadata(c.projection, dim, c.k, c.seed), "dtype": c.dtype}


def shard_path(cache_dir: Path, t: int) -> Path:
    return Path(cache_dir) / f"shard_{t:04d}.safetensors"


def _spread(prepared: Prepared, batches: list[int], size: int) -> torch.Tensor:
    """`size` sequences, one from each of `size` of `batches` spread evenly (cycling when there are fewer)."""
    b = prepared.window.shape[1]
    return torch.stack([prepared.window[batches[(i * len(batches)) // size if size <= len(batches)
                                                 else i % len(batches)], i % b] for i in range(size)])


def batch_group(prepared: Prepared, j: int) -> str:
    """The `domain` curvature group of window batch j (batches mixed across domains form one group)."""
    return f"domain{prepared.window_domains[j]}" if prepared.window_domains[j] >= 0 else "domain-mixed"


def curvature_batches(prepared: Prepared, size: int, kinds: list[str]) -> dict[str, torch.Tensor]:
    """The curvature batch of every group of the given kinds (see the module docstring)."""
    T = prepared.window.shape[0]
    out = {}
    if "domain" in kinds:
        for j in range(T):
            out.setdefault(batch_group(prepared, j), [])
        for g in out:
            out[g] = _spread(prepared, [j for j in range(T) if batch_group(prepared, j) == g], size)
    if "window" in kinds:
        out["window"] = _spread(prepared, list(range(T)), size)
    return out


def has_curvature(t: int, params: Params) -> bool:
    return t % params.cache.curvature_stride == 0 and t < params.window.steps


def shard_shapes(params: Params, prepared: Prepared, dim: int, t: int) -> dict[str, list[int]]:
    """The tensors of shard t and their shapes."""
    c, T = params.cache, params.window.steps
    shapes = {"grad": [T, dim], "proj_gamma": [T, c.k], "eval_grad": [dim], "proj_eval_grad": [c.k]}
    if has_curvature(t, params):
        for group in curvature_batches(prepared, c.curvature_batch, c.curvature):
            shapes.update({f"eig_values.{group}": [c.curvature_rank], f"eig_vectors.{group}": [c.curvature_rank, dim]})
    return shapes


def check_shard(path: Path, t: int, provenance: dict, shapes: dict[str, list[int]]) -> dict[str, dict]:
    """Refuse shard t unless it is this cache's (provenance), holds the tensors it must with their shapes, and
    its header matches the records written with it; returns those records (checksums are checked on read)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the cache is incomplete; run the cache stage (dvc repro cache)")
    meta, records, layout = read_header(path)
    check_metadata(path, meta, {**provenance, "t": t})
    check_layout(path, records, layout)
    for name in sorted(set(shapes) | set(layout)):
        have = layout[name]["shape"] if name in layout else "missing"
        if have != shapes.get(name, "absent"):
            raise CorruptArtefact(f"{path}: tensor {name!r} is {have} but this cache needs "
                                  f"{shapes.get(name, 'no such tensor')}; rebuild it (dvc repro cache)")
    return records


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
        self.meta = {**cache_provenance(params, prepared, ref_dir, self.layout.dim), "versions": versions()}
        log.info("cache on %s, projection %s", DEVICE, self.projector.metadata())

    def is_complete(self, t: int) -> bool:
        """Shard t is this cache's, complete, and every tensor matches its checksum (read in full)."""
        path = shard_path(self.cache_dir, t)
        if not path.is_file():
            return False
        try:
            check_shard(path, t, self.meta, shard_shapes(self.params, self.prepared, self.layout.dim, t))
            load_tensors(path)
        except ArtefactMismatch as err:   # foreign, altered or corrupted (CorruptArtefact): rebuild the shard
            log.warning("cache shard %d will be rebuilt: %s", t, err)
            return False
        return True

    def stored_top(self, t: int) -> dict[str, torch.Tensor]:
        """The top eigenvector of every group in the complete shard t."""
        with safe_open(str(shard_path(self.cache_dir, t)), framework="pt") as fh:
            return {name.removeprefix("eig_vectors."): fh.get_tensor(name)[0]
                    for name in fh.keys() if name.startswith("eig_vectors.")}

    def build_shard(self, t: int, eig_start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
        top = {}
        if has_curvature(t, self.params):
            c = self.params.cache
            for group, batch in curvature_batches(self.prepared, c.curvature_batch, c.curvature).items():
                vals, vecs = lanczos_top_eigen(lambda x: self.loss.hvp(theta, batch, x[None])[0], self.layout.dim,
                                               c.curvature_rank, c.curvature_iterations, seed=c.seed + t,
                                               start=eig_start.get(group))
                tensors.update({f"eig_values.{group}": vals, f"eig_vectors.{group}": vecs})
                top[group] = vecs[0]
        t3 = time.perf_counter()
        bad = first_non_finite(tensors)
        if bad is not None:
            raise NonFiniteError(f"cache shard {t} (reference checkpoint {t}): tensor {bad!r} holds NaN or inf "
                                 f"(cache.dtype = {self.params.cache.dtype!r}); the build stopped before writing it")
        seconds = {"grad_seconds": t_pairs - t0, "eval_grad_seconds": t1 - t_pairs, "projection_seconds": t2 - t1,
                   "curvature_seconds": t3 - t2}
        save_tensors(shard_path(self.cache_dir, t), tensors,
                     {**self.meta, "t": t, "adam_step": state.adam_step, "device": DEVICE, "build": seconds})
        return top

    def shard_bytes(self, t: int) -> int:
        """Size of shard t's tensors (its header adds a few kB)."""
        return sum(math.prod(shape) * (DTYPES[self.params.cache.dtype].itemsize if name == "grad" else 4)
                   for name, shape in shard_shapes(self.params, self.prepared, self.layout.dim, t).items())

    def build(self, progress: bool = True) -> dict:
        """Build the missing shards; returns how many were built and reused, the device and the projector."""
        T = self.params.window.steps
        remove_temporaries(self.cache_dir)
        done = [t for t in range(T + 1) if self.is_complete(t)]
        todo = [t for t in range(T + 1) if t not in done]
        require_free_space(self.cache_dir, sum(self.shard_bytes(t) for t in todo),
                           f"the cache ({len(todo)} shards to build)")
        eig_start: dict[str, torch.Tensor] = {}
        for t in tqdm(range(T + 1), desc="cache", disable=not progress):
            if t in done:
                if has_curvature(t, self.params):
                    eig_start = self.stored_top(t)
                continue
            # Lanczos starts from the previous checkpoint's top eigenvector: neighbouring Hessians are close.
            eig_start = self.build_shard(t, eig_start) or eig_start
        return {"shards_built": len(todo), "shards_reused": len(done), "device": DEVICE,
                "projector": self.projector.metadata()}


class UpdateCache:
    """Read access to a built cache, shard by shard (memory-mapped; only what is asked for is read)."""

    def __init__(self, params: Params, prepared: Prepared, ref_dir: Path, cache_dir: Path):
        self.params, self.cache_dir = params, Path(cache_dir)
        self.steps = params.window.steps
        dim = count_parameters(params.model, prepared.vocab_size, params.data.seq_len)
        provenance = cache_provenance(params, prepared, ref_dir, dim)
        self.records = [check_shard(shard_path(self.cache_dir, t), t, provenance,
                                    shard_shapes(params, prepared, dim, t)) for t in range(self.steps + 1)]
        self.verified: set[tuple[int, str]] = set()

    def tensor(self, t: int, name: str) -> torch.Tensor:
        """A stored tensor; the first read of each is checked against its sha256 (later reads of the same
        tensor in this process are not: hashing costs about as much as reading)."""
        path = shard_path(self.cache_dir, t)
        with safe_open(str(path), framework="pt") as fh:
            x = fh.get_tensor(name)
        if (t, name) not in self.verified:
            verify_tensor(path, name, x, self.records[t][name])
            self.verified.add((t, name))
        return x

    def grads(self, t: int) -> torch.Tensor:
        return self.tensor(t, "grad").float()

    def eigen(self, t: int, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The eigenspace of `group` in force at step t: the nearest checkpoint at or before t that has one."""
        s = t - t % self.params.cache.curvature_stride
        return self.tensor(s, f"eig_values.{group}"), self.tensor(s, f"eig_vectors.{group}")

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
