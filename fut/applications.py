"""What the application stages (curriculum, memorization, domain order) share: the truth of the orders they need
(reused from the dev ground truth where it holds the same order, retrained otherwise) and an estimator's readouts
at its estimated parameters.

Truth is reused wherever the ground-truth stage already paid for it (an order is looked up by its batch indices,
not its name); only orders it never trained are retrained here, like the ground truth (`groundtruth.retrain_all`):
over torchrun ranks that die with the stage, one resumable file per order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import estimators
from .config import Params
from .estimators import EstimationContext
from .groundtruth import retrain_all
from .methods import parameter_methods

# A retrained application order reads out every window batch's loss and every eval sequence's loss.
APPLICATION_READOUTS = ("batches", "sequences")


def truth_for(params: Params, orders: dict[str, list[int]], known: dict[str, dict], data_dir: Path, ref_dir: Path,
              out_dir: Path, desc: str, needs: Sequence[str] = ("eval_loss",)) -> tuple[dict[str, dict], list[str]]:
    """True results of the named orders: the stored result of the same order where `known` (dev ground truth)
    has one with the values `needs`, the rest retrained into `out_dir` (called even with none missing: it is a
    DVC output). Returns the results and the names that were retrained."""
    usable = {tuple(r["order"]): r for r in known.values() if all(k in r for k in needs)}
    missing = {n: o for n, o in orders.items() if tuple(o) not in usable}
    fresh = retrain_all(params, missing, data_dir, ref_dir, out_dir, APPLICATION_READOUTS, 0, desc)
    return {n: fresh[n] if n in fresh else usable[tuple(o)] for n, o in orders.items()}, list(missing)


@torch.no_grad()
def estimated_readouts(ctx: EstimationContext, orders: Sequence[Sequence[int]], method: str,
                       readouts: dict[str, torch.Tensor] | None = None, per_order: dict | None = None) -> dict:
    """`method`'s estimated mixed eval loss of each order (its own readout), and the mean loss at the estimated
    parameters on each named set of sequences: `readouts` for every order, `per_order[i]` (name -> sequences) for
    order i. Non-finite where the method diverged."""
    if method not in parameter_methods():
        raise ValueError(f"method {method!r} estimates no parameters, so it has no readout but the eval loss; "
                         f"use one of {', '.join(parameter_methods())}")
    est = estimators.estimate(ctx, orders, method)
    out = {"eval_loss": est.eval_loss.double().numpy(), "seconds": est.seconds}
    if not readouts and not per_order:
        return out
    deviation = est.deviation
    if deviation is None and method != "naive":       # a method whose own readout did not need the parameters
        deviation = estimators.deviation(ctx, torch.tensor([list(o) for o in orders]), method).cpu()
    for i in range(len(orders)):
        theta = ctx.params_at(None if deviation is None else deviation[i])
        sets = {**(readouts or {}), **((per_order or {}).get(i, {}))}
        for name, seqs in sets.items():
            out.setdefault(name, np.full(len(orders), np.nan))[i] = ctx.loss_on(theta, seqs)
    return out
