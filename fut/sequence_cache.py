"""The sample-level cache: per-sequence gradients, so fut-subspace can replay orders that assign the window's
sequences to batches anew (fut/schedules.py). A batch's gradient is the mean of its sequences' (every window
sequence has the same number of tokens), so the replay over sequence units (fut/subspace.py) needs each
sequence's gradient where the batch-level cache holds each batch's.

Files in the folder, each written atomically with the batch-level cache's provenance and every tensor's sha256 (a
rerun keeps the complete ones, so an interrupted build resumes):
  pairs_<c>.safetensors  grad  [n, d]  g(θ_c, x_i) for every window sequence i at each pair checkpoint c (0 and T),
                                       in `cache.dtype`;
  visits.safetensors     own   [n, d]  g(θ_j, x_i) for x_i in batch j: at the reference's own step on it;
                         after [n, d]  g(θ_{j+1}, x_i): right after that step (where the gradient jumps);
  curvature.safetensors  h     [n, d]  H(θ_j, x_i) P̄ g(θ_j, x_i): each sequence's Hessian along its own
                                       preconditioned gradient at its own step (fut/subspace.py `own_directions`);
  subspace.safetensors   fut-subspace's matrices over the n sequence units, its readout fitted to the exact readout
                         of `cache.probes` sample-level probe orders (random and domain-pure re-batchings).
The curvature (the domain eigenspaces), Adam's preconditioner and the eval gradient are read from the batch-level
cache (fut/cache.py): a sequence's curvature group is its batch's domain. The domain eigenspace misses how one
sequence's own loss falls when a step is taken on it, which is what moving it to another step changes; its own
curvature row adds that (chosen on dev orders, benchmarks/sequence_curvature.py).
"""
from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .cache import BASIS_FLOATS, DTYPES, UpdateCache, batch_group, curvature_path, recorded_cost
from .device import autocast
from .schedules import as_units, sample_order_set, sequence_batches
from .storage import ArtefactMismatch, load_tensors, read_metadata, remove_temporaries, save_tensors
from .subspace import Subspace, SubspaceSources, basis_layout, build_subspace, delta

log = logging.getLogger(__name__)

SUBSPACE = "subspace.safetensors"
CURVATURE = "curvature.safetensors"
# What the subspace is built from beyond the files' provenance: a subspace of an older layout is rebuilt.
SUBSPACE_SOURCES = {"own_curvature": "own step"}


