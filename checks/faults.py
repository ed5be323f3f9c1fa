"""Fault scenarios against an uninterrupted run on tiny params: stages killed with SIGKILL and rerun,
corrupted artefacts, numerical faults.

- A kill scenario runs one pipeline stage in its own process (forked from a server that imported fut once)
  that SIGKILLs itself at a commit point: just before or just after the k-th file of a kind is renamed into
  place (`storage` writes a temporary and renames it, so these two cover every state a kill at any moment can
  leave on disk). Its worker processes must die with it. The stage is then rerun to completion and every
  artefact and metric is compared with an uninterrupted run: tensors and values bit for bit; only timings and
  counts of reused units may differ.
- A corruption scenario alters a stored file (a flipped byte, a truncated file, a rewritten shape); readers
  must refuse it naming the file (and tensor), and rerunning the stage must recompute it.
- A numerical scenario puts a NaN or inf into training, the cache or an estimate; training and the cache build
  must stop naming the step and the tensor, an estimate must record the step its order went non-finite.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import multiprocessing
import os
import shutil
import signal
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fut import config
from fut.cache import UpdateCache, shard_path
from fut.data import load_prepared
from fut.estimators import EstimationContext, estimate
from fut.groundtruth import Oracle, is_complete
from fut.reference import ReferenceRun, checkpoint_path, load_checkpoint, reference_hash, save_checkpoint
from fut.stages import cache as cache_stage, reference as reference_stage
from fut.storage import ArtefactMismatch, load_tensors, read_header, read_json, save_tensors
from fut.training import NonFiniteError

from .runs import Run, edited, run_stage, stage_differences


@dataclass
class FaultResult:
    name: str
    passed: bool
    detail: str


def _verdict(diffs: list[str]) -> str:
    return f"; differences: {'; '.join(diffs)}" if diffs else "; rerun identical to the uninterrupted run"


def _descendants(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids + [d for k in kids for d in _descendants(k)]


def _kill_self(children_file: str) -> None:
    """Record this process's descendants (torchrun's agent and ranks included: the check is that they die with
    it), then SIGKILL this process."""
    Path(children_file).write_text(" ".join(map(str, _descendants(os.getpid()))))
    os.kill(os.getpid(), signal.SIGKILL)


def drive(run: Run, stage: str, pattern: str, k: int, during: bool, children_file: str) -> None:
    """Process entry of a kill scenario: run `stage`, dying at the k-th commit of a file matching `pattern` (a
    path under the stage folder): before its rename (`during`) or just after it. Files that torchrun ranks
    write are watched for instead (their renames happen in other processes): the kill follows the k-th."""
    real_replace, seen = os.replace, 0
    stage_dir = run.dirs[stage]

    def watch() -> None:
        while sum(fnmatch.fnmatch(p.relative_to(stage_dir).as_posix(), pattern) for p in stage_dir.rglob("*")) < k:
            time.sleep(0.01)
        _kill_self(children_file)

    if stage == "cache" and run.params.parallel.workers > 1:
        threading.Thread(target=watch, daemon=True).start()

    def replace(src, dst):
        nonlocal seen
        hit = fnmatch.fnmatch(Path(dst).relative_to(stage_dir).as_posix(), pattern) \
            if Path(dst).is_relative_to(stage_dir) else False
        seen += hit
        if hit and seen == k and during:
            _kill_self(children_file)
        real_replace(src, dst)
        if hit and seen == k:
            _kill_self(children_file)

    os.replace = replace
    run_stage(run, stage)


def _forkserver() -> multiprocessing.context.BaseContext:
    """Stage processes forked from a server that imported fut once: each starts in a fraction of a second
    instead of the seconds an interpreter takes to import torch and transformers."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["checks.faults"])
    return ctx


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@dataclass(frozen=True)
class Kill:
    """SIGKILL `stage` at the k-th commit of a file matching `unit`, while it is written or just after; with
    `workers` > 1 the cache is built by that many torchrun ranks (and the rerun by one process)."""
    stage: str
    unit: str
    k: int
    during: bool
    workers: int = 1

    @property
    def name(self) -> str:
        ranks = f" by {self.workers} torchrun ranks" if self.workers > 1 else ""
        return f"{self.stage}{ranks}: SIGKILL {'while writing' if self.during else 'after'} {self.unit} #{self.k}, rerun"

    def run(self, baseline: Run, folder: Path) -> FaultResult:
        folder.mkdir(parents=True, exist_ok=True)
        run = baseline.with_fresh(self.stage, folder)
        killed = Run(dataclasses.replace(run.params, parallel=dataclasses.replace(run.params.parallel, workers=self.workers)),
                     run.dirs)
        children = folder / "children.txt"
        proc = _forkserver().Process(target=drive,
                                     args=(killed, self.stage, self.unit, self.k, self.during, str(children)))
        proc.start()
        proc.join(timeout=600)
        if proc.exitcode != -signal.SIGKILL:
            proc.kill()
            return FaultResult(self.name, False, f"the stage was not killed at the point (exit status {proc.exitcode})")
        pids = [int(p) for p in children.read_text().split()]
        deadline = time.monotonic() + 30
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = [p for p in pids if _alive(p)]
        for pid in orphans:    # workers this scenario started that outlived their stage: the check failed; end them
            os.kill(pid, signal.SIGKILL)
        left = sum(1 for p in run.dirs[self.stage].rglob("*") if p.is_file())
        run_stage(run, self.stage)
        diffs = stage_differences(baseline, run, self.stage)
        survivors = f", {len(orphans)} still alive 30 s later" if orphans else ", none left running"
        detail = f"killed with {left} files on disk, {len(pids)} child processes{survivors}{_verdict(diffs)}"
        return FaultResult(self.name, not orphans and not diffs, detail)


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8: 8 + n])


