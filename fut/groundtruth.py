"""The retraining oracle and the ground-truth stage.

`Oracle.retrain(order, readouts)` replays the window from the stored window-start state through `run_window`, the
code path of the reference run, and reads out what was asked. The ground truth retrains the dev orders (every
choice of the suite is made on them) and, apart, the test orders (read only by the final scoring,
fut/protocol.py), spread over `parallel.workers` torch.distributed ranks (fut/distributed.py; in this process when
one order is left or workers is 1). Each order's result is written atomically to its own file with the reference
run's key, so an interrupted stage resumes with the orders still missing and never reads a half-written one. The
ranks die with the stage's process (Linux), so a killed stage leaves no retrain running.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .config import Params, load, to_yaml
from .costs import peak_rss_mb
from .device import describe_device
from .distributed import launch, process_group
from .evaluation import eval_losses, ppl, window_batch_losses
from .reference import ReferenceRun
from .schedules import validate_any
from .storage import atomic_write_json, read_json, remove_temporaries
from .training import Trainer, TrainState, run_window, sequence_losses

log = logging.getLogger(__name__)

# What a retrain can read out beyond the final eval loss: every window batch's loss, every eval sequence's loss
# (the generalization study), every window sequence's loss (memorization of one sequence), and the eval loss
# every `eval_every` steps along the window.
READOUTS = ("batches", "sequences", "window_sequences", "trajectory")


class Oracle:
    """Ground truth for any order: real retraining of the window, same code path as the reference run."""

    def __init__(self, run: ReferenceRun):
        self.run, self.params, self.prepared = run, run.params, run.prepared
        self.start = run.start
        self.device = describe_device(run.device)

    def trainer(self, order: Sequence, on_step=None, start: TrainState | None = None) -> Trainer:
        """The window trained in `order` (from the reference's window start, or `start`): batch indices, E·T of
        them for E epochs, or sample-level batches (fut/schedules.py)."""
        order = validate_any(order, self.run.T, self.run.batch_size)
        return run_window(self.params, self.prepared, start or self.start, order, on_step=on_step)

    def eval_loss(self, order: Sequence[int]) -> float:
        """The final mixed eval loss of `order`, and nothing else: the retrain an estimate is timed against."""
        return eval_losses(self.trainer(order), self.prepared)[0]

    def retrain(self, order: Sequence[int], readouts: Sequence[str] = (), eval_every: int = 0,
                start: TrainState | None = None) -> dict:
        """Final eval loss/PPL and per-domain eval losses, plus the `readouts` asked for (see READOUTS), the
        seconds and CPU seconds it took and the process's peak memory."""
        t0, cpu = time.perf_counter(), time.process_time()
        T, curve = len(order), {}

        def on_step(t: int, trainer: Trainer, loss: float) -> None:
            if eval_every and t % eval_every == 0 and t < T:
                curve[t] = eval_losses(trainer, self.prepared)[0]

        trainer = self.trainer(order, on_step if "trajectory" in readouts else None, start)
        loss, per_domain = eval_losses(trainer, self.prepared)
        out = {"order": list(order), "eval_loss": loss, "eval_ppl": ppl(loss), "domain_eval_loss": per_domain}
        if "batches" in readouts:
            out["batch_losses"] = window_batch_losses(trainer, self.prepared)
        if "sequences" in readouts:
            out["eval_sequence_losses"] = sequence_losses(trainer, self.prepared.eval_mixed).tolist()
        if "window_sequences" in readouts:
            window = self.prepared.window
            out["window_sequence_losses"] = sequence_losses(trainer, window.reshape(-1, window.shape[-1])).tolist()
        if "trajectory" in readouts:
            curve[T] = loss
            out["trajectory"] = {"step": list(curve), "eval_loss": list(curve.values())}
        return {**out, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu,
                "peak_mb": peak_rss_mb(), "reference_hash": self.run.key, "device": self.device,
                "readouts": sorted(readouts), "eval_every": eval_every}


def result_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.json"


def is_complete(path: Path, order: list[int], key: str, expected: dict | None = None) -> bool:
    """A stored result counts only if it is for this order and this reference run (and has the `expected`
    values, e.g. the eval_every its curve was read with)."""
    if not path.is_file():
        return False
    try:
        r = read_json(path)
    except ValueError:
        return False
    return (r.get("order") == order and r.get("reference_hash") == key
            and all(r.get(k) == v for k, v in (expected or {}).items()))


@dataclass(frozen=True)
class RetrainSet:
    """Named orders to retrain into `out_dir`, with these readouts (see READOUTS) and curve spacing."""
    orders: dict[str, list[int]]
    out_dir: Path
    readouts: Sequence[str] = ()
    eval_every: int = 0
    desc: str = "retrain"

    @property
    def expected(self) -> dict:
        return {"readouts": sorted(self.readouts), "eval_every": self.eval_every}


def retrain_all(params: Params, orders: dict[str, list[int]], data_dir: Path, ref_dir: Path, out_dir: Path,
                readouts: Sequence[str] = (), eval_every: int = 0, desc: str = "retrain",
                progress: bool = True) -> dict[str, dict]:
    """Retrain every named order not already stored in `out_dir` (for this reference run, with these readouts);
    returns all results by name (see `retrain_sets`)."""
    return retrain_sets(params, [RetrainSet(orders, Path(out_dir), tuple(readouts), eval_every, desc)], data_dir,
                        ref_dir, progress)[0]


def retrain_sets(params: Params, sets: Sequence[RetrainSet], data_dir: Path, ref_dir: Path,
                 progress: bool = True) -> list[dict[str, dict]]:
    """Retrain every order of every set not already stored in its `out_dir`; returns each set's results by name.
    As a torchrun rank, this rank's share of all sets' orders; otherwise in this process, or in
    `parallel.workers` torchrun ranks launched once for all of them when more than one order is left (a rank costs
    an interpreter start). Each `out_dir` exists afterwards even when there was nothing to retrain (a DVC output)."""
    for s in sets:
        s.out_dir.mkdir(parents=True, exist_ok=True)
    run = ReferenceRun(params, data_dir, ref_dir)
    workers = params.parallel.workers
    with process_group() as ranks:
        if ranks.is_main:
            for s in sets:
                remove_temporaries(s.out_dir)
        ranks.barrier()
        todo = [{n: o for n, o in s.orders.items()
                 if not is_complete(result_path(s.out_dir, n), o, run.key, s.expected)} for s in sets]
        ranks.barrier()   # every rank has its list before any rank writes a result
        if ranks.is_main:
            for s, left in zip(sets, todo):
                log.info("%s: %d of %d orders already stored, %d to retrain", s.desc, len(s.orders) - len(left),
                         len(s.orders), len(left))
                stale = [n for n in left if result_path(s.out_dir, n).exists()]
                if stale:
                    log.warning("stored results of %s are unreadable or from another run; retraining them",
                                ", ".join(stale))
        items = [(k, name) for k, left in enumerate(todo) for name in left]
        if ranks.world == 1 and workers > 1 and len(items) > 1:
            with tempfile.TemporaryDirectory(prefix="fut-retrain-") as tmp:
                job = Path(tmp) / "job.json"
                atomic_write_json(job, {"data_dir": str(data_dir), "ref_dir": str(ref_dir),
                                        "sets": [{**asdict(s), "orders": left, "out_dir": str(s.out_dir),
                                                  "readouts": list(s.readouts)} for s, left in zip(sets, todo)]})
                launch("fut.groundtruth", [str(job)], min(workers, len(items)), "; ".join(s.desc for s in sets),
                       to_yaml(params))
        elif items:
            oracle = Oracle(run)
            mine = ranks.mine(items, [1.0] * len(items))
            desc = " / ".join(sets[k].desc for k in sorted({k for k, _ in mine}))
            bar_desc = desc if ranks.world == 1 else f"{desc} rank {ranks.rank}/{ranks.world}"
            for k, name in tqdm(mine, desc=bar_desc, position=ranks.rank, disable=not progress):
                s = sets[k]
                atomic_write_json(result_path(s.out_dir, name),
                                  {"name": name, **oracle.retrain(todo[k][name], s.readouts, s.eval_every)})
            ranks.barrier()
    return [{n: read_json(result_path(s.out_dir, n)) for n in s.orders} for s in sets]


def main(argv: list[str] | None = None) -> int:
    """One torchrun rank of `retrain_sets`' launch: `python -m fut.groundtruth JOB --params FILE`."""
    ap = argparse.ArgumentParser(prog="python -m fut.groundtruth")
    ap.add_argument("job", type=Path)
    ap.add_argument("--params", type=Path, required=True)
    args = ap.parse_args(argv)
    job = read_json(args.job)
    sets = [RetrainSet(**{**s, "out_dir": Path(s["out_dir"])}) for s in job["sets"]]
    retrain_sets(load(args.params), sets, Path(job["data_dir"]), Path(job["ref_dir"]))
    return 0


def noise_floor(oracle: Oracle, seed: int = 0) -> dict:
    """How far the identity order's outcome moves under float noise alone: θ_0 perturbed by one float32 ulp
    (relative 2^-23, random signs), and the window trained with another thread count. Training has no other
    per-run randomness (no dropout, fixed batches), so this is the spread two runs of the same order can show.
    The parameter change is relative to how far the window moves the parameters."""
    T = oracle.run.T
    s = oracle.start

    def outcome(start: TrainState) -> tuple[float, torch.Tensor]:
        trainer = oracle.trainer(range(T), start=start)
        theta = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
        return ppl(eval_losses(trainer, oracle.prepared)[0]), theta

    base_ppl, base = outcome(s)
    moved = (base - torch.cat([t.reshape(-1) for t in s.theta.values()])).norm()
    gen = torch.Generator().manual_seed(seed)
    theta = {k: t * (1 + 2.0 ** -23 * (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1)) for k, t in s.theta.items()}
    rounding_ppl, rounding = outcome(TrainState(theta, s.m, s.v, s.adam_step))
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads != 2 else 1)
    try:
        threads_ppl, other = outcome(s)
    finally:
        torch.set_num_threads(threads)
    return {"rounding_perturbation_abs_ppl": abs(rounding_ppl - base_ppl),
            "rounding_perturbation_param_rel": float((rounding - base).norm() / moved),
            "thread_count_abs_ppl": abs(threads_ppl - base_ppl),
            "thread_count_param_rel": float((other - base).norm() / moved)}


if __name__ == "__main__":
    sys.exit(main())
