"""Stage 1: the reference run. Warm start, then the window in the identity order, storing θ_t, m_t, v_t
for every window step t = 0..T as safetensors with provenance metadata.

Each checkpoint also records what the run's summary needs from its step (the warm-start losses in checkpoint
0, the train and eval loss of step t in checkpoint t), so a killed run resumes after its last complete
checkpoint and ends with the same files and summary as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import logging
import time
from functools import cached_property
from pathlib import Path

import torch

from . import pretrained
from .adam import AdamHyper
from .config import Params
from .curvature import LossFunction
from .data import Prepared, load_prepared
from .device import autocast, configure_threads, describe_device, resolve_device
from .evaluation import eval_losses, window_batch_losses
from .flat import ParamLayout
from .model import build_model, count_parameters
from .storage import ArtefactMismatch, load_tensors, remove_temporaries, require_free_space, save_tensors, versions
from .training import Trainer, TrainState, run_window, warm_start, window_lrs

log = logging.getLogger(__name__)

TRAJECTORY_DIR = "trajectory"
REFERENCE_SECTIONS = ("model", "optimizer", "warmstart", "window", "train")


def reference_hash(params: Params, prepared: Prepared) -> str:
    """Provenance of the reference run: its prepared data and params, and a pretrained checkpoint by content."""
    own = prepared.prepare_hash + "/" + params.section_hash(*REFERENCE_SECTIONS)
    if params.model.pretrained is None:
        return own
    return own + "-" + pretrained.digest(Path(params.model.pretrained))


def checkpoint_path(ref_dir: Path, t: int) -> Path:
    return Path(ref_dir) / TRAJECTORY_DIR / f"step_{t:04d}.safetensors"


def save_checkpoint(ref_dir: Path, t: int, state: TrainState, ref_hash: str, record: dict | None = None) -> None:
    """`record`: the losses of this step the run's summary is rebuilt from when a run resumes."""
    save_tensors(checkpoint_path(ref_dir, t), state.tensors(),
                 {"reference_hash": ref_hash, "window_step": t, "adam_step": state.adam_step, "versions": versions(),
                  **(record or {})})


def load_checkpoint(ref_dir: Path, t: int, ref_hash: str) -> TrainState:
    """θ_t, m_t, v_t of the reference run; refused if it was built from other params or data, or corrupted."""
    tensors, meta = load_tensors(checkpoint_path(ref_dir, t), {"reference_hash": ref_hash, "window_step": t})
    return TrainState.from_tensors(tensors, meta["adam_step"])


def trajectory_digest(ref_dir: Path, steps: int) -> str:
    """sha256 of the stored values of θ_T, m_T, v_T (not of the file, whose header order may vary)."""
    tensors, _ = load_tensors(checkpoint_path(ref_dir, steps))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()[:16]


def trajectory_key(params: Params, prepared: Prepared, ref_dir: Path) -> str:
    """What results derived from the reference run depend on: its params and its actual stored trajectory, so
    a change in the training code with the same params invalidates them too."""
    return reference_hash(params, prepared) + "/" + trajectory_digest(ref_dir, params.window.steps)


def states_equal(a: TrainState, b: TrainState) -> bool:
    return a.adam_step == b.adam_step and all(
        torch.equal(x[k], y[k]) for x, y in ((a.theta, b.theta), (a.m, b.m), (a.v, b.v)) for k in x)


def checkpoint_bytes(params: Params, prepared: Prepared) -> int:
    """Size of one checkpoint file: θ, m, v in float32 (the header is a few kB more)."""
    return 3 * 4 * count_parameters(params.model, prepared.vocab_size, params.data.seq_len)


def stored_steps(ref_dir: Path, steps: int, ref_hash: str) -> list[dict]:
    """Metadata of the complete checkpoints 0, 1, ... of this run, up to the first missing, foreign or corrupted
    one (every tensor verified against its checksum): where an interrupted run resumes."""
    out = []
    for t in range(steps + 1):
        try:
            _, meta = load_tensors(checkpoint_path(ref_dir, t), {"reference_hash": ref_hash, "window_step": t})
        except (FileNotFoundError, ArtefactMismatch) as err:
            if checkpoint_path(ref_dir, t).exists():
                log.warning("checkpoint %d is not usable and will be recomputed: %s", t, err)
            break
        if "eval_loss" not in meta:   # written without the losses a resumed summary needs
            break
        out.append(meta)
    return out


