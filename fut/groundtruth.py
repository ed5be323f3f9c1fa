"""The retraining oracle and the ground-truth stage.

`Oracle.retrain(order)` replays the window from the stored window-start state through `run_window`, the code
path of the reference run. The ground truth retrains a seeded set of orders in worker processes (in its own
process when one order is left or `groundtruth.workers` is 1); each order's result is written atomically to
its own file with the reference hash, so an interrupted stage resumes with the orders still missing and never
reads a half-written one. Workers die with the stage's process (Linux), so a killed stage leaves no retrain
running.
"""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .config import Params
from .data import Prepared, load_prepared
from .device import configure_threads, describe_device, resolve_device
from .evaluation import eval_losses, ppl, window_batch_losses
from .orders import validate_order
from .reference import load_checkpoint, reference_hash, trajectory_key
from .storage import atomic_write_json, read_json, remove_temporaries
from .training import Trainer, TrainState, run_window

log = logging.getLogger(__name__)


class Oracle:
    """Ground truth for any order: real retraining of the window, same code path as the reference run."""

    def __init__(self, params: Params, data_dir: Path, ref_dir: Path):
        configure_threads(params.train)
        self.params = params
        self.prepared: Prepared = load_prepared(data_dir, params)
        self.ref_hash = reference_hash(params, self.prepared)
        self.results_key = trajectory_key(params, self.prepared, ref_dir)
        self.start = load_checkpoint(ref_dir, 0, self.ref_hash)
        self.device = describe_device(resolve_device(params.train))

    def retrain_trainer(self, order: Sequence[int], on_step=None, start: TrainState | None = None) -> Trainer:
        order = validate_order(order, self.params.window.steps, permutation=False)
        return run_window(self.params, self.prepared, start or self.start, order, on_step=on_step)

    def retrain(self, order: Sequence[int], eval_every: int = 0, start: TrainState | None = None) -> dict:
        """Final eval loss/PPL, per-domain losses, every window batch's loss, and the eval loss every
        `eval_every` steps (0: only at the end)."""
        t0 = time.perf_counter()
        curve: dict[int, float] = {}

        def on_step(t: int, trainer: Trainer, loss: float) -> None:
            if eval_every and t % eval_every == 0 and t < self.params.window.steps:
                curve[t] = eval_losses(trainer, self.prepared)[0]

        trainer = self.retrain_trainer(order, on_step, start)
        loss, per_domain = eval_losses(trainer, self.prepared)
        curve[self.params.window.steps] = loss
        return {"order": list(order), "eval_loss": loss, "eval_ppl": ppl(loss), "domain_eval_loss": per_domain,
                "batch_losses": window_batch_losses(trainer, self.prepared),
                "trajectory": {"step": list(curve), "eval_loss": list(curve.values())},
                "seconds": time.perf_counter() - t0, "reference_hash": self.results_key, "device": self.device,
                "eval_every": eval_every}


_worker: Oracle | None = None


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this worker when its parent (pid `parent`) dies: a killed stage must not leave
    workers retraining (or holding a GPU) in the background. A parent that died before the request was made
    (while this worker was still starting) is caught by checking it is still our parent. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)


def _init_worker(params: Params, data_dir: Path, ref_dir: Path, parent: int) -> None:
    global _worker
    die_with_parent(parent)
    _worker = Oracle(params, data_dir, ref_dir)


def _retrain_in_worker(name: str, order: list[int], eval_every: int) -> tuple[str, dict]:
    return name, _worker.retrain(order, eval_every)


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


def run_groundtruth(params: Params, orders: dict[str, list[int]], data_dir: Path, ref_dir: Path, out_dir: Path,
                    eval_every: int, workers: int, progress: bool = True) -> dict[str, dict]:
    """Retrain every order not already stored; returns all results by order name."""
    prepared = load_prepared(data_dir, params)
    key = trajectory_key(params, prepared, ref_dir)
    remove_temporaries(out_dir)
    todo = {n: o for n, o in orders.items()
            if not is_complete(result_path(out_dir, n), o, key, {"eval_every": eval_every})}
    log.info("ground truth: %d of %d orders already stored, %d to retrain", len(orders) - len(todo), len(orders),
             len(todo))
    stale = [n for n in todo if result_path(out_dir, n).exists()]
    if stale:
        log.warning("stored results of %s are unreadable or from another run; retraining them", ", ".join(stale))
    bar = tqdm(total=len(orders), initial=len(orders) - len(todo), desc="ground truth", disable=not progress)
    if len(todo) == 1 or (todo and workers == 1):   # a worker process costs an interpreter start: only in parallel
        oracle = Oracle(params, data_dir, ref_dir)
        for name, order in todo.items():
            atomic_write_json(result_path(out_dir, name), {"name": name, **oracle.retrain(order, eval_every)})
            bar.update()
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                                    initargs=(params, data_dir, ref_dir, os.getpid())) as pool:
            futures = [pool.submit(_retrain_in_worker, n, o, eval_every) for n, o in todo.items()]
            for fut in cf.as_completed(futures):
                name, result = fut.result()
                atomic_write_json(result_path(out_dir, name), {"name": name, **result})
                bar.update()
    bar.close()
    return {n: read_json(result_path(out_dir, n)) for n in orders}


def noise_floor(oracle: Oracle, seed: int = 0) -> dict:
    """How far the identity order's outcome moves under float noise alone: θ_0 perturbed by one float32 ulp
    (relative 2^-23, random signs), and the window trained with another thread count. Training has no other
    per-run randomness (no dropout, fixed batches), so this is the spread two runs of the same order can show.
    The parameter change is relative to how far the window moves the parameters."""
    T = oracle.params.window.steps
    s = oracle.start

    def outcome(start: TrainState) -> tuple[float, torch.Tensor]:
        trainer = oracle.retrain_trainer(range(T), start=start)
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
