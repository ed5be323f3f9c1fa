"""What the application stages (curriculum, memorization, domain order) share: retraining new orders with
the readouts they need, estimated readouts at the estimated parameters, and the cost of each step.

Truth is reused wherever the ground-truth stage already paid for it (an order is looked up by its batch
indices, not its name); only orders it never trained are retrained here, like the ground truth
(`groundtruth.retrain_all`): over torchrun ranks that die with the stage, one resumable file per order.
"""
from __future__ import annotations

import re
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from . import estimators
from .config import READOUT_METHODS, Params
from .estimators import EstimationContext
from .evaluation import eval_losses, ppl, window_batch_losses
from .groundtruth import Oracle, retrain_all
from .training import sequence_losses

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (since the last `reset_peak_rss`, where Linux allows it)."""
    if _STATUS.is_file():
        found = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
        if found:
            return int(found.group(1)) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start a new peak-memory measurement where Linux allows it (≥ 4.0); elsewhere the peak stays the
    process's lifetime peak."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


@dataclass
class Cost:
    """Wall seconds, CPU seconds of this process (steadier than wall time when other jobs share the cores)
    and peak resident memory (MB) of one step of a stage."""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_mb: float = 0.0

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "peak_mb": self.peak_mb}


@contextmanager
def measured() -> Iterator[Cost]:
    """Wall time and peak RSS of the block (this process; workers report their own peaks)."""
    cost = Cost()
    reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield cost
    finally:
        cost.seconds, cost.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        cost.peak_mb = peak_rss_mb()


def finite_or_none(x: float) -> float | None:
    """A diverged estimate (inf/NaN) is recorded as null: NaN is not JSON."""
    return float(x) if np.isfinite(x) else None


def ppl_or_none(loss: float) -> float | None:
    """Perplexity of a loss, or null where the estimate diverged (or overflows)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return finite_or_none(np.exp(loss))


def bootstrap_mean_ci(values: Sequence[float], n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean by resampling `values` (one value: that value)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 1:
        return float(x[0]), float(x[0])
    means = np.random.default_rng(seed).choice(x, (n_boot, len(x))).mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def domain_groups(window_domains: Sequence[int]) -> dict[int, list[int]]:
    """Window batch indices by domain index (-1: batches mixed from every domain)."""
    out: dict[int, list[int]] = {}
    for j, d in enumerate(window_domains):
        out.setdefault(d, []).append(j)
    return out


# --- truth ---------------------------------------------------------------------------------------------

def retrain_readouts(oracle: Oracle, order: Sequence[int]) -> dict:
    """The ground truth's readouts of one retrained order, plus the loss of every eval sequence (mixed eval
    set order) for the generalization study, and the worker's peak memory."""
    start, cpu = time.perf_counter(), time.process_time()
    trainer = oracle.retrain_trainer(order)
    loss, per_domain = eval_losses(trainer, oracle.prepared)
    return {"order": list(order), "eval_loss": loss, "eval_ppl": ppl(loss), "domain_eval_loss": per_domain,
            "batch_losses": window_batch_losses(trainer, oracle.prepared),
            "eval_sequence_losses": sequence_losses(trainer, oracle.prepared.eval_mixed).tolist(),
            "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "peak_mb": peak_rss_mb(),
            "reference_hash": oracle.results_key}


def retrain_orders(params: Params, orders: dict[str, list[int]], data_dir: Path, ref_dir: Path, out_dir: Path,
                   workers: int, desc: str = "retrain", progress: bool = True) -> dict[str, dict]:
    """Retrain every named order not already stored in `out_dir` with `retrain_readouts`; all results."""
    return retrain_all(params, orders, data_dir, ref_dir, out_dir, workers, "sequences", desc=desc,
                       progress=progress)


def truth_for(orders: dict[str, list[int]], known: dict[str, dict], retrain) -> tuple[dict[str, dict], list[str]]:
    """True results of the named orders: the stored result of the same order where `known` has one, the
    rest from `retrain(missing orders)` (called even with none missing). Returns the results and the names
    that were retrained."""
    by_order = {tuple(r["order"]): r for r in known.values()}
    missing = {n: o for n, o in orders.items() if tuple(o) not in by_order}
    fresh = retrain(missing)
    return {n: fresh[n] if n in fresh else by_order[tuple(o)] for n, o in orders.items()}, list(missing)


# --- estimates -----------------------------------------------------------------------------------------

@torch.no_grad()
def estimated_readouts(ctx: EstimationContext, orders: Sequence[Sequence[int]], method: str,
                       readouts: dict[str, torch.Tensor] | None = None, per_order: dict | None = None) -> dict:
    """`method`'s estimated mixed eval loss of each order, and the mean loss at the estimated parameters on
    each named set of sequences: `readouts` for every order, `per_order[i]` (name -> sequences) for order i.
    Non-finite where the method diverged."""
    if method not in READOUT_METHODS:
        raise ValueError(f"method {method!r} estimates no parameters, so it has no readout but the eval loss; "
                         f"use one of {', '.join(READOUT_METHODS)}")
    est = estimators.estimate(ctx, orders, method)
    out = {"eval_loss": est.eval_loss.double().numpy(), "seconds": est.seconds}
    for i in range(len(orders)):
        theta = ctx.params_at(None if est.deviation is None else est.deviation[i])
        sets = {**(readouts or {}), **((per_order or {}).get(i, {}))}
        for name, seqs in sets.items():
            out.setdefault(name, np.full(len(orders), np.nan))[i] = ctx.loss_on(theta, seqs)
    return out
