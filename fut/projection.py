"""Seeded random projections (Johnson-Lindenstrauss) from d to k dimensions, never materialising d×k densely.

`project(x)` returns `x @ R / sqrt(k)` for a random R with unit-variance entries, so inner products are
preserved in expectation: E<Px, Py> = <x, y>. Column c of R depends only on (seed, c), so the first k' columns
of a k-projection are a k'-projection from the same seed: `prefix(z, k')` rescales them (sqrt(k / k')), and one
cache serves the whole projection-size ablation.
"""
from __future__ import annotations

import hashlib
import logging
import math
from abc import ABC, abstractmethod

import warnings

import torch

log = logging.getLogger(__name__)


COLUMN_CHUNK = 128      # columns generated together (Gaussian) from one seed
ROW_BLOCK = 1 << 16     # rows per generated Gaussian block: 64k × 128 floats = 32 MB


def _generator(*parts) -> torch.Generator:
    """A generator seeded from `parts`, identical in every process (Python's str hash is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF)


def prefix(z: torch.Tensor, k: int) -> torch.Tensor:
    """The k-dim projection (same seed) from a stored projection z of a larger size: its first k columns,
    rescaled by sqrt(stored k / k) for the 1/sqrt(k) normalisation."""
    stored = z.shape[-1]
    if not 1 <= k <= stored:
        raise ValueError(f"prefix size {k} must be in 1..{stored} (the stored projection size)")
    return z[..., :k] * math.sqrt(stored / k)


class Projector(ABC):
    kind: str

    def __init__(self, dim: int, k: int, seed: int):
        if k < 1 or dim < 1:
            raise ValueError(f"projection size k = {k} and dimension d = {dim} must be >= 1")
        self.dim, self.k, self.seed = dim, k, seed

    @abstractmethod
    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, d] float32 -> x @ R [n, k] (R with unit-variance entries)."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        squeeze = x.dim() == 1
        x = x.reshape(1, -1) if squeeze else x
        if x.shape[1] != self.dim:
            raise ValueError(f"projector built for d = {self.dim}, got vectors of length {x.shape[1]}")
        z = self._raw(x.float()) / math.sqrt(self.k)
        return z[0] if squeeze else z

    def metadata(self) -> dict:
        return projector_metadata(self.kind, self.dim, self.k, self.seed)


class GaussianProjector(Projector):
    """Dense Gaussian R, regenerated block by block from the seed (cost d·k per batch of vectors)."""
    kind = "gaussian"

    def _block(self, chunk: int, row0: int, rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=_generator("gaussian", self.seed, chunk, row0))

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.k)
        for chunk, c0 in enumerate(range(0, self.k, COLUMN_CHUNK)):
            cols = min(COLUMN_CHUNK, self.k - c0)
            for row0 in range(0, self.dim, ROW_BLOCK):
                rows = min(ROW_BLOCK, self.dim - row0)
                # Generate the full chunk width so a column never depends on k.
                block = self._block(chunk, row0, rows, COLUMN_CHUNK)[:, :cols]
                out[:, c0: c0 + cols] += x[:, row0: row0 + rows].to(block.device) @ block
        return out


class SparseProjector(Projector):
    """Very sparse JL (Li, Hastie & Church 2006): R[i, c] = ±sqrt(1/p) with probability p, else 0, with
    p = 1/sqrt(d). Column c is drawn from (seed, c) alone, so prefixes hold; applied as a sparse matrix."""
    kind = "sparse"

    def __init__(self, dim: int, k: int, seed: int):
        super().__init__(dim, k, seed)
        self.density = 1.0 / math.sqrt(dim)
        rows, cols, vals = [], [], []
        scale = math.sqrt(1.0 / self.density)
        for c in range(k):
            gen = _generator("sparse", seed, c)
            nnz = max(1, int(torch.binomial(torch.tensor(float(dim)), torch.tensor(self.density), generator=gen)))
            idx = torch.randperm(dim, generator=gen)[:nnz] if dim <= 4 * nnz else \
                torch.unique(torch.randint(0, dim, (nnz,), generator=gen))
            sign = torch.randint(0, 2, (idx.numel(),), generator=gen).float() * 2 - 1
            rows.append(idx)
            cols.append(torch.full_like(idx, c))
            vals.append(sign * scale)
        index = torch.stack([torch.cat(cols), torch.cat(rows)])
        self.matrix_t = torch.sparse_coo_tensor(index, torch.cat(vals), (k, dim), check_invariants=False)
        with warnings.catch_warnings():   # "sparse CSR support is in beta": matmul is all we use
            warnings.simplefilter("ignore", UserWarning)
            self.matrix_t = self.matrix_t.coalesce().to_sparse_csr()

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        return (self.matrix_t @ x.t()).t()


# The one implementation of each kind, recorded with every projection so a stored one says how it was made
# (there is no fall-back between backends).
BACKENDS = {"sparse": "torch sparse CSR matmul, CPU", "gaussian": "torch.randn blocks regenerated from the seed, CPU"}


def projector_metadata(kind: str, dim: int, k: int, seed: int) -> dict:
    """What a projection is, as recorded with everything projected by it (no projector needs to be built)."""
    return {"kind": kind, "dim": dim, "k": k, "seed": seed, "normalisation": "1/sqrt(k)", "backend": BACKENDS[kind]}


def make_projector(kind: str, dim: int, k: int, seed: int) -> Projector:
    kinds = {"gaussian": GaussianProjector, "sparse": SparseProjector}
    if kind not in kinds:
        raise ValueError(f"projection kind {kind!r} is not one of {sorted(kinds)}")
    projector = kinds[kind](dim, k, seed)
    log.info("projection: %s", projector.metadata())
    return projector
