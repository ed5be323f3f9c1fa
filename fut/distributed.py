"""A stage's work spread over `torch.distributed` ranks launched by torchrun.

Every rank runs the same command (`torchrun --nproc-per-node N -m fut cache`, or across nodes with torchrun's
--nnodes/--rdzv-endpoint); `assign` gives each rank its share of the stage's work units, deterministically,
so every rank knows every other rank's share without talking to it. Each unit writes its own files
atomically, so a killed run resumes with the units still missing; after a barrier, rank 0 merges the ranks'
records. Backends: gloo for the CPU-side barrier and records, nccl for CUDA tensors when there are GPUs.
A stage asked for `workers > 1` from a notebook launches torchrun itself (`launch`).
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

# A barrier waits for the slowest rank's whole share: the default 30-minute timeout is too short at scale.
BARRIER_TIMEOUT = datetime.timedelta(days=2)


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent (pid `parent`) dies: a killed stage must not leave
    workers computing (or holding a GPU) in the background. A parent that died before the request was made
    is caught by checking it is still our parent. Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank r of `world` (world 1 without torchrun)."""
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mine(self, items: Sequence, costs: Sequence[float]) -> list:
        """This rank's share of `items` (see `assign`), in the items' order."""
        return [items[i] for i in assign(costs, self.world)[self.rank]]


def assign(costs: Sequence[float], world: int) -> list[list[int]]:
    """Indices of the units of each rank: longest first to the least-loaded rank (ties to the lower rank), so
    the ranks finish close together; the same costs give the same assignment on every rank."""
    load, shares = [0.0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += costs[i]
        shares[r].append(i)
    return [sorted(s) for s in shares]


def in_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group() -> Iterator[Ranks]:
    """Join the torchrun job this process belongs to (world 1 outside torchrun); leave it on exit."""
    if not in_torchrun() or dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else Ranks()
        return
    die_with_parent(os.getppid())   # the torchrun agent: a killed launch takes its ranks with it
    backend = "gloo"
    if torch.cuda.is_available():   # each rank on its own GPU; the barrier and records stay on gloo
        torch.cuda.set_device(rank_device(torch.device("cuda")))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: its own GPU on its node (torchrun's LOCAL_RANK) when the run is on CUDA."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def launch(module: str, args: Sequence[str], workers: int, what: str, params_yaml: str) -> None:
    """Run `python -m MODULE ARGS --params FILE` as `workers` torchrun ranks on this machine and wait, FILE holding
    `params_yaml` (the caller's params, which need not be a file of its own); the ranks' output is passed
    through as it comes (progress bars included). Raises naming the command and the ranks' last output if any
    rank fails. The launch dies with this process (and its ranks with it)."""
    with tempfile.TemporaryDirectory(prefix="fut-launch-") as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(params_yaml)
        args = [*args, "--params", str(params_file)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               "-m", module, *args]
        parent = os.getpid()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: die_with_parent(parent))
        tail = bytearray()

        def relay() -> None:
            while chunk := os.read(proc.stdout.fileno(), 4096):
                sys.stderr.write(chunk.decode(errors="replace"))
                sys.stderr.flush()
                tail.extend(chunk)
                del tail[:-6000]

        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        code = proc.wait()
        reader.join()
    if code != 0:
        raise RuntimeError(f"{what}: `torchrun --nproc-per-node={workers} -m {module} {' '.join(args)}` failed with "
                           f"exit status {code}; its last output:\n{tail.decode(errors='replace')}")
