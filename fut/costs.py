"""What a step of the suite costs: wall and CPU seconds, peak memory, and the retrain every estimate is compared
with, timed exactly as a user gets the same number (the window and the final eval loss, nothing else)."""
from __future__ import annotations

import re
import resource
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .device import synchronize

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
    """Start a new peak-memory measurement where Linux allows it (≥ 4.0); elsewhere the peak stays the process's
    lifetime peak."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass


@dataclass
class Cost:
    """Wall seconds, CPU seconds of this process (steadier than wall time when other jobs share the cores) and
    peak resident memory (MB) of one step of a stage."""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_mb: float = 0.0

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "peak_mb": self.peak_mb}


@contextmanager
def measured() -> Iterator[Cost]:
    """Wall time, CPU time and peak RSS of the block (this process; workers report their own peaks)."""
    cost = Cost()
    reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield cost
    finally:
        cost.seconds, cost.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        cost.peak_mb = peak_rss_mb()


def median_seconds(fn: Callable[[], object], repeat: int = 3, device: torch.device | None = None) -> float:
    """Median wall time of `repeat` calls after one warm-up call; with `device`, each call counts until the
    device has done its work (CUDA is asynchronous)."""
    def call() -> None:
        fn()
        if device is not None:
            synchronize(device)

    call()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fair_retrain_seconds(retrain_loss: Callable[[Sequence[int]], float], orders: Sequence[Sequence[int]],
                         device: torch.device | None = None) -> dict:
    """Seconds of a retrain as a user gets the same number as the estimate (the window, then the final eval loss,
    nothing else), one per order, after a warm-up retrain of the first: their median (and all of them)."""
    retrain_loss(orders[0])
    times = []
    for order in orders:
        t0 = time.perf_counter()
        retrain_loss(order)
        if device is not None:
            synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "all": times, "n": len(times)}
