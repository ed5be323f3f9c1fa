"""Device and precision resolution: CUDA when present, refused clearly when asked for and absent."""
from __future__ import annotations

import contextlib
import logging

import torch

from .config import ConfigError, TrainConfig

log = logging.getLogger(__name__)


def resolve_device(cfg: TrainConfig) -> torch.device:
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise ConfigError("params: train.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu' "
                          "(the GPU profile needs a GPU machine)")
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and has_cuda) else "cpu")
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ConfigError("params: train.precision = 'bf16' needs a CUDA device; this machine resolved "
                          f"train.device = {cfg.device!r} to cpu; use precision 'float32' on the CPU")
    return device


def describe_device(device: torch.device) -> str:
    """The device as recorded in metrics: `cpu`, or `cuda:<i> (<name>)`."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock reading after it counts that work (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configure_threads(cfg: TrainConfig) -> None:
    """Fixed thread count: CPU matmul reductions depend on it, and retrains must match the reference bitwise."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast for forward/backward on CUDA; master weights and Adam state stay float32."""
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
