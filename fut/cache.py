"""Stage 2: the update cache, as work units that torch.distributed ranks share (fut/distributed.py).

Pairs unit t (t = 0..T), file shard_<t>.safetensors:
  own_grad    [d]     g(θ_t, B_t), the reference run's own gradient at step t (every t < T);
  after_grad  [d]     g(θ_t, B_{t−1}), the gradient of the batch the reference just stepped on (t ≥ 1, where the
                      shard holds no pairs; with pairs it is grad[t − 1]): where g(·, B_j) jumps, a knot of
                      fut-subspace's interpolation;
  eval_grad   [d]     ∇L_E(θ_t) on the mixed eval set, at every `cache.eval_grad_stride`-th checkpoint and at T;
and at every `cache.checkpoint_stride`-th checkpoint and at T, for every window batch j:
  grad        [T, d]  g(θ_t, B_j), full space (`cache.dtype`): what the replays read, and what the paper's
                      finite-difference terms (secants, second differences) and projected update terms
                      (fut/projected.py, its own stage) are derived from.
Curvature unit <group>, files curvature_<group>_<t>.safetensors at each of `cache.curvature_checkpoints`:
  eig_values [r], eig_vectors [r, d]  top eigenpairs (largest |λ|) of the Hessian at θ_t of the group's
                      curvature batch: `domain<i>`, a batch drawn from the window batches of domain i (the replay
                      of batch j uses the eigenspace of j's domain: curvature is a property of the text), and
                      `window`, a batch mixed from the whole window (an ablation). A group's checkpoints are one
                      unit because Lanczos at each starts from the previous one's top eigenvector.
Subspace unit, file subspace.safetensors, built after the others: fut-subspace's matrices (fut/subspace.py),
  from the pairs at every `cache.subspace_stride`-th checkpoint and at T, the own and after-step gradients, the
  domain eigenspaces and the reference trajectory; its quadratic readout is fitted to `cache.probes` probe
  orders' exact readouts.
Every unit's result is the same whichever rank builds it, so any number of ranks builds the same tensors.
Device and precision: each rank computes on `train.device` (its own GPU under torchrun on CUDA), gradients and
Hessian-vector products under the training's autocast (so a cached gradient is the training gradient); Adam
terms and Lanczos in float32; everything is stored from the CPU. Pairs are made one at a time, so
device memory does not grow with T. Files are written atomically with the cache's provenance and every tensor's
sha256; a rerun skips files that are complete, verified and match, so an interrupted build resumes and ends
with the same tensors. When every unit is done, rank 0 writes manifest.json, the mark of a complete cache. The
reader refuses a cache without it and a file that differs, naming what differs.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .adam import adam_moments
from .config import Params, load, to_yaml
from .curvature import lanczos_top_eigen
from .data import Prepared
from .device import autocast, describe_device, synchronize
from .distributed import Ranks, in_torchrun, launch, process_group, rank_device
from .model import count_parameters
from .reference import ReferenceRun, reference_hash, trajectory_digest
from .storage import (ArtefactMismatch, CorruptArtefact, atomic_write_json, check_layout, check_metadata,
                      load_tensors, read_header, read_json, read_metadata, remove_temporaries, require_free_space,
                      save_tensors, verify_tensor, versions)
from .subspace import Subspace, SubspaceSources, basis_layout, build_subspace
from .training import NonFiniteError, first_non_finite

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "manifest.json"
SUBSPACE = "subspace.safetensors"
# Cost of one Hessian-vector product in gradient evaluations of the same batch (double backward; measured
# 3-4 on this model). Only balances the ranks' shares; `plan` times both.
HVP_COST = 3.5
# Floats of the basis held at once while building fut-subspace's matrices or reading its parameters out.
BASIS_FLOATS = 1 << 28


# --- the cache's layout: which checkpoint holds what (one place for the builder, reader and plan) ----------

def _every(stride: int, T: int) -> list[int]:
    return sorted(set(range(0, T + 1, stride)) | {T})


def pair_checkpoints(params: Params, T: int) -> list[int]:
    """Checkpoints with g(θ_t, B_j) for every batch j: every `cache.checkpoint_stride`-th, and T."""
    return _every(params.cache.checkpoint_stride, T)


def eval_checkpoints(params: Params, T: int) -> list[int]:
    return _every(params.cache.eval_grad_stride, T)


def subspace_checkpoints(params: Params, T: int) -> list[int]:
    """The pair checkpoints fut-subspace interpolates between (every `cache.subspace_stride`-th; 0 and T)."""
    return _every(params.cache.subspace_stride or T, T)


def curvature_steps(params: Params, T: int) -> list[int]:
    """The checkpoints that carry eigenspaces (those of `cache.curvature_checkpoints` inside the window)."""
    return sorted(c for c in params.cache.curvature_checkpoints if c < T)


def curvature_step_at(params: Params, T: int, t: int) -> int:
    """The eigenspace in force at step t: the nearest curvature checkpoint at or before t."""
    return max(c for c in curvature_steps(params, T) if c <= t)


# The layout and meaning of the files: bumped when what a file holds changes (2: the subspace file's knot
# disagreement), so a cache written by older code is refused instead of misread.
FORMAT = 2


def cache_provenance(params: Params, prepared: Prepared, ref_dir: Path, dim: int) -> dict:
    """What every file depends on, key by key, so a refused file is refused naming what differs."""
    c = params.cache
    return {"format": FORMAT, "prepare_hash": prepared.prepare_hash, "tokenizer_sha256": prepared.tokenizer_sha256,
            "reference_hash": reference_hash(params, prepared),
            "trajectory_sha256": trajectory_digest(ref_dir, params.window.steps),
            "cache_params": params.section_hash("cache"), "dim": dim, "dtype": c.dtype}


def shard_path(cache_dir: Path, t: int) -> Path:
    return Path(cache_dir) / f"shard_{t:04d}.safetensors"


def curvature_path(cache_dir: Path, group: str, t: int) -> Path:
    return Path(cache_dir) / f"curvature_{group}_{t:04d}.safetensors"


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


@dataclass(frozen=True)
class Unit:
    """One piece of the build: the pairs of checkpoint t (`key` = t), one group's eigenspaces (`key` = group),
    or fut-subspace's matrices (built last, from the others)."""
    kind: str
    key: int | str

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.key}"


