"""Training with `torch.optim.AdamW`: the warm start, the order window, and evaluation.

The reference run and every retrain go through `run_window`, starting from the same stored window-start state,
so retraining the identity order reproduces the reference trajectory bit for bit on the CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .config import ConfigError, Params, Schedule
from .data import Prepared
from .device import autocast, resolve_device
from .model import build_model
from .schedules import batch_tensors


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared in a stage's computation; the message names the step and the tensor."""


def first_non_finite(named: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first tensor holding a NaN or inf, or None. One sum per tensor and a single device sync; a
    sum that overflows is confirmed elementwise, so huge finite values are not mistaken for inf."""
    names = list(named)
    sums = torch.stack([named[n].detach().sum().float() for n in names])
    if bool(torch.isfinite(sums).all()):
        return None
    return next((n for n, s in zip(names, sums) if not torch.isfinite(s) and not torch.isfinite(named[n]).all()),
                None)


@dataclass
class TrainState:
    """Parameters and AdamW moments by parameter name, plus the optimizer's step count."""
    theta: dict[str, torch.Tensor]
    m: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    adam_step: int

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"theta.{k}": t for k, t in self.theta.items()}, **{f"m.{k}": t for k, t in self.m.items()},
                **{f"v.{k}": t for k, t in self.v.items()}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], adam_step: int) -> "TrainState":
        part = lambda prefix: {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        return cls(part("theta."), part("m."), part("v."), adam_step)


def lr_factor(schedule: Schedule, step: int, total: int) -> float:
    """Multiplier of the base lr at `step` (0-based) of `total`; cosine and linear decay to 10%."""
    if schedule == "constant":
        return 1.0
    frac = step / total
    if schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0 - 0.9 * frac


def window_lrs(params: Params, epochs: int = 1) -> list[float]:
    """η_t for every window step (of `epochs` passes, the schedule spanning them all), as the estimators need it."""
    w = params.window
    total = w.steps * epochs
    return [w.lr * lr_factor(w.schedule, t, total) for t in range(total)]


class Trainer:
    """A model and its AdamW optimizer on the resolved device; one `step` is one training step. `first_step`
    resumes a schedule part-way (the lr of step s is the same float as in an uninterrupted run). A step whose
    loss, gradients, parameters or moments hold a NaN or inf stops with NonFiniteError naming the `phase`, the
    step and the tensor."""

    def __init__(self, params: Params, prepared: Prepared, state: TrainState | None, lr: float,
                 schedule: Schedule, total_steps: int, phase: str = "window", first_step: int = 0):
        self.params = params
        self.phase, self.steps_done = phase, first_step
        self.device = resolve_device(params.train)
        self.model = build_model(params.model, prepared.vocab_size, params.data.seq_len, prepared.eos_id)
        self.model.to(self.device)
        o = params.optimizer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay, foreach=False)
        self.named = dict(self.model.named_parameters())   # tied weights appear once
        if state is not None:
            self._load(state)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(schedule, first_step + s, total_steps))

    def _load(self, state: TrainState) -> None:
        with torch.no_grad():
            for name, p in self.named.items():
                p.copy_(state.theta[name])
        if state.adam_step > 0:
            for name, p in self.named.items():
                self.optimizer.state[p] = {"step": torch.tensor(float(state.adam_step)),
                                           "exp_avg": state.m[name].to(self.device).clone(),
                                           "exp_avg_sq": state.v[name].to(self.device).clone()}

    def state(self) -> TrainState:
        theta, m, v, step = {}, {}, {}, 0
        for name, p in self.named.items():
            s = self.optimizer.state.get(p)
            theta[name] = p.detach().cpu().clone()
            m[name] = s["exp_avg"].detach().cpu().clone() if s else torch.zeros_like(theta[name])
            v[name] = s["exp_avg_sq"].detach().cpu().clone() if s else torch.zeros_like(theta[name])
            step = int(s["step"].item()) if s else 0
        return TrainState(theta, m, v, step)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        with autocast(self.params.train, self.device):
            return self.model(input_ids=batch, labels=batch).loss

    def step(self, batch: torch.Tensor) -> float:
        self.model.train()
        self.steps_done += 1
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        self._stop_if_non_finite({"the training loss": loss,
                                  **{f"the gradient of {n!r}": p.grad for n, p in self.named.items()
                                     if p.grad is not None}})
        if self.params.optimizer.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.params.optimizer.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        after = {}
        for n, p in self.named.items():
            s = self.optimizer.state[p]
            after.update({f"the parameter {n!r}": p, f"the AdamW first moment of {n!r}": s["exp_avg"],
                          f"the AdamW second moment of {n!r}": s["exp_avg_sq"]})
        self._stop_if_non_finite(after)
        return float(loss.detach())

    def _stop_if_non_finite(self, named: dict[str, torch.Tensor]) -> None:
        bad = first_non_finite(named)
        if bad is None:
            return
        cause = first_non_finite(self.named) if "parameter" not in bad else None
        raise NonFiniteError(f"{self.phase} step {self.steps_done}: {bad} holds NaN or inf"
                             + (f" (so does the parameter {cause!r})" if cause else "")
                             + "; training stopped before it reached a stored artefact (lower the lr, or check the "
                               "data and the start state)")


