"""Stage 2: the update cache, as work units that torch.distributed ranks share (fut/distributed.py).

Pairs unit t (t = 0..T), file shard_<t>.safetensors:
  own_grad    [d]     g(θ_t, B_t), the reference run's own gradient at step t (every t < T);
  eval_grad   [d]     ∇L_E(θ_t) on the mixed eval set, and proj_eval_grad [k] its projection;
and at every `cache.checkpoint_stride`-th checkpoint (every one by default), for every window batch j:
  grad        [T, d]  g(θ_t, B_j), full space (`cache.dtype`): what `fut-state` replays and the paper's
                      finite-difference terms (secant Jacobian diagonals between consecutive checkpoints,
                      FUT++'s second differences) are derived from, so they are not stored twice;
  proj_gamma  [T, k]  P Γ(θ_t, B_j; m_t, v_t), the paper's update term with the reference Adam state.
With a stride s the pairs cost T²/s gradient evaluations (+ T own gradients); `fut-state` expands g(θ_t, B_j)
around the nearest cached checkpoint c ≤ t with the cached curvature (fut/estimators.py).
Curvature unit <group>, files curvature_<group>_<t>.safetensors at every `cache.curvature_stride`-th checkpoint:
  eig_values [r], eig_vectors [r, d]  top eigenpairs (largest |λ|) of the Hessian at θ_t of the group's
                      curvature batch. Groups (`cache.curvature`): `domain<i>`, a batch drawn from the window
                      batches of domain i, and `window`, a batch mixed from the whole window. The curvature of a
                      batch depends on its text: the replay of batch j uses the eigenspace of j's domain.
                      A group's checkpoints are one unit because Lanczos at each starts from the previous one's
                      top eigenvector (neighbouring Hessians are close).
Every unit's result is the same whichever rank builds it, so any number of ranks builds the same tensors.
Device and precision: each rank computes on `train.device` (its own GPU under torchrun on CUDA), gradients and
Hessian-vector products under the training's autocast (`train.precision`: bf16 matmuls on CUDA, as the
training step), so a cached gradient is the training gradient; Adam terms, Lanczos and projections in float32;
everything is stored from the CPU. Pairs are made one at a time, so device memory does not grow with T: a shard's
rows gather on the CPU ([T, d] in `cache.dtype`) and the Adam terms are projected PROJECT_ROWS at a time.
Files are written atomically with the cache's provenance (prepared data, tokenizer, reference run and its
stored trajectory, cache params, projector, dtype, versions) and every tensor's sha256; a rerun skips files
that are complete, verified and match, so an interrupted build resumes and ends with the same tensors. When
every unit is done, rank 0 writes manifest.json, the mark of a complete cache. The reader refuses a cache
without it and a file that differs, naming what differs, or whose tensors do not match their shapes or checksums.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .adam import AdamHyper, clip_scale, update_term
from .config import Params, to_yaml
from .curvature import LossFunction, lanczos_top_eigen
from .data import Prepared, load_prepared
from .device import autocast, configure_threads, describe_device, resolve_device, synchronize
from .distributed import Ranks, in_torchrun, launch, process_group, rank_device
from .flat import ParamLayout
from .model import build_model, count_parameters
from .projection import Projector, make_projector, projector_metadata
from .reference import load_checkpoint, reference_hash, trajectory_digest
from .storage import (ArtefactMismatch, CorruptArtefact, atomic_write_json, check_layout, check_metadata,
                      load_tensors, read_header, read_json, read_metadata, remove_temporaries, require_free_space,
                      save_tensors, verify_tensor, versions)
from .training import NonFiniteError, first_non_finite

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "manifest.json"
# Cost of one Hessian-vector product in gradient evaluations of the same batch (double backward; measured
# 3.5 on this model, benchmarks/estimator_speed.py). Only balances the ranks' shares; `plan` times both.
HVP_COST = 3.5
# Adam terms projected together: one pass over the sparse projector serves them all (a sparse projection of a
# row is the same bit for bit in any batch), at PROJECT_ROWS · d floats of CPU memory.
PROJECT_ROWS = 8


def cache_provenance(params: Params, prepared: Prepared, ref_dir: Path, dim: int) -> dict:
    """What every file depends on, key by key, so a refused file is refused naming what differs."""
    c = params.cache
    return {"prepare_hash": prepared.prepare_hash, "tokenizer_sha256": prepared.tokenizer_sha256,
            "reference_hash": reference_hash(params, prepared),
            "trajectory_sha256": trajectory_digest(ref_dir, params.window.steps),
            "cache_params": params.section_hash("cache"),
            "projector": projector_metadata(c.projection, dim, c.k, c.seed), "dtype": c.dtype}


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


def curvature_steps(params: Params) -> list[int]:
    """The checkpoints that carry eigenspaces."""
    return list(range(0, params.window.steps, params.cache.curvature_stride))


@dataclass(frozen=True)
class Unit:
    """One piece of the build: the pairs of checkpoint t (`key` = t) or one group's eigenspaces (`key` = group)."""
    kind: str
    key: int | str

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.key}"