def work_units(params: Params, T: int, groups: list[str]) -> list[Unit]:
    return ([Unit("pairs", t) for t in range(T + 1)] + [Unit("curvature", g) for g in groups]
            + ([Unit("subspace", "fut-subspace")] if "domain" in params.cache.curvature else []))


def subspace_shapes(params: Params, T: int, groups: list[str]) -> dict[str, list[int]]:
    """The tensors of subspace.safetensors (fut/subspace.py Subspace.tensors) and their shapes, all 8-byte."""
    g = len([x for x in groups if x.startswith("domain")])
    blocks, r = g * len(curvature_steps(params, T)), params.cache.curvature_rank
    n = basis_layout(T, len(subspace_checkpoints(params, T)), [r] * blocks)["size"]
    shapes = {"gram": [n, n], "forcing": [T, T, n], "lin": [n], "a": [T], "b": [T], "step_block": [T, g],
              "batch_group": [T], "eig_offsets": [blocks], "readout_coef": [g + 1]}
    return {**shapes, **{f"eig_values.{i}": [r] for i in range(blocks)}}


def file_shapes(params: Params, T: int, dim: int, kind: str, t: int, groups: list[str] = ()) -> dict[str, list[int]]:
    """The tensors of pairs shard t, of a curvature file at checkpoint t or of the subspace file (which needs the
    curvature `groups`), and their shapes."""
    c = params.cache
    if kind == "subspace":
        return subspace_shapes(params, T, list(groups))
    if kind == "curvature":
        return {"eig_values": [c.curvature_rank], "eig_vectors": [c.curvature_rank, dim]}
    pairs = t in pair_checkpoints(params, T)
    shapes = {"own_grad": [dim]} if t < T else {}
    if t >= 1 and not pairs:
        shapes["after_grad"] = [dim]
    if t in eval_checkpoints(params, T):
        shapes["eval_grad"] = [dim]
    if pairs:
        shapes["grad"] = [T, dim]
    return shapes