def initial_state(params: Params, prepared: Prepared) -> TrainState:
    return Trainer(params, prepared, None, 1.0, "constant", 1).state()


def warm_start(params: Params, prepared: Prepared, progress: bool = True) -> tuple[TrainState, list[float]]:
    """Pretrain on the warm-start split (seeded batches, epochs reshuffled); returns the carried state."""
    ws = params.warmstart
    if not ws.enabled:
        return initial_state(params, prepared), []
    pool = prepared.warmstart
    if len(pool) < ws.batch_size:
        raise ConfigError(f"params: warmstart.batch_size = {ws.batch_size} is larger than the warm-start split "
                          f"({len(pool)} sequences); lower it or raise corpus.max_chars_per_domain")
    trainer = Trainer(params, prepared, None, ws.lr, ws.schedule, ws.steps, phase="warm start")
    gen = torch.Generator().manual_seed(ws.seed)
    perm, pos, losses = torch.randperm(len(pool), generator=gen), 0, []
    for _ in tqdm(range(ws.steps), desc="warm start", disable=not progress):
        if pos + ws.batch_size > len(pool):
            perm, pos = torch.randperm(len(pool), generator=gen), 0
        losses.append(trainer.step(pool[perm[pos: pos + ws.batch_size]]))
        pos += ws.batch_size
    return trainer.state(), losses


StepHook = Callable[[int, Trainer, float], None]


def run_window(params: Params, prepared: Prepared, start: TrainState, order: Sequence,
               on_step: StepHook | None = None, progress: bool = False, first_step: int = 0) -> Trainer:
    """Train the window in `order` from `start`: batch indices (E·T of them for E epochs, the lr schedule spanning
    them all) or sample-level batches of sequence indices (fut/schedules.py); `on_step(t, trainer, loss)` after
    step t. `first_step` > 0 continues a window from the state after that many steps (`order` is then the rest)."""
    w = params.window
    batches = batch_tensors(list(order), prepared.window)
    total = max(w.steps, first_step + len(batches))
    trainer = Trainer(params, prepared, start, w.lr, w.schedule, total, first_step=first_step)
    for t, batch in enumerate(tqdm(batches, desc="window", disable=not progress), start=first_step + 1):
        loss = trainer.step(batch)
        if on_step is not None:
            on_step(t, trainer, loss)
    return trainer


@torch.no_grad()
def sequence_losses(trainer: Trainer, seqs: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Mean next-token loss of each sequence, [N] on the CPU."""
    trainer.model.eval()
    out = []
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i: i + batch_size].to(trainer.device)
        with autocast(trainer.params.train, trainer.device):
            logits = trainer.model(input_ids=batch).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none")
        out.append(ce.mean(dim=1).cpu())
    return torch.cat(out)