def flip_byte(path: Path, tensor: str) -> None:
    """Flip one bit in the middle of `tensor`'s bytes."""
    n, header = _header(path)
    start, end = header[tensor]["data_offsets"]
    raw = bytearray(path.read_bytes())
    raw[8 + n + (start + end) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def flatten_shape(path: Path, tensor: str) -> None:
    """Rewrite the header so `tensor` is one flat vector: the same bytes under a wrong shape."""
    n, header = _header(path)
    shape = header[tensor]["shape"]
    header[tensor]["shape"] = [math.prod(shape)]
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n, "the rewritten header must fit where the old one was"
    raw = path.read_bytes()
    path.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {"flip": flip_byte, "reshape": flatten_shape, "truncate": lambda path, tensor: truncate(path)}


@dataclass(frozen=True)
class Corrupt:
    """Alter a stored file of `stage`: readers must refuse it naming the file (and `tensor`); rerunning the
    stage must recompute it."""
    stage: str
    file: str
    how: str
    tensor: str | None = None

    @property
    def name(self) -> str:
        what = f" (tensor {self.tensor})" if self.tensor else ""
        return f"{self.stage}: {self.how} {self.file}{what}, refused by readers, recomputed by a rerun"

    def _refusal(self, run: Run, intact: Path) -> str | None:
        """What a reader of the corrupted file says, or None if it would use it."""
        path = run.dirs[self.stage] / self.file
        prepared = load_prepared(run.dirs["prepare"], run.params)
        try:
            if self.stage == "reference":
                t = int(path.stem.split("_")[1])
                load_checkpoint(run.dirs["reference"], t, reference_hash(run.params, prepared))
            elif self.stage == "cache":
                store = UpdateCache(ReferenceRun(run.params, run.dirs["prepare"], run.dirs["reference"]), run.dirs["cache"])
                for name in read_header(path)[2]:
                    store.read(path, name)
            else:   # a ground-truth result is never read unless complete: an incomplete one is retrained
                key = ReferenceRun(run.params, run.dirs["prepare"], run.dirs["reference"]).key
                if not is_complete(path, read_json(intact)["order"], key):
                    return f"{path} is not a complete result of this run: retrained"
        except ArtefactMismatch as err:
            return str(err)
        return None

    def run(self, baseline: Run, folder: Path) -> FaultResult:
        run = baseline.with_fresh(self.stage, folder)
        shutil.copytree(baseline.dirs[self.stage], run.dirs[self.stage])
        CORRUPTIONS[self.how](run.dirs[self.stage] / self.file, self.tensor)
        message = self._refusal(run, baseline.dirs[self.stage] / self.file)
        named = message is not None and Path(self.file).name in message and (self.tensor or "") in message
        run_stage(run, self.stage)
        diffs = stage_differences(baseline, run, self.stage)
        detail = (f"refused: {message}" if named else f"not refused by name (message: {message})") + _verdict(diffs)
        return FaultResult(self.name, named and not diffs, detail)


def _stops(call: Callable[[], object], *expected: str) -> tuple[bool, str]:
    """`call` must raise NonFiniteError with every `expected` fragment in its message."""
    try:
        call()
    except NonFiniteError as err:
        return all(e in str(err) for e in expected), str(err)
    return False, "not detected: the call finished"


def _with_bad_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    out = tensor.clone()
    out.view(-1)[0] = value
    return out


def _non_finite_in_training(baseline: Run, folder: Path) -> tuple[bool, str]:
    """A retrain from a start state with an inf in one parameter stops at window step 1 naming it."""
    oracle = Oracle(ReferenceRun(baseline.params, baseline.dirs["prepare"], baseline.dirs["reference"]))
    name = next(iter(oracle.start.theta))
    start = dataclasses.replace(oracle.start, theta={**oracle.start.theta,
                                                     name: _with_bad_value(oracle.start.theta[name], math.inf)})
    return _stops(lambda: oracle.retrain(list(range(baseline.params.window.steps)), start=start),
                  "window step 1:", f"parameter {name!r}")


def _diverging_reference(baseline: Run, folder: Path) -> tuple[bool, str]:
    """A window lr of 1e10 makes the loss of window step 2 non-finite: the reference run stops there naming it,
    with checkpoint 1 stored and checkpoint 2 never written."""
    params = config.from_dict(edited(baseline, lambda d: d["window"].update(lr=1e10)))
    ok, message = _stops(lambda: reference_stage.run(params, baseline.dirs["prepare"], folder / "reference"),
                         "window step 2: the training loss holds NaN or inf")
    ref = folder / "reference"
    return ok and checkpoint_path(ref, 1).exists() and not checkpoint_path(ref, 2).exists(), message


def _non_finite_checkpoint_in_cache(baseline: Run, folder: Path) -> tuple[bool, str]:
    """A NaN in a stored checkpoint (as a faulty writer could leave, checksums valid) stops the cache build at
    that checkpoint naming the tensor, before its shard is written."""
    params, prepared = baseline.params, load_prepared(baseline.dirs["prepare"], baseline.params)
    ref = folder / "reference"
    shutil.copytree(baseline.dirs["reference"], ref)
    h = reference_hash(params, prepared)
    state = load_checkpoint(ref, 2, h)
    _, meta = load_tensors(checkpoint_path(ref, 2))
    name = next(iter(state.theta))
    state.theta[name] = _with_bad_value(state.theta[name], math.nan)
    save_checkpoint(ref, 2, state, h, {k: v for k, v in meta.items() if k in ("train_loss", "eval_loss")})
    ok, message = _stops(lambda: cache_stage.run(params, baseline.dirs["prepare"], ref, folder / "cache"),
                         "cache file shard_0002.safetensors", "tensor 'grad'")
    return ok and not shard_path(folder / "cache", 2).exists(), message


def _non_finite_estimate(baseline: Run, folder: Path) -> tuple[bool, str]:
    """An order whose estimate goes non-finite (an inf in the cached gradient of batch 4 at checkpoint 3,
    re-saved with valid checksums) is recorded with the step it went non-finite at, and the estimate goes on:
    an order that does not read that gradient stays finite."""
    cache = folder / "cache"
    shutil.copytree(baseline.dirs["cache"], cache)
    tensors, meta = load_tensors(shard_path(cache, 3))
    tensors["grad"][4, 0] = math.inf
    save_tensors(shard_path(cache, 3), tensors, meta)
    ctx = EstimationContext(ReferenceRun(baseline.params, baseline.dirs["prepare"], baseline.dirs["reference"]), cache)
    identity = list(range(baseline.params.window.steps))
    swapped = identity[:3] + [4, 3] + identity[5:]          # batch 4 at step 3: δ_4 is the first to see it
    est = estimate(ctx, [identity, swapped], "fut-state:none")
    return est.non_finite_step == [None, 4], f"first non-finite step per order: {est.non_finite_step}"


@dataclass(frozen=True)
class NonFinite:
    """A NaN or inf injected into a stage's computation: `inject` returns whether the stage stopped (or
    recorded it) as it must, and its message."""
    name: str
    inject: Callable[[Run, Path], tuple[bool, str]]

    def run(self, baseline: Run, folder: Path) -> FaultResult:
        folder.mkdir(parents=True, exist_ok=True)
        return FaultResult(self.name, *self.inject(baseline, folder))


# The tiny run has T = 6 window steps (checkpoints step_0000..step_0006, shards shard_0000..shard_0006, an
# eigenspace per domain at checkpoint 0: curvature_domain0_0000 and curvature_domain1_0000, and fut-subspace's
# subspace.safetensors, built last), 8 dev and 7 test orders.
FAULTS = [
    Kill("reference", "trajectory/step_*.safetensors", 1, during=True),     # just after the warm start
    Kill("reference", "trajectory/step_*.safetensors", 3, during=False),
    Kill("reference", "trajectory/step_*.safetensors", 7, during=False),    # before the summary
    Kill("groundtruth", "dev/orders/*.json", 1, during=False),
    Kill("groundtruth", "dev/orders/*.json", 8, during=True),
    Kill("groundtruth", "dev/orders/*.json", 8, during=False),                  # before results and noise floor
    Kill("cache", "shard_*.safetensors", 1, during=True),
    Kill("cache", "shard_*.safetensors", 7, during=False),                  # before the curvature files
    Kill("cache", "curvature_*.safetensors", 1, during=False),
    Kill("cache", "subspace.safetensors", 1, during=True),                  # built from every other file
    Kill("cache", "manifest.json", 1, during=True),                         # the cache must not read as complete
    Kill("cache", "*.safetensors", 5, during=False, workers=2),             # the ranks must die with the stage
    Corrupt("reference", "trajectory/step_0003.safetensors", "flip", "theta.model.norm.weight"),
    Corrupt("cache", "shard_0002.safetensors", "flip", "grad"),
    Corrupt("cache", "curvature_domain1_0000.safetensors", "reshape", "eig_vectors"),
    Corrupt("cache", "subspace.safetensors", "flip", "gram"),
    Corrupt("cache", "shard_0005.safetensors", "truncate"),
    Corrupt("groundtruth", "dev/orders/reversed.json", "truncate"),
    NonFinite("training: an inf in the start state stops the retrain at window step 1, naming the parameter",
              _non_finite_in_training),
    NonFinite("reference: a diverging lr stops the run at window step 2, naming the loss, before checkpoint 2",
              _diverging_reference),
    NonFinite("cache: a NaN in checkpoint 2 stops the build before shard 2 is written, naming the tensor",
              _non_finite_checkpoint_in_cache),
    NonFinite("estimate: an order that goes non-finite is recorded with its first step, the others go on",
              _non_finite_estimate),
]