class SequenceCache:
    """Builds (resuming) and reads the sample-level cache of `store`'s reference run."""

    def __init__(self, store: UpdateCache, cache_dir: Path):
        self.store, self.run, self.params = store, store.run, store.params
        self.dir = Path(cache_dir)
        self.T, self.b = self.run.T, self.run.batch_size
        self.n = self.T * self.b
        self.sequences = self.run.prepared.window.reshape(self.n, -1)
        self.meta = {**store.provenance, "kind": "sequences", "sequences": self.n}
        self.checkpoints = [0, self.T]

    def path(self, name: str) -> Path:
        return self.dir / name

    def files(self) -> list[Path]:
        return [self.path(f"pairs_{c}.safetensors") for c in self.checkpoints] + [
            self.path("visits.safetensors"), self.path(CURVATURE), self.path(SUBSPACE)]

    def _load(self, path: Path, expected: dict | None = None) -> dict[str, torch.Tensor] | None:
        """The file's tensors if it is this cache's (`expected`: more metadata to match) and intact, else None (it
        is rebuilt)."""
        if not path.is_file():
            return None
        try:
            return load_tensors(path, {**self.meta, **(expected or {})})[0]
        except ArtefactMismatch as err:
            log.warning("sample-level cache file %s will be rebuilt: %s", path.name, err)
            return None

    def _grads(self, theta_at, seqs: list[int], desc: str, progress: bool) -> tuple[torch.Tensor, float]:
        """[len(seqs), d] gradients of single sequences, sequence i at θ = theta_at(i); and the seconds."""
        out = torch.empty(len(seqs), self.run.layout.dim, dtype=DTYPES[self.params.cache.dtype])
        t0 = time.perf_counter()
        for k, i in enumerate(tqdm(seqs, desc=desc, disable=not progress, leave=False)):
            with autocast(self.params.train, self.run.device):
                out[k] = self.run.loss.grad(theta_at(i), self.sequences[i: i + 1].to(self.run.device)).cpu()
        return out, time.perf_counter() - t0

    def _own_curvature(self, own: torch.Tensor, precond: torch.Tensor, progress: bool) -> tuple[torch.Tensor, float]:
        """[n, d] H(θ_j, x_i) P̄ g(θ_j, x_i) for sequence i of batch j (P̄ = `precond`), and the seconds."""
        out = torch.empty_like(own)
        t0 = time.perf_counter()
        for i in tqdm(range(self.n), desc="own-direction curvature", disable=not progress, leave=False):
            direction = (precond * own[i].float()).to(self.run.device)[None]
            with autocast(self.params.train, self.run.device):
                out[i] = self.run.loss.hvp(self.run.theta(i // self.b), self.sequences[i: i + 1].to(self.run.device),
                                           direction)[0].cpu()
        return out, time.perf_counter() - t0

    def build(self, progress: bool = True) -> Subspace:
        """Every missing file; returns the subspace."""
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(self.dir)
        seqs = list(range(self.n))
        for c in self.checkpoints:
            path = self.path(f"pairs_{c}.safetensors")
            if self._load(path) is None:
                theta = self.run.theta(c)
                grads, sec = self._grads(lambda i: theta, seqs, f"sequence gradients at checkpoint {c}", progress)
                save_tensors(path, {"grad": grads}, {**self.meta, "build": {"grad_seconds": sec}, "gradients": self.n})
        path = self.path("visits.safetensors")
        visits = self._load(path)
        if visits is None:
            # in the order of the batches, so the reference trajectory's checkpoints are read one after another
            own, s1 = self._grads(lambda i: self.run.theta(i // self.b), seqs, "own-step gradients", progress)
            after, s2 = self._grads(lambda i: self.run.theta(i // self.b + 1), seqs, "after-step gradients", progress)
            save_tensors(path, {"own": own, "after": after},
                         {**self.meta, "build": {"grad_seconds": s1 + s2}, "gradients": 2 * self.n})
            visits = {"own": own, "after": after}
        base = None       # the batch-level sources (their P̄ reads T checkpoints): asked for once, if needed
        path = self.path(CURVATURE)
        if self._load(path) is None:
            base = self.store.subspace_sources()
            h, sec = self._own_curvature(visits["own"], base.precond, progress)
            save_tensors(path, {"h": h}, {**self.meta, "build": {"hvp_seconds": sec}, "hvps": self.n})
        path = self.path(SUBSPACE)
        tensors = self._load(path, SUBSPACE_SOURCES)
        if tensors is None:
            t0 = time.perf_counter()
            sub = self.fit_subspace(self.sources(base))
            save_tensors(path, sub.tensors(), {**self.meta, **SUBSPACE_SOURCES, "subspace": sub.metadata(),
                                               "build": {"subspace_seconds": time.perf_counter() - t0}})
            return sub
        return Subspace.from_tensors(tensors, read_metadata(path)["subspace"])

    def subspace(self) -> Subspace:
        """The stored subspace (for estimates: nothing is built here)."""
        path = self.path(SUBSPACE)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the sample-level cache is not built; run its stage "
                                    "(dvc repro sample_orders)")
        tensors, meta = load_tensors(path, {**self.meta, **SUBSPACE_SOURCES})
        return Subspace.from_tensors(tensors, meta["subspace"])

    def sources(self, base: SubspaceSources | None = None) -> SubspaceSources:
        """The batch-level cache's sources (`base`, read from it if not given) with the sequences as units: pairs,
        own and after-step gradients per sequence, the reference's batch t as the mean of its b sequences, and
        each sequence's own-direction curvature along its own-step gradient."""
        base = base if base is not None else self.store.subspace_sources()
        keys = base.eigen_keys
        layout = basis_layout(self.n, len(self.checkpoints), [self.params.cache.curvature_rank] * len(keys),
                              own_curvature=self.n)
        groups = [batch_group(self.run.prepared, i // self.b) for i in range(self.n)]
        return SubspaceSources(**{**base.__dict__, "pair_checkpoints": self.checkpoints, "groups": groups,
                                  "rows": self.rows, "chunk": max(1, BASIS_FLOATS // layout["size"]),
                                  "visits": [(i, i // self.b) for i in range(self.n)],
                                  "reference": sequence_batches(self.T, self.b),
                                  "own_directions": [[layout["own"] + i] for i in range(self.n)]})

    def rows(self, cols: slice) -> torch.Tensor:
        """The basis B[:, cols] [N, len] float32: pairs, own, after, the batch-level cache's eigenvectors, then the
        own-direction curvature rows."""
        # Slices only: each file's checksums were verified when it was loaded whole (`build`, `sources`).
        files = [(self.path(f"pairs_{c}.safetensors"), "grad") for c in self.checkpoints] + [
            (self.path("visits.safetensors"), "own"), (self.path("visits.safetensors"), "after")] + [
            (curvature_path(self.store.cache_dir, g, c), "eig_vectors") for c, g in self.store.eigen_keys()] + [
            (self.path(CURVATURE), "h")]
        parts = []
        for path, tensor in files:
            with safe_open(str(path), framework="pt") as fh:
                parts.append(fh.get_slice(tensor)[:, cols].float())
        return torch.cat(parts)

    def fit_subspace(self, src: SubspaceSources) -> Subspace:
        """fut-subspace over `src` (this cache's sources, or a variant of them), its quadratic readout fitted to
        the exact readout of the sample-level probe orders."""
        run, c = self.run, self.params.cache
        theta_T = run.theta(self.T)
        probes = sample_order_set(self.T, self.b, run.prepared.window_domains, [0.0] * self.n,
                                  {"random": c.probes - c.probes // 4, "domains": c.probes // 4}, c.seed)
        return build_subspace(src, partial(run.eval_losses_at, theta_T), run.loss_on(theta_T, run.prepared.eval_mixed),
                              c.probes, c.seed, progress=log.info, probe_sigma=as_units(list(probes.values())))

    def deltas(self, S: torch.Tensor) -> torch.Tensor:
        """δ in full space [n, d] for replay coefficients S (the exact readout)."""
        src = self.sources()
        return delta(S, src.rows, src.precond, src.dim, src.chunk)

    def cost(self) -> dict:
        """Build seconds and bytes, summed over the files' own records."""
        return {**recorded_cost(self.files(), ("grad_seconds", "hvp_seconds", "subspace_seconds")),
                "bytes": sum(p.stat().st_size for p in self.files())}
