"""Readouts of a trained model: eval loss and perplexity, per domain, and per window batch."""
from __future__ import annotations

import math

import numpy as np

from .data import Prepared
from .training import Trainer, sequence_losses


def ppl(loss: float) -> float:
    return math.exp(loss)


def finite_or_none(x: float) -> float | None:
    """A diverged estimate (inf/NaN) is recorded as null: NaN is not JSON."""
    return float(x) if np.isfinite(x) else None


def ppl_or_none(loss: float) -> float | None:
    """Perplexity of a loss, or null where the estimate diverged (or overflows)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return finite_or_none(np.exp(loss))


def eval_losses(trainer: Trainer, prepared: Prepared) -> tuple[float, dict[str, float]]:
    """Mixed eval loss (all domains' eval sets together) and each domain's, from one forward pass."""
    losses = sequence_losses(trainer, prepared.eval_mixed)
    per_domain, start = {}, 0
    for d in prepared.domains:
        n = len(prepared.eval_sets[d])
        per_domain[d] = float(losses[start: start + n].mean())
        start += n
    return float(losses.mean()), per_domain


def window_batch_losses(trainer: Trainer, prepared: Prepared) -> list[float]:
    """Loss on each window batch B_j (what the model retains of it)."""
    T, b, L = prepared.window.shape
    return sequence_losses(trainer, prepared.window.reshape(T * b, L)).view(T, b).mean(dim=1).tolist()
