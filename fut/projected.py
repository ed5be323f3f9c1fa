"""The projected update terms the paper stores (Johnson-Lindenstrauss, fut/projection.py): PΓ_{t,j}, the Adam
update term of every window batch at every pair checkpoint with the reference's Adam state, and P∇L_E(θ_t), the
projected eval gradient at every eval checkpoint. They are derived from the cache's full-space gradients and the
reference trajectory, so they are their own artefact (stage `projection`): changing the projection size k rebuilds
them in seconds and reruns only what reads them, not the cache.

File projected.safetensors: gamma_<t> [T, k] and eval_grad_<t> [k], with the cache's provenance plus the projector's
metadata (kind, d, k, seed, normalisation, backend), refused on any difference.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .adam import clip_scale, update_term
from .cache import UpdateCache, eval_checkpoints, pair_checkpoints
from .config import Params
from .projection import make_projector, projector_metadata
from .storage import check_metadata, load_tensors, save_tensors, versions

FILE = "projected.safetensors"
# Adam terms projected together: one pass over the sparse projector serves them all (a sparse projection of a row
# is the same bit for bit in any batch), at ROWS · d floats of memory.
ROWS = 8


def provenance(params: Params, store: UpdateCache) -> dict:
    p = params.projection
    return {"cache": store.provenance, "projector": projector_metadata(p.kind, store.run.layout.dim, p.k, p.seed)}


def build_projected(store: UpdateCache, out_dir: Path) -> dict:
    """Project every Adam term and eval gradient of the cache; writes out_dir/projected.safetensors. Returns the
    projector's metadata and the seconds the Adam terms and the projection took."""
    run, params = store.run, store.params
    p = params.projection
    projector = make_projector(p.kind, run.layout.dim, p.k, p.seed)
    t0 = time.perf_counter()
    tensors = {}
    for t in pair_checkpoints(params, run.T):
        if t == run.T:
            continue
        theta, m, v, step = run.flat(t)
        grads = store.grads(t).to(run.device)
        rows = []
        for a in range(0, run.T, ROWS):
            g = grads[a: a + ROWS]
            g = g * clip_scale(g.norm(dim=-1, keepdim=True), run.hp.grad_clip)
            rows.append(projector.project(update_term(theta, g, m, v, step + 1, run.hp)[0].cpu()))
        tensors[f"gamma_{t}"] = torch.cat(rows)
    for t in eval_checkpoints(params, run.T):
        tensors[f"eval_grad_{t}"] = projector.project(store.eval_grad(t))
    seconds = time.perf_counter() - t0
    meta = {**provenance(params, store), "versions": versions(), "seconds": seconds}
    save_tensors(Path(out_dir) / FILE, tensors, meta)
    return {"projector": projector.metadata(), "seconds": seconds}


class ProjectedStore:
    """Read access to the projected terms of this cache and projector (refused when either differs)."""

    def __init__(self, params: Params, store: UpdateCache, out_dir: Path):
        path = Path(out_dir) / FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the projection stage (dvc repro projection)")
        self.tensors, meta = load_tensors(path)
        check_metadata(path, meta, provenance(params, store))
        self.k, self.seconds = params.projection.k, meta["seconds"]

    def gamma(self, t: int) -> torch.Tensor:
        return self.tensors[f"gamma_{t}"]

    def eval_grad(self, t: int) -> torch.Tensor:
        return self.tensors[f"eval_grad_{t}"]