def run_reference(params: Params, prepared: Prepared, ref_dir: Path, progress: bool = True) -> dict:
    """Train and store the reference trajectory, resuming after the last complete checkpoint of an interrupted
    run; returns the run's summary (losses, curves, and the timings of this run)."""
    configure_threads(params.train)
    device = resolve_device(params.train)     # a GPU profile on a machine without one stops here
    ref_hash = reference_hash(params, prepared)
    T = params.window.steps
    remove_temporaries(Path(ref_dir) / TRAJECTORY_DIR)
    done = stored_steps(ref_dir, T, ref_hash)
    require_free_space(ref_dir, (T + 1 - len(done)) * checkpoint_bytes(params, prepared),
                       f"the reference trajectory ({T + 1 - len(done)} checkpoints of θ, m, v)")
    log.info("reference run on %s (precision %s, %d threads); %d of %d checkpoints already stored",
             describe_device(device), params.train.precision, params.train.threads, len(done), T + 1)
    t0 = time.perf_counter()
    if done:
        start, warm_losses, warm_seconds = load_checkpoint(ref_dir, 0, ref_hash), done[0]["warm_losses"], None
    else:
        start, warm_losses = warm_start(params, prepared, progress=progress)
        warm_seconds = time.perf_counter() - t0
    probe = Trainer(params, prepared, start, params.window.lr, "constant", 1)
    eval0, domains0 = eval_losses(probe, prepared)
    batch_losses0 = window_batch_losses(probe, prepared)
    if not done:
        save_checkpoint(ref_dir, 0, start, ref_hash, {"warm_losses": warm_losses, "eval_loss": eval0})

    train_losses = [meta["train_loss"] for meta in done[1:]]
    eval_curve = [meta["eval_loss"] for meta in done] or [eval0]

    def on_step(t: int, trainer: Trainer, loss: float) -> None:
        train_losses.append(loss)
        eval_curve.append(eval_losses(trainer, prepared)[0])
        save_checkpoint(ref_dir, t, trainer.state(), ref_hash, {"train_loss": loss, "eval_loss": eval_curve[-1]})

    resume_at = max(len(done) - 1, 0)
    resume_from = load_checkpoint(ref_dir, resume_at, ref_hash) if resume_at else start
    t1 = time.perf_counter()
    final = run_window(params, prepared, resume_from, range(resume_at, T), on_step=on_step, progress=progress,
                       first_step=resume_at)
    window_seconds = time.perf_counter() - t1
    eval_end, domains_end = eval_losses(final, prepared)
    return {
        "reference_hash": ref_hash, "n_params": sum(t.numel() for t in start.theta.values()),
        "device": describe_device(device), "resumed_from_step": resume_at if done else None,
        "warm_losses": warm_losses, "warm_seconds": warm_seconds, "window_seconds": window_seconds,
        "window_train_losses": train_losses, "window_eval_losses": eval_curve,
        "eval_loss_start": eval0, "eval_loss_end": eval_end,
        "domain_eval_loss_start": domains0, "domain_eval_loss_end": domains_end,
        "batch_losses_start": batch_losses0, "adam_step_start": start.adam_step,
    }


class ReferenceRun:
    """The prepared data and the stored reference trajectory as every later stage reads them, loaded and checked
    once: the oracle, the cache builder and reader, the estimators and the plan share one. Window length T and
    batch size b are read here, from the prepared window's shape."""

    def __init__(self, params: Params, data_dir: Path, ref_dir: Path, device: torch.device | None = None):
        configure_threads(params.train)
        self.params, self.data_dir, self.ref_dir = params, Path(data_dir), Path(ref_dir)
        self.prepared = load_prepared(data_dir, params)
        self.hash = reference_hash(params, self.prepared)
        self.device = device or resolve_device(params.train)
        self.start = load_checkpoint(ref_dir, 0, self.hash)
        self.layout = ParamLayout.of(self.start.theta)
        self.T, self.batch_size = self.prepared.window.shape[0], self.prepared.window.shape[1]
        self.lrs = window_lrs(params)
        self.hp = AdamHyper.from_config(params.optimizer)
        self._flat: dict[int, tuple] = {}

    @cached_property
    def key(self) -> str:
        """What results derived from this run depend on: its params and its stored trajectory's values."""
        return trajectory_key(self.params, self.prepared, self.ref_dir)

    @cached_property
    def loss(self) -> LossFunction:
        model = build_model(self.params.model, self.prepared.vocab_size, self.params.data.seq_len,
                            self.prepared.eos_id)
        return LossFunction(model.to(self.device), self.layout)

    def state(self, t: int) -> TrainState:
        return self.start if t == 0 else load_checkpoint(self.ref_dir, t, self.hash)

    def flat(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """θ_t, m_t, v_t as flat vectors on the device, and the Adam step count; the last few are kept (replays
        walk forward)."""
        if t not in self._flat:
            s = self.state(t)
            self._flat = dict(list(self._flat.items())[-3:])
            self._flat[t] = (*(self.layout.flatten(x).to(self.device) for x in (s.theta, s.m, s.v)), s.adam_step)
        return self._flat[t]

    def theta(self, t: int) -> torch.Tensor:
        return self.flat(t)[0]

    @torch.no_grad()
    def loss_on(self, flat: torch.Tensor, seqs: torch.Tensor) -> float:
        """Mean next-token loss of `seqs` at the flat parameters (on the device, in the training's precision)."""
        with autocast(self.params.train, self.device):
            return float(self.loss.loss(flat.to(self.device), seqs.to(self.device)))

    def eval_losses_at(self, theta: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """The mixed eval set's loss at θ + δ for each row δ of `deltas` [n, d]: fut-subspace's exact readout."""
        theta, seqs = theta.to(self.device), self.prepared.eval_mixed.to(self.device)
        return torch.tensor([self.loss_on(theta + d.to(self.device), seqs) for d in deltas])
