"""The multi-epoch replay's Galerkin matrices B P̄ H P̄ Bᵀ (fut/epochs.py): one Hessian-vector product per basis row
and curvature batch, thousands of them, shared out over `parallel.workers` torchrun ranks as the estimate stage's
units are. A chunk of ROWS rows is one graph and the same computation whichever rank takes it, one thread each as
in one process, so the matrices are the same bits whatever the number of ranks.

    python -m fut.hessian_jobs JOB --params FILE     # one rank of `hessian_grams`' launch
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .config import load, to_yaml
from .device import autocast
from .distributed import in_torchrun, launch, process_group
from .reference import ReferenceRun
from .storage import load_tensors, save_tensors

ROWS = 32   # Hessian-vector products per graph: the forward and first backward pass are shared by the chunk


def _chunk(run: ReferenceRun, theta: torch.Tensor, batch: torch.Tensor, basis: torch.Tensor,
           precond: torch.Tensor, start: int) -> torch.Tensor:
    """Columns start..start+ROWS of B P̄ H P̄ Bᵀ [N, ROWS] (float64), H the Hessian of `batch` at `theta`."""
    with autocast(run.params.train, run.device):
        hv = run.loss.hvp(theta.to(run.device), batch.to(run.device),
                          (precond * basis[start: start + ROWS]).to(run.device)).cpu().float()
    return (basis @ (precond * hv).t()).double()


def _chunks(n_batches: int, n_rows: int) -> list[tuple[int, int]]:
    return [(g, i) for g in range(n_batches) for i in range(0, n_rows, ROWS)]


def hessian_grams(run: ReferenceRun, theta: torch.Tensor, batches: Sequence[torch.Tensor], basis: torch.Tensor,
                  precond: torch.Tensor) -> list[torch.Tensor]:
    """B P̄ H_g P̄ Bᵀ [N, N] (float64) for H_g the Hessian of each of `batches` at `theta`, `basis` B [N, d] and
    `precond` P̄ [d] on the CPU: in `parallel.workers` torchrun ranks, or here with one worker (or inside one)."""
    chunks = _chunks(len(batches), len(basis))
    workers = min(run.params.parallel.workers, len(chunks))
    if workers <= 1 or in_torchrun():
        cols = [_chunk(run, theta, batches[g], basis, precond, i)
                for g, i in tqdm(chunks, desc="Hessian-vector products", unit="chunk")]
    else:
        with tempfile.TemporaryDirectory(prefix="fut-hessian-") as tmp:
            job = Path(tmp) / "job.safetensors"
            save_tensors(job, {"theta": theta.cpu(), "batches": torch.stack(list(batches)).cpu(),
                               "basis": basis, "precond": precond},
                         {"data": str(run.data_dir), "reference": str(run.ref_dir)})
            launch("fut.hessian_jobs", [str(job)], workers, "Hessian-vector products", to_yaml(run.params))
            cols = [load_tensors(Path(tmp) / f"chunk_{k:04d}.safetensors")[0]["cols"] for k in range(len(chunks))]
    per = len(chunks) // len(batches)
    return [torch.cat(cols[g * per: (g + 1) * per], 1) for g in range(len(batches))]


def _run_mine(params_file: Path, job: Path) -> None:
    """One torchrun rank: its share of the chunks, each written as chunk_K.safetensors beside the job."""
    with process_group() as ranks:
        tensors, meta = load_tensors(job)
        # copies in torch's 64-byte aligned memory: a matmul's float32 sums depend on its operands' alignment, and
        # a tensor read from the file starts wherever the file puts it
        tensors = {k: v.clone() for k, v in tensors.items()}
        chunks = _chunks(len(tensors["batches"]), len(tensors["basis"]))
        mine = ranks.mine(list(range(len(chunks))), [1.0] * len(chunks))
        if mine:
            run = ReferenceRun(load(params_file), Path(meta["data"]), Path(meta["reference"]))
            for k in tqdm(mine, desc=f"Hessian-vector products rank {ranks.rank}/{ranks.world}", unit="chunk",
                          position=ranks.rank):
                g, i = chunks[k]
                cols = _chunk(run, tensors["theta"], tensors["batches"][g], tensors["basis"], tensors["precond"], i)
                save_tensors(job.parent / f"chunk_{k:04d}.safetensors", {"cols": cols}, {})
        ranks.barrier()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fut.hessian_jobs")
    ap.add_argument("job", type=Path)
    ap.add_argument("--params", type=Path, required=True)
    args = ap.parse_args(argv)
    _run_mine(args.params, args.job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