def has_pairs(params: Params, t: int) -> bool:
    """Checkpoint t holds g(θ_t, B_j) for every batch j (T holds them too when it is on the stride)."""
    return t % params.cache.checkpoint_stride == 0


def work_units(params: Params, groups: list[str]) -> list[Unit]:
    return ([Unit("pairs", t) for t in range(params.window.steps + 1)]
            + [Unit("curvature", g) for g in groups])


def unit_cost(params: Params, prepared: Prepared, unit: Unit) -> float:
    """A unit's work in gradient evaluations of one window batch."""
    b = params.window.batch_size
    if unit.kind == "pairs":
        pairs = params.window.steps if has_pairs(params, unit.key) else int(unit.key < params.window.steps)
        return pairs + prepared.eval_mixed.shape[0] / b
    c = params.cache
    return len(curvature_steps(params)) * c.curvature_iterations * HVP_COST * c.curvature_batch / b


def unit_files(params: Params, cache_dir: Path, unit: Unit) -> list[Path]:
    if unit.kind == "pairs":
        return [shard_path(cache_dir, unit.key)]
    return [curvature_path(cache_dir, unit.key, t) for t in curvature_steps(params)]


def file_shapes(params: Params, dim: int, kind: str, t: int) -> dict[str, list[int]]:
    """The tensors of pairs shard t or of a curvature file at checkpoint t, and their shapes."""
    c, T = params.cache, params.window.steps
    if kind == "curvature":
        return {"eig_values": [c.curvature_rank], "eig_vectors": [c.curvature_rank, dim]}
    shapes = {"own_grad": [dim]} if t < T else {}
    shapes.update({"eval_grad": [dim], "proj_eval_grad": [c.k]})
    if has_pairs(params, t):
        shapes.update({"grad": [T, dim], "proj_gamma": [T, c.k]})
    return shapes


def file_bytes(params: Params, dim: int, kind: str, t: int) -> int:
    """Size of one file's tensors (its header adds a few kB)."""
    return sum(math.prod(shape) * (DTYPES[params.cache.dtype].itemsize if name == "grad" else 4)
               for name, shape in file_shapes(params, dim, kind, t).items())


