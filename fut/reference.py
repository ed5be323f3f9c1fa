"""Stage 1: the reference run. Warm start, then the window in the identity order, storing θ_t, m_t, v_t
for every window step t = 0..T as safetensors with provenance metadata."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from .config import Params
from .data import Prepared
from .device import configure_threads
from .evaluation import eval_losses, window_batch_losses
from .storage import load_tensors, save_tensors, versions
from .training import Trainer, TrainState, run_window, warm_start

TRAJECTORY_DIR = "trajectory"
REFERENCE_SECTIONS = ("model", "optimizer", "warmstart", "window", "train")


def reference_hash(params: Params, prepared: Prepared) -> str:
    return prepared.prepare_hash + "/" + params.section_hash(*REFERENCE_SECTIONS)


def checkpoint_path(ref_dir: Path, t: int) -> Path:
    return Path(ref_dir) / TRAJECTORY_DIR / f"step_{t:04d}.safetensors"


def save_checkpoint(ref_dir: Path, t: int, state: TrainState, ref_hash: str) -> None:
    save_tensors(checkpoint_path(ref_dir, t), state.tensors(),
                 {"reference_hash": ref_hash, "window_step": t, "adam_step": state.adam_step, "versions": versions()})


def load_checkpoint(ref_dir: Path, t: int, ref_hash: str) -> TrainState:
    """θ_t, m_t, v_t of the reference run; refused if it was built from other params or data."""
    tensors, meta = load_tensors(checkpoint_path(ref_dir, t), {"reference_hash": ref_hash, "window_step": t})
    return TrainState.from_tensors(tensors, meta["adam_step"])


def trajectory_key(params: Params, prepared: Prepared, ref_dir: Path) -> str:
    """What results derived from the reference run depend on: its params and its actual stored trajectory
    (sha256 of the values of θ_T, m_T, v_T, not of the file, whose header order may vary), so a change in the
    training code with the same params invalidates them too."""
    tensors, _ = load_tensors(checkpoint_path(ref_dir, params.window.steps))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return reference_hash(params, prepared) + "/" + digest.hexdigest()[:16]


def states_equal(a: TrainState, b: TrainState) -> bool:
    return a.adam_step == b.adam_step and all(
        torch.equal(x[k], y[k]) for x, y in ((a.theta, b.theta), (a.m, b.m), (a.v, b.v)) for k in x)


def run_reference(params: Params, prepared: Prepared, ref_dir: Path, progress: bool = True) -> dict:
    """Train and store the reference trajectory; returns the run's summary (losses, curves, timings)."""
    configure_threads(params.train)
    ref_hash = reference_hash(params, prepared)
    t0 = time.perf_counter()
    start, warm_losses = warm_start(params, prepared, progress=progress)
    warm_seconds = time.perf_counter() - t0
    save_checkpoint(ref_dir, 0, start, ref_hash)

    probe = Trainer(params, prepared, start, params.window.lr, "constant", 1)
    eval0, domains0 = eval_losses(probe, prepared)
    batch_losses0 = window_batch_losses(probe, prepared)

    train_losses, eval_curve = [], [eval0]

    def on_step(t: int, trainer: Trainer, loss: float) -> None:
        train_losses.append(loss)
        eval_curve.append(eval_losses(trainer, prepared)[0])
        save_checkpoint(ref_dir, t, trainer.state(), ref_hash)

    t1 = time.perf_counter()
    final = run_window(params, prepared, start, range(params.window.steps), on_step=on_step, progress=progress)
    window_seconds = time.perf_counter() - t1
    eval_end, domains_end = eval_losses(final, prepared)
    return {
        "reference_hash": ref_hash, "n_params": sum(t.numel() for t in start.theta.values()),
        "warm_losses": warm_losses, "warm_seconds": warm_seconds, "window_seconds": window_seconds,
        "window_train_losses": train_losses, "window_eval_losses": eval_curve,
        "eval_loss_start": eval0, "eval_loss_end": eval_end,
        "domain_eval_loss_start": domains0, "domain_eval_loss_end": domains_end,
        "batch_losses_start": batch_losses0, "adam_step_start": start.adam_step,
    }