def unit_files(params: Params, T: int, cache_dir: Path, unit: Unit) -> list[Path]:
    if unit.kind == "pairs":
        return [shard_path(cache_dir, unit.key)]
    if unit.kind == "subspace":
        return [Path(cache_dir) / SUBSPACE]
    return [curvature_path(cache_dir, unit.key, t) for t in curvature_steps(params, T)]


def gradient_counts(params: Params, T: int, eval_batches: float) -> dict[str, float]:
    """Gradient evaluations of the pairs units, in window-batch equivalents (an eval gradient covers every eval
    sequence), by kind: what the plan and the per-method costs count."""
    pairs = pair_checkpoints(params, T)
    return {"pair_gradients": len(pairs) * T, "own_gradients": sum(1 for t in range(T) if t not in pairs),
            "after_gradients": sum(1 for t in range(1, T + 1) if t not in pairs),
            "eval_gradients": len(eval_checkpoints(params, T)) * eval_batches}


def unit_cost(params: Params, T: int, prepared: Prepared, unit: Unit) -> float:
    """A unit's work in gradient evaluations of one window batch (balances the ranks' shares)."""
    c, b = params.cache, prepared.window.shape[1]
    if unit.kind == "pairs":
        t = unit.key
        shapes = file_shapes(params, T, 1, "pairs", t)
        return (T if "grad" in shapes else 0) + ("own_grad" in shapes and "grad" not in shapes) \
            + ("after_grad" in shapes) + ("eval_grad" in shapes) * prepared.eval_mixed.shape[0] / b
    if unit.kind == "subspace":
        return c.probes * prepared.eval_mixed.shape[0] / b / 3       # probe readouts: forward passes
    return len(curvature_steps(params, T)) * c.curvature_iterations * HVP_COST * c.curvature_batch / b


def file_bytes(params: Params, T: int, dim: int, kind: str, t: int, groups: list[str] = ()) -> int:
    """Size of one file's tensors (its header adds a few kB)."""
    size = lambda name: 8 if kind == "subspace" else (DTYPES[params.cache.dtype].itemsize if name == "grad" else 4)
    return sum(math.prod(shape) * size(name) for name, shape in file_shapes(params, T, dim, kind, t, groups).items())


def file_checkpoint(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1]) if path.name != SUBSPACE else -1


def cache_files(params: Params, T: int, dim: int, groups: list[str], cache_dir: Path) -> list[tuple[Path, int]]:
    """Every file of the complete cache and its tensors' size in bytes."""
    return [(path, file_bytes(params, T, dim, u.kind, file_checkpoint(path), groups))
            for u in work_units(params, T, groups) for path in unit_files(params, T, cache_dir, u)]