def file_checkpoint(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def cache_files(params: Params, dim: int, groups: list[str], cache_dir: Path) -> list[tuple[Path, int]]:
    """Every file of the complete cache and its tensors' size in bytes."""
    return [(path, file_bytes(params, dim, u.kind, file_checkpoint(path))) for u in work_units(params, groups)
            for path in unit_files(params, cache_dir, u)]


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


class CacheBuilder:
    def __init__(self, params: Params, prepared: Prepared, ref_dir: Path, cache_dir: Path):
        configure_threads(params.train)
        self.params, self.prepared = params, prepared
        self.ref_dir, self.cache_dir = Path(ref_dir), Path(cache_dir)
        self.ref_hash = reference_hash(params, prepared)
        start = load_checkpoint(ref_dir, 0, self.ref_hash)
        self.layout = ParamLayout.of(start.theta)
        self.device = rank_device(resolve_device(params.train))
        model = build_model(params.model, prepared.vocab_size, params.data.seq_len, prepared.eos_id).to(self.device)
        self.loss = LossFunction(model, self.layout)
        c = params.cache
        self.projector: Projector = make_projector(c.projection, self.layout.dim, c.k, c.seed)
        self.hp = AdamHyper.from_config(params.optimizer)
        self.provenance = cache_provenance(params, prepared, ref_dir, self.layout.dim)
        self.meta = {**self.provenance, "versions": versions()}
        self.curvature = {g: b.to(self.device) for g, b in curvature_batches(prepared, c.curvature_batch,
                                                                              c.curvature).items()}
        self.window, self.eval_seqs = prepared.window.to(self.device), prepared.eval_mixed.to(self.device)
        self.units = work_units(params, list(self.curvature))

    def _expected(self, path: Path) -> tuple[dict, dict[str, list[int]]]:
        kind, t = "pairs" if path.name.startswith("shard_") else "curvature", file_checkpoint(path)
        return {**self.meta, "t": t}, file_shapes(self.params, self.layout.dim, kind, t)

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

    def _flat(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.layout.flatten(tensors).to(self.device)

    def _grad(self, theta: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        with autocast(self.params.train, self.device):
            return self.loss.grad(theta, batch)

    def build_pairs(self, t: int) -> None:
        """Shard t. One pair at a time on the device (its memory stays a few [d] vectors at any T); the stored
        rows gather on the CPU in `cache.dtype`, the Adam terms are projected PROJECT_ROWS at a time."""
        state = load_checkpoint(self.ref_dir, t, self.ref_hash)
        theta, m, v, adam_step = self._flat(state.theta), self._flat(state.m), self._flat(state.v), state.adam_step
        T, window = self.params.window.steps, self.window
        seconds = {"grad_seconds": 0.0, "eval_grad_seconds": 0.0, "projection_seconds": 0.0}

        def timed(key: str, fn):
            start = time.perf_counter()
            out = fn()
            synchronize(self.device)
            seconds[key] += time.perf_counter() - start
            return out

        tensors = {}
        if has_pairs(self.params, t):
            grads = tensors["grad"] = torch.empty(T, self.layout.dim, dtype=DTYPES[self.params.cache.dtype])
            projected, pending = [], []
            for j, batch in enumerate(window):
                g = timed("grad_seconds", lambda: self._grad(theta, batch))
                grads[j] = g.to(grads.dtype)
                if j == t:
                    tensors["own_grad"] = g.cpu()
                pending.append(timed("projection_seconds", lambda: update_term(
                    theta, g * clip_scale(g.norm(), self.hp.grad_clip), m, v, adam_step + 1, self.hp)[0].cpu()))
                if len(pending) == PROJECT_ROWS or j == T - 1:
                    projected.append(timed("projection_seconds", lambda: self.projector.project(torch.stack(pending))))
                    pending = []
            tensors["proj_gamma"] = torch.cat(projected)
        elif t < T:
            tensors["own_grad"] = timed("grad_seconds", lambda: self._grad(theta, window[t]).cpu())
        eval_grad = timed("eval_grad_seconds", lambda: self._grad(theta, self.eval_seqs).cpu())
        tensors.update({"eval_grad": eval_grad,
                        "proj_eval_grad": timed("projection_seconds", lambda: self.projector.project(eval_grad))})
        self._save(shard_path(self.cache_dir, t), tensors, t, {"adam_step": adam_step, "build": seconds})

    def build_curvature(self, group: str, t: int, start: torch.Tensor | None) -> torch.Tensor:
        """The eigenspace of `group` at checkpoint t, Lanczos seeded with `start`; returns its top vector."""
        c = self.params.cache
        theta = self._flat(load_checkpoint(self.ref_dir, t, self.ref_hash).theta)
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

    def _save(self, path: Path, tensors: dict[str, torch.Tensor], t: int, extra: dict) -> None:
        bad = first_non_finite(tensors)
        if bad is not None:
            raise NonFiniteError(f"cache file {path.name} (reference checkpoint {t}): tensor {bad!r} holds NaN or "
                                 f"inf (cache.dtype = {self.params.cache.dtype!r}); the build stopped before "
                                 "writing it")
        save_tensors(path, tensors, {**self.meta, "t": t, "device": describe_device(self.device), **extra})

    def run(self, unit: Unit) -> tuple[int, int]:
        """Build the unit's missing files; returns (files built, files reused)."""
        built = reused = 0
        if unit.kind == "pairs":
            if self.is_complete(shard_path(self.cache_dir, unit.key)):
                return 0, 1
            self.build_pairs(unit.key)
            return 1, 0
        start = None
        for t in curvature_steps(self.params):
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
        """This rank's share of the missing files; on rank 0, then, the manifest. Every rank returns the counts
        of files built and reused over all ranks, the device, the projector and the number of ranks."""
        if ranks.is_main:
            remove_temporaries(self.cache_dir)
            (self.cache_dir / MANIFEST).unlink(missing_ok=True)
            missing = sum(n for path, n in cache_files(self.params, self.layout.dim, list(self.curvature),
                                                       self.cache_dir) if not path.exists())
            require_free_space(self.cache_dir, missing, "the cache's missing files")
        ranks.barrier()
        mine = ranks.mine(self.units, [unit_cost(self.params, self.prepared, u) for u in self.units])
        counts = [0, 0]
        desc = "cache" if ranks.world == 1 else f"cache rank {ranks.rank}/{ranks.world}"
        for unit in tqdm(mine, desc=desc, position=ranks.rank, disable=not progress):
            counts = [a + b for a, b in zip(counts, self.run(unit))]
        counts = [sum(c) for c in zip(*ranks.gather(counts))]   # also waits for every rank's share
        built = {"files_built": counts[0], "files_reused": counts[1], "device": describe_device(self.device),
                 "workers": ranks.world,
                 "projector": self.projector.metadata()}
        if ranks.is_main:
            files = sorted(p.name for u in self.units for p in unit_files(self.params, self.cache_dir, u))
            atomic_write_json(self.cache_dir / MANIFEST, {**self.provenance, "files": files, "build": built})
        ranks.barrier()
        return built


def build_cache(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, progress: bool = True) -> dict:
    """Build (or resume) the cache with `cache.workers` ranks: this process's share as a torchrun rank, the
    whole of it in this process with one worker, else by launching torchrun (`python -m fut cache`)."""
    if params.cache.workers > 1 and not in_torchrun():
        launch(["cache", "--data", str(data_dir), "--reference", str(ref_dir), "--cache", str(cache_dir)],
               params.cache.workers, "the cache build", to_yaml(params))
        return read_json(Path(cache_dir) / MANIFEST)["build"]
    with process_group() as ranks:
        return CacheBuilder(params, load_prepared(data_dir, params), ref_dir, cache_dir).build(ranks, progress)


class UpdateCache:
    """Read access to a built cache, file by file (only what is asked for is read)."""

    def __init__(self, params: Params, prepared: Prepared, ref_dir: Path, cache_dir: Path):
        self.params, self.cache_dir = params, Path(cache_dir)
        self.steps = params.window.steps
        dim = count_parameters(params.model, prepared.vocab_size, params.data.seq_len)
        provenance = cache_provenance(params, prepared, ref_dir, dim)
        manifest = self.cache_dir / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} is missing: the cache is incomplete (its build did not finish); "
                                    "run the cache stage (dvc repro cache)")
        check_metadata(manifest, read_json(manifest), provenance)
        groups = list(curvature_batches(prepared, params.cache.curvature_batch, params.cache.curvature))
        self.records: dict[str, dict] = {}
        for unit in work_units(params, groups):
            for path in unit_files(params, self.cache_dir, unit):
                t = file_checkpoint(path)
                self.records[path.name] = check_file(path, {**provenance, "t": t},
                                                     file_shapes(params, dim, unit.kind, t))
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
        """g(θ_t, B_j) for every batch j [T, d] (checkpoints on `cache.checkpoint_stride` only)."""
        return self.tensor(t, "grad").float()

    def own_grad(self, t: int) -> torch.Tensor:
        """g(θ_t, B_t), the reference run's gradient at step t."""
        return self.tensor(t, "own_grad")

    def eigen(self, t: int, group: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The eigenspace of `group` in force at step t: the nearest checkpoint at or before t that has one."""
        path = curvature_path(self.cache_dir, group, t - t % self.params.cache.curvature_stride)
        return self.read(path, "eig_values"), self.read(path, "eig_vectors")

    def paths(self) -> list[Path]:
        return [self.cache_dir / name for name in sorted(self.records)]

    def build_cost(self) -> dict[str, float]:
        """Total one-time cost, summed over the files' own records (true across resumed and distributed builds)."""
        cost = {"grad_seconds": 0.0, "eval_grad_seconds": 0.0, "projection_seconds": 0.0, "curvature_seconds": 0.0}
        for path in self.paths():
            for key, sec in read_metadata(path)["build"].items():
                cost[key] += sec
        pairs = sum(self.steps if has_pairs(self.params, t) else int(t < self.steps) for t in range(self.steps + 1))
        return {**cost, "seconds": sum(cost.values()), "pairs": pairs, "seconds_per_pair": cost["grad_seconds"] / pairs,
                "projection_overhead": cost["projection_seconds"] / cost["grad_seconds"]}

    def bytes(self) -> dict[str, int]:
        sizes = {"grad": 0, "projected": 0, "eval_grad": 0, "curvature": 0}
        for path in self.paths():
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    key = {"grad": "grad", "proj_gamma": "projected", "proj_eval_grad": "projected",
                           "eval_grad": "eval_grad"}.get(name, "curvature")
                    sizes[key] += math.prod(sl.get_shape()) * {"F32": 4, "BF16": 2, "F16": 2}[sl.get_dtype()]
        sizes["total_file_bytes"] = sum(p.stat().st_size for p in self.paths())
        return sizes
