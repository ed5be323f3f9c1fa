"""What a cache build will cost, before it starts: `python -m fut plan` and the cache stage's first step.

Counts are exact (they follow from the params): the files and bytes the cache will hold, the gradient
evaluations of its pairs, own gradients and eval gradients, and the Hessian-vector products of its Lanczos
runs. The time is an estimate: one gradient and one Hessian-vector product of this model are timed on random
tokens of the window batch's shape, on this machine's device, and scaled by those counts (the projection and
checkpoint reads, about a fifth more, are not counted); divided over `parallel.workers` ranks.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .cache import cache_files, curvature_batches, curvature_steps, gradient_counts
from .config import Params
from .costs import median_seconds
from .curvature import LossFunction
from .data import Prepared
from .device import autocast, configure_threads, resolve_device
from .flat import ParamLayout
from .model import build_model, count_parameters
from .storage import InsufficientDisk, format_bytes
from .training import Trainer, TrainState


def time_units(params: Params, vocab_size: int) -> dict[str, float]:
    """Seconds of one gradient and one Hessian-vector product on a window batch (random tokens) on the device
    and in the precision the cache builder uses."""
    configure_threads(params.train)
    device = resolve_device(params.train)
    model = build_model(params.model, vocab_size, params.data.seq_len, 0).to(device)
    layout = ParamLayout.of({k: v.detach() for k, v in model.named_parameters()})
    loss = LossFunction(model, layout)
    theta = layout.flatten({k: v.detach() for k, v in model.named_parameters()})
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(vocab_size, (params.window.batch_size, params.data.seq_len), generator=gen).to(device)
    vec = torch.randn(1, layout.dim, generator=gen).to(device)

    def timed(fn) -> float:
        def run() -> None:
            with autocast(params.train, device):
                fn()
        return median_seconds(run, device=device)

    return {"grad_seconds": timed(lambda: loss.grad(theta, batch)),
            "hvp_seconds": timed(lambda: loss.hvp(theta, batch, vec))}


def train_step_seconds(params: Params, prepared: Prepared, start: TrainState, repeat: int = 15) -> float:
    """Median seconds of one training step (AdamW, in the training's precision; its loss readout waits for the
    device) from `start` on successive window batches: what one cache pair, one forward-backward, is held to."""
    trainer = Trainer(params, prepared, start, params.window.lr, "constant", repeat + 1)
    batches = iter(range(repeat + 1))
    return median_seconds(lambda: trainer.step(prepared.window[next(batches) % len(prepared.window)]), repeat)


def cache_plan(params: Params, prepared: Prepared, cache_dir: Path) -> dict:
    """The cache's size and work for these params, what is already on disk, and the disk's free space."""
    c = params.cache
    T, b = prepared.window.shape[:2]
    dim = count_parameters(params.model, prepared.vocab_size, params.data.seq_len)
    groups = list(curvature_batches(prepared, c.curvature_batch, c.curvature))
    files = cache_files(params, T, dim, groups, Path(cache_dir))
    eval_batches = prepared.eval_mixed.shape[0] / b
    counts = gradient_counts(params, T, eval_batches)
    hvps = len(groups) * len(curvature_steps(params, T)) * c.curvature_iterations
    return {"params": dim, "files": len(files), "bytes": sum(n for _, n in files),
            "missing_bytes": sum(n for path, n in files if not path.exists()),
            **{k: v for k, v in counts.items() if k != "eval_gradients"},
            "eval_gradients": int(round(counts["eval_gradients"] / eval_batches)),
            "hessian_vector_products": hvps, "probe_readouts": c.probes, "workers": params.parallel.workers,
            "free_bytes": shutil.disk_usage(_existing(Path(cache_dir))).free,
            "window_batch_equivalents": {"gradients": sum(counts.values()),
                                         "hessian_vector_products": hvps * c.curvature_batch / b}}


def with_time(plan: dict, params: Params, prepared: Prepared) -> dict:
    """The plan with an estimated build time: its gradients and HVPs (in window-batch equivalents: an eval
    gradient is over every eval sequence, an HVP over curvature_batch sequences) at the timed unit costs."""
    unit = time_units(params, prepared.vocab_size)
    work = plan["window_batch_equivalents"]
    serial = unit["grad_seconds"] * work["gradients"] + unit["hvp_seconds"] * work["hessian_vector_products"]
    return {**plan, **unit, "estimated_seconds": serial / plan["workers"]}


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk(plan: dict, cache_dir: Path) -> None:
    """Refuse a build whose missing files the disk cannot hold, before any work."""
    if plan["missing_bytes"] > plan["free_bytes"]:
        raise InsufficientDisk(f"{cache_dir}: the cache needs {format_bytes(plan['missing_bytes'])} more "
                               f"({plan['missing_bytes']} bytes) but only {format_bytes(plan['free_bytes'])} is free on "
                               "its disk; free space, move cache_dir to a larger disk, or shrink the cache "
                               "(cache.checkpoint_stride, cache.dtype, window.steps)")


def describe(plan: dict) -> str:
    lines = [f"cache plan: {plan['files']} files, {format_bytes(plan['bytes'])} "
             f"({format_bytes(plan['missing_bytes'])} still to write, {format_bytes(plan['free_bytes'])} free)",
             f"  {plan['pair_gradients']} pair gradients + {plan['own_gradients']} own + {plan['after_gradients']} "
             f"after-step + {plan['eval_gradients']} eval gradients, {plan['hessian_vector_products']} Hessian-vector "
             f"products, {plan['probe_readouts']} probe readouts, {plan['workers']} worker(s)"]
    if "estimated_seconds" in plan:
        lines.append(f"  estimated {plan['estimated_seconds']:.0f} s (gradient {plan['grad_seconds'] * 1e3:.1f} ms, "
                     f"HVP {plan['hvp_seconds'] * 1e3:.1f} ms on a window batch here)")
    return "\n".join(lines)