def check_file(path: Path, expected: dict, shapes: dict[str, list[int]]) -> dict[str, dict]:
    """Refuse a cache file unless it is this cache's (provenance), holds the tensors it must with their shapes,
    and its header matches the records written with it; returns those records (checksums are checked on read)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the cache is incomplete; run the cache stage (dvc repro cache)")
    meta, records, layout = read_header(path)
    check_metadata(path, meta, expected)
    check_layout(path, records, layout)
    for name in sorted(set(shapes) | set(layout)):
        have = layout[name]["shape"] if name in layout else "missing"
        if have != shapes.get(name, "absent"):
            raise CorruptArtefact(f"{path}: tensor {name!r} is {have} but this cache needs "
                                  f"{shapes.get(name, 'no such tensor')}; rebuild it (dvc repro cache)")
    return records


# --- the builder -------------------------------------------------------------------------------------------

class CacheBuilder:
    def __init__(self, run: ReferenceRun, cache_dir: Path):
        self.run, self.params, self.prepared = run, run.params, run.prepared
        self.cache_dir, self.T = Path(cache_dir), run.T
        self.device = rank_device(run.device)
        if self.device != run.device:          # this rank's own GPU
            run = ReferenceRun(run.params, run.data_dir, run.ref_dir, self.device)
            self.run = run
        self.layout, self.loss = run.layout, run.loss
        c = self.params.cache
        self.provenance = cache_provenance(self.params, self.prepared, run.ref_dir, self.layout.dim)
        self.meta = {**self.provenance, "versions": versions()}
        self.curvature = {g: b.to(self.device) for g, b in curvature_batches(self.prepared, c.curvature_batch,
                                                                              c.curvature).items()}
        self.window, self.eval_seqs = self.prepared.window.to(self.device), self.prepared.eval_mixed.to(self.device)
        self.units = work_units(self.params, self.T, list(self.curvature))

    def _expected(self, path: Path) -> tuple[dict, dict[str, list[int]]]:
        kind = "subspace" if path.name == SUBSPACE else ("pairs" if path.name.startswith("shard_") else "curvature")
        t = file_checkpoint(path)
        return {**self.meta, "t": t}, file_shapes(self.params, self.T, self.layout.dim, kind, t, list(self.curvature))

    def is_complete(self, path: Path) -> bool:
        """The file is this cache's, complete, and every tensor matches its checksum (read in full)."""
        if not path.is_file():
            return False
        try:
            check_file(path, *self._expected(path))
            load_tensors(path)
        except ArtefactMismatch as err:   # foreign, altered or corrupted (CorruptArtefact): rebuild the file
            log.warning("cache file %s will be rebuilt: %s", path.name, err)
            return False
        return True

    def _grad(self, theta: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        with autocast(self.params.train, self.device):
            return self.loss.grad(theta, batch)

    def build_pairs(self, t: int) -> None:
        """Shard t. One pair at a time on the device (its memory stays a few [d] vectors at any T); the stored
        rows gather on the CPU in `cache.dtype`."""
        theta, _, _, adam_step = self.run.flat(t)
        T, window = self.T, self.window
        shapes = file_shapes(self.params, T, self.layout.dim, "pairs", t)
        seconds = {"grad_seconds": 0.0, "eval_grad_seconds": 0.0}

        def timed(key: str, fn):
            start = time.perf_counter()
            out = fn()
            synchronize(self.device)
            seconds[key] += time.perf_counter() - start
            return out

        tensors, gradients = {}, 0
        if "grad" in shapes:
            grads = tensors["grad"] = torch.empty(T, self.layout.dim, dtype=DTYPES[self.params.cache.dtype])
            for j, batch in enumerate(window):
                g = timed("grad_seconds", lambda: self._grad(theta, batch))
                grads[j] = g.to(grads.dtype)
                if j == t:
                    tensors["own_grad"] = g.cpu()
            gradients += T
        else:
            if "own_grad" in shapes:
                tensors["own_grad"] = timed("grad_seconds", lambda: self._grad(theta, window[t]).cpu())
                gradients += 1
            if "after_grad" in shapes:
                tensors["after_grad"] = timed("grad_seconds", lambda: self._grad(theta, window[t - 1]).cpu())
                gradients += 1
        if "eval_grad" in shapes:
            tensors["eval_grad"] = timed("eval_grad_seconds", lambda: self._grad(theta, self.eval_seqs).cpu())
        self._save(shard_path(self.cache_dir, t), tensors, t,
                   {"adam_step": adam_step, "build": seconds, "gradients": gradients})

    def build_curvature(self, group: str, t: int, start: torch.Tensor | None) -> torch.Tensor:
        """The eigenspace of `group` at checkpoint t, Lanczos seeded with `start`; returns its top vector."""
        c = self.params.cache
        theta = self.run.theta(t)
        batch = self.curvature[group]

        def hvp(x: torch.Tensor) -> torch.Tensor:
            with autocast(self.params.train, self.device):
                return self.loss.hvp(theta, batch, x[None])[0]

        t0 = time.perf_counter()
        vals, vecs = lanczos_top_eigen(hvp, self.layout.dim, c.curvature_rank, c.curvature_iterations,
                                       seed=c.seed + t, start=start, device=self.device)
        self._save(curvature_path(self.cache_dir, group, t), {"eig_values": vals, "eig_vectors": vecs}, t,
                   {"group": group, "build": {"curvature_seconds": time.perf_counter() - t0}})
        return vecs[0]

    def build_subspace(self) -> None:
        """fut-subspace's matrices, from the finished pairs and curvature files (read back through the reader,
        checksums verified), and its quadratic readout fitted to the probe orders' exact readouts."""
        t0 = time.perf_counter()
        store = UpdateCache(self.run, self.cache_dir, require_manifest=False)
        theta_T = self.run.theta(self.T)
        sub = build_subspace(store.subspace_sources(), partial(self.run.eval_losses_at, theta_T),
                             self.run.loss_on(theta_T, self.eval_seqs),
                             self.params.cache.probes, self.params.cache.seed, progress=log.info)
        self._save(Path(self.cache_dir) / SUBSPACE, sub.tensors(), -1,
                   {"subspace": sub.metadata(), "build": {"subspace_seconds": time.perf_counter() - t0}})

    def _save(self, path: Path, tensors: dict[str, torch.Tensor], t: int, extra: dict) -> None:
        bad = first_non_finite(tensors)
        if bad is not None:
            where = f"reference checkpoint {t}" if t >= 0 else "built from the other files"
            raise NonFiniteError(f"cache file {path.name} ({where}): tensor {bad!r} holds NaN or inf "
                                 f"(cache.dtype = {self.params.cache.dtype!r}); the build stopped before writing it")
        save_tensors(path, tensors, {**self.meta, "t": t, "device": describe_device(self.device), **extra})

    def run_unit(self, unit: Unit) -> tuple[int, int]:
        """Build the unit's missing files; returns (files built, files reused)."""
        if unit.kind in ("pairs", "subspace"):
            path = unit_files(self.params, self.T, self.cache_dir, unit)[0]
            if self.is_complete(path):
                return 0, 1
            self.build_pairs(unit.key) if unit.kind == "pairs" else self.build_subspace()
            return 1, 0
        built = reused = 0
        start = None
        for t in curvature_steps(self.params, self.T):
            path = curvature_path(self.cache_dir, unit.key, t)
            if self.is_complete(path):
                with safe_open(str(path), framework="pt") as fh:
                    start = fh.get_tensor("eig_vectors")[0]
                reused += 1
            else:
                start = self.build_curvature(unit.key, t, start)
                built += 1
        return built, reused

    def build(self, ranks: Ranks = Ranks(), progress: bool = True) -> dict:
        """This rank's share of the missing files (the subspace, which reads the others, on rank 0 after them);
        on rank 0, then, the manifest. Every rank returns the counts of files built and reused over all ranks,
        the device and the number of ranks."""
        if ranks.is_main:
            remove_temporaries(self.cache_dir)
            (self.cache_dir / MANIFEST).unlink(missing_ok=True)
            missing = sum(n for path, n in cache_files(self.params, self.T, self.layout.dim, list(self.curvature),
                                                       self.cache_dir) if not path.exists())
            require_free_space(self.cache_dir, missing, "the cache's missing files")
        ranks.barrier()
        first = [u for u in self.units if u.kind != "subspace"]
        mine = ranks.mine(first, [unit_cost(self.params, self.T, self.prepared, u) for u in first])
        counts = [0, 0]
        desc = "cache" if ranks.world == 1 else f"cache rank {ranks.rank}/{ranks.world}"
        for unit in tqdm(mine, desc=desc, position=ranks.rank, disable=not progress):
            counts = [a + b for a, b in zip(counts, self.run_unit(unit))]
        ranks.barrier()
        if ranks.is_main:
            for unit in (u for u in self.units if u.kind == "subspace"):
                counts = [a + b for a, b in zip(counts, self.run_unit(unit))]
        counts = [sum(c) for c in zip(*ranks.gather(counts))]   # also waits for rank 0's subspace
        built = {"files_built": counts[0], "files_reused": counts[1], "device": describe_device(self.device),
                 "workers": ranks.world}
        if ranks.is_main:
            files = sorted(p.name for u in self.units for p in unit_files(self.params, self.T, self.cache_dir, u))
            atomic_write_json(self.cache_dir / MANIFEST, {**self.provenance, "files": files, "build": built})
        ranks.barrier()
        return built


def build_cache(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, progress: bool = True) -> dict:
    """Build (or resume) the cache with `parallel.workers` ranks: this process's share as a torchrun rank, the
    whole of it in this process with one worker, else by launching torchrun (`python -m fut cache`)."""
    if params.parallel.workers > 1 and not in_torchrun():
        launch("fut.cache", ["--data", str(data_dir), "--reference", str(ref_dir), "--cache", str(cache_dir)],
               params.parallel.workers, "the cache build", to_yaml(params))
        return read_json(Path(cache_dir) / MANIFEST)["build"]
    with process_group() as ranks:
        return CacheBuilder(ReferenceRun(params, data_dir, ref_dir), cache_dir).build(ranks, progress)


# --- the reader ----------------------------------------------------------------------------------------------

class UpdateCache:
    """Read access to a built cache, file by file (only what is asked for is read)."""

    def __init__(self, run: ReferenceRun, cache_dir: Path, require_manifest: bool = True):
        self.run, self.params, self.cache_dir = run, run.params, Path(cache_dir)
        self.T = run.T
        dim = count_parameters(self.params.model, run.prepared.vocab_size, self.params.data.seq_len)
        self.provenance = provenance = cache_provenance(self.params, run.prepared, run.ref_dir, dim)
        manifest = self.cache_dir / MANIFEST
        if require_manifest:
            if not manifest.is_file():
                raise FileNotFoundError(f"{manifest} is missing: the cache is incomplete (its build did not finish); "
                                        "run the cache stage (dvc repro cache)")
            check_metadata(manifest, read_json(manifest), provenance)
        groups = list(curvature_batches(run.prepared, self.params.cache.curvature_batch, self.params.cache.curvature))
        self.groups = groups
        self.records: dict[str, dict] = {}
        for unit in work_units(self.params, self.T, groups):
            if unit.kind == "subspace" and not require_manifest:
                continue            # being built from this reader
            for path in unit_files(self.params, self.T, self.cache_dir, unit):
                t = file_checkpoint(path)
                shapes = file_shapes(self.params, self.T, dim, unit.kind, t, groups)
                self.records[path.name] = check_file(path, {**provenance, "t": t}, shapes)
        self.verified: set[tuple[str, str]] = set()

    def read(self, path: Path, name: str) -> torch.Tensor:
        """A stored tensor; the first read of each is checked against its sha256 (later reads of the same
        tensor in this process are not: hashing costs about as much as reading)."""
        with safe_open(str(path), framework="pt") as fh:
            x = fh.get_tensor(name)
        if (path.name, name) not in self.verified:
            verify_tensor(path, name, x, self.records[path.name][name])
            self.verified.add((path.name, name))
        return x

    def tensor(self, t: int, name: str) -> torch.Tensor:
        """A tensor of pairs shard t."""
        return self.read(shard_path(self.cache_dir, t), name)

    def grads(self, t: int) -> torch.Tensor:
        """g(θ_t, B_j) for every batch j [T, d] (pair checkpoints only)."""
        return self.tensor(t, "grad").float()

    def own_grad(self, t: int) -> torch.Tensor:
        """g(θ_t, B_t), the reference run's gradient at step t."""
        return self.tensor(t, "own_grad")

    def after_grad(self, j: int) -> torch.Tensor:
        """g(θ_{j+1}, B_j), the gradient of B_j right after the reference's step on it."""
        if j + 1 in pair_checkpoints(self.params, self.T):
            return self.tensor(j + 1, "grad")[j].float()
        return self.tensor(j + 1, "after_grad")

    def eval_grad(self, t: int) -> torch.Tensor:
        return self.tensor(t, "eval_grad")

    def eigen(self, t: int, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The eigenspace of `group` in force at step t (values [r], vectors [r, d])."""
        path = curvature_path(self.cache_dir, group, curvature_step_at(self.params, self.T, t))
        return self.read(path, "eig_values"), self.read(path, "eig_vectors")

    # --- fut-subspace ---

    def _basis_entries(self, checkpoints: list[int]) -> list[tuple[Path, str, int | None]]:
        """fut-subspace's basis B with pairs at `checkpoints`, row by row in its order (fut/subspace.py): (file,
        tensor, row or None for all rows of a 2-D tensor or the whole of a 1-D one)."""
        T, out = self.T, []
        for c in checkpoints:
            out.append((shard_path(self.cache_dir, c), "grad", None))
        out += [(shard_path(self.cache_dir, t), "own_grad", None) for t in range(T)]
        pairs = pair_checkpoints(self.params, T)
        out += [(shard_path(self.cache_dir, j + 1), "grad", j) if j + 1 in pairs
                else (shard_path(self.cache_dir, j + 1), "after_grad", None) for j in range(T)]
        for c, g in self.eigen_keys():
            out.append((curvature_path(self.cache_dir, g, c), "eig_vectors", None))
        return out

    def eigen_keys(self) -> list[tuple[int, str]]:
        return sorted((c, g) for c in curvature_steps(self.params, self.T) for g in self.groups
                      if g.startswith("domain"))

    def basis_rows(self, checkpoints: list[int], cols: slice) -> torch.Tensor:
        """B[:, cols] [N, len] float32, read by slices (every tensor's checksum is verified once, in full)."""
        rows = []
        for path, name, row in self._basis_entries(checkpoints):
            if (path.name, name) not in self.verified:
                self.read(path, name)
            with safe_open(str(path), framework="pt") as fh:
                sl = fh.get_slice(name)
                x = sl[cols] if len(sl.get_shape()) == 1 else (sl[:, cols] if row is None else sl[row: row + 1, cols])
            rows.append(x.float().reshape(-1, cols.stop - cols.start))
        return torch.cat(rows)

    def subspace_sources(self, stride: int | None = None) -> SubspaceSources:
        """What fut/subspace.py builds its matrices from (the basis read by slices): pairs at every `stride`-th
        checkpoint (default: `cache.subspace_stride`'s), the own and after-step gradients, the domain eigenspaces."""
        T, run, hp = self.T, self.run, self.run.hp
        keys = self.eigen_keys()
        precond = {t: self._precond(t) for t in range(T)}
        mid = precond[T // 2]
        drift = max(float((p / mid - 1).abs().median()) for p in precond.values())
        cks = subspace_checkpoints(self.params, T) if stride is None else _every(stride, T)
        missing = sorted(set(cks) - set(pair_checkpoints(self.params, T)))
        if missing:
            raise ValueError(f"pair stride {stride}: checkpoints {missing} hold no pairs in this cache "
                             f"(cache.checkpoint_stride = {self.params.cache.checkpoint_stride})")
        n_rows = basis_layout(T, len(cks), [self.params.cache.curvature_rank] * len(keys))["size"]
        return SubspaceSources(
            pair_checkpoints=cks, eigen_keys=keys, eigen_values=[self.eigen(c, g)[0] for c, g in keys],
            groups=[batch_group(run.prepared, j) for j in range(T)],
            rows=lambda cols: self.basis_rows(cks, cols), dim=run.layout.dim, chunk=max(1, BASIS_FLOATS // n_rows),
            theta=lambda t: run.theta(t).cpu(), precond=mid.cpu(), precond_drift=drift, eval_grad=self.eval_grad(T),
            lrs=run.lrs,
            adam_steps=[run.start.adam_step + t + 1 for t in range(T)], hp=hp)

    def _precond(self, t: int) -> torch.Tensor:
        """Adam's preconditioner 1/(sqrt(v̂) + ε) of the reference step t (v after the step, bias-corrected)."""
        _, m, v, step = self.run.flat(t)
        _, v1 = adam_moments(self.own_grad(t).to(self.run.device), m, v, self.run.hp)
        return 1 / ((v1 / (1 - self.run.hp.beta2 ** (step + 1))).sqrt() + self.run.hp.eps)

    def subspace(self) -> Subspace:
        path = self.cache_dir / SUBSPACE
        tensors = {name: self.read(path, name) for name in self.records[path.name]}
        return Subspace.from_tensors(tensors, read_metadata(path)["subspace"])

    # --- accounting ---

    def paths(self) -> list[Path]:
        return [self.cache_dir / name for name in sorted(self.records)]

    def build_cost(self) -> dict[str, float]:
        """Total one-time cost, summed over the files' own records (true across resumed and distributed builds)."""
        cost = recorded_cost(self.paths(), ("grad_seconds", "eval_grad_seconds", "curvature_seconds",
                                            "subspace_seconds"))
        return {**cost, "seconds_per_gradient": cost["grad_seconds"] / max(cost["gradients"], 1)}

    def bytes(self) -> dict[str, int]:
        sizes = {"grad": 0, "eval_grad": 0, "curvature": 0, "subspace": 0}
        for path in self.paths():
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    key = ("subspace" if path.name == SUBSPACE else
                           {"grad": "grad", "own_grad": "grad", "after_grad": "grad",
                            "eval_grad": "eval_grad"}.get(name, "curvature"))
                    sizes[key] += math.prod(sl.get_shape()) * {"F32": 4, "F64": 8, "BF16": 2, "F16": 2,
                                                               "I64": 8}[sl.get_dtype()]
        sizes["total_file_bytes"] = sum(p.stat().st_size for p in self.paths())
        return sizes



def recorded_cost(paths: list[Path], keys: tuple[str, ...]) -> dict:
    """The build seconds of `keys` and the gradients, summed over what each file's metadata records."""
    cost = dict.fromkeys(keys, 0.0)
    gradients = 0
    for path in paths:
        meta = read_metadata(path)
        gradients += meta.get("gradients", 0)
        for key, sec in meta["build"].items():
            cost[key] += sec
    return {**cost, "seconds": sum(cost.values()), "gradients": gradients}


def main(argv: list[str] | None = None) -> int:
    """One torchrun rank of `build_cache`'s launch: `python -m fut.cache --data D --reference R --cache C --params P`
    (users launch ranks themselves with `torchrun -m fut cache`)."""
    ap = argparse.ArgumentParser(prog="python -m fut.cache")
    for name in ("data", "reference", "cache", "params"):
        ap.add_argument(f"--{name}", type=Path, required=True)
    args = ap.parse_args(argv)
    build_cache(load(args.params), args.data, args.reference, args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
