"""The estimate stage's estimates shared out over `parallel.workers` torchrun ranks, as the ground truth's retrains
are: a unit is one method on one split's orders, or one method's trajectory replays. Each rank builds its own
EstimationContext and runs its units one after the other, one thread each as in one process, so every estimate is
the same bits whatever the number of ranks; a unit's seconds are its own (the other rank runs beside it on the
other core).

    python -m fut.estimate_jobs JOB --params FILE     # one rank of `run_units`' launch
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from . import estimators
from .config import Params, load, to_yaml
from .distributed import in_torchrun, launch, process_group
from .estimators import EstimationContext
from .reference import ReferenceRun
from .storage import atomic_write_json, load_tensors, read_json, save_tensors


@dataclass(frozen=True)
class Unit:
    """One method on named orders: its final estimates, or (`steps` given) its estimates along those steps of each
    order and its parameter error at the last one against `truth` (a key of the units' true-parameters file)."""
    method: str
    orders: dict[str, list[int]]
    readout: str = "exact"
    k: int | None = None
    steps: dict[str, list[int]] | None = None
    cost: float = 1.0     # relative seconds, to share the units out evenly


def _final(ctx: EstimationContext, u: Unit) -> dict:
    est = estimators.estimate(ctx, list(u.orders.values()), u.method, u.readout, u.k)
    return {"eval_loss": dict(zip(u.orders, est.eval_loss.double().tolist())), "seconds": est.seconds,
            "non_finite_step": est.non_finite_step, "indicators": est.indicators}


def _along(ctx: EstimationContext, u: Unit, truth: dict[str, torch.Tensor]) -> dict:
    curves, param_error = {}, {}
    for name, order in u.orders.items():
        est, delta = estimators.estimate_along_steps(ctx, order, u.method, u.steps[name])
        curves[name] = {str(s): v for s, v in est.items()}
        gamma = truth[name].to(ctx.device)
        param_error[name] = float((ctx.params_at(delta) - gamma).norm() / (ctx.theta_T - gamma).norm())
    return {"along": curves, "param_error": param_error}


def _compute(ctx: EstimationContext, u: Unit, truth: dict[str, torch.Tensor]) -> dict:
    return _along(ctx, u, truth) if u.steps is not None else _final(ctx, u)


def _run_mine(params: Params, dirs: dict[str, str], units: list[Unit], truth_file: str | None,
              out_dir: Path) -> None:
    """One torchrun rank: its share of `units`, each result written as unit_I.json."""
    with process_group() as ranks:
        mine = ranks.mine(list(range(len(units))), [u.cost for u in units])
        if mine:
            ctx = EstimationContext(ReferenceRun(params, Path(dirs["data"]), Path(dirs["reference"])),
                                    Path(dirs["cache"]), Path(dirs["projection"]))
            truth = load_tensors(Path(truth_file))[0] if truth_file else {}
            for i in tqdm(mine, desc=f"estimate rank {ranks.rank}/{ranks.world}", position=ranks.rank):
                atomic_write_json(out_dir / f"unit_{i:04d}.json", _compute(ctx, units[i], truth))
        ranks.barrier()


def run_units(ctx: EstimationContext, dirs: dict[str, Path], units: Sequence[Unit],
              truth: dict[str, torch.Tensor] | None = None) -> list[dict]:
    """Every unit's result, in the units' order: in `parallel.workers` torchrun ranks when there is more than
    one unit (a rank costs an interpreter start and a context of its own), otherwise with `ctx` here. `dirs`:
    the stage's data, reference, cache and projection folders; `truth`: the true final parameters (flat) of the
    orders the trajectory units name."""
    units, truth = list(units), truth or {}
    workers = min(ctx.params.parallel.workers, len(units))
    if workers <= 1 or in_torchrun():
        return [_compute(ctx, u, truth) for u in units]
    with tempfile.TemporaryDirectory(prefix="fut-estimate-") as tmp:
        truth_file = None
        if truth:
            truth_file = str(Path(tmp) / "truth.safetensors")
            save_tensors(Path(truth_file), truth, {})
        atomic_write_json(Path(tmp) / "job.json", {"dirs": {k: str(v) for k, v in dirs.items()},
                                                   "units": [asdict(u) for u in units], "truth": truth_file,
                                                   "out_dir": tmp})
        launch("fut.estimate_jobs", [str(Path(tmp) / "job.json")], workers, "estimate", to_yaml(ctx.params))
        return [read_json(Path(tmp) / f"unit_{i:04d}.json") for i in range(len(units))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fut.estimate_jobs")
    ap.add_argument("job", type=Path)
    ap.add_argument("--params", type=Path, required=True)
    args = ap.parse_args(argv)
    job = read_json(args.job)
    _run_mine(load(args.params), job["dirs"], [Unit(**u) for u in job["units"]], job["truth"], Path(job["out_dir"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
