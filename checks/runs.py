"""Runs of the pipeline stages on one set of params, and their comparison: what a rerun must reproduce bit for
bit (tensors and values) and what it may not (timings, counts of reused units)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fut.stages import cache, estimate, groundtruth, prepare, projection, reference
from fut.config import Params
from fut.storage import atomic_write_json, read_header, read_json

STAGES = ("prepare", "reference", "groundtruth", "cache", "projection", "estimate")


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
        metrics = prepare.run(p, d["prepare"])
    elif stage == "reference":
        _, metrics = reference.run(p, d["prepare"], d["reference"])
    elif stage == "groundtruth":
        _, metrics = groundtruth.run(p, d["prepare"], d["reference"], d["groundtruth"])
    elif stage == "cache":
        metrics = cache.run(p, d["prepare"], d["reference"], d["cache"])
    elif stage == "projection":
        metrics = projection.run(p, d["prepare"], d["reference"], d["cache"], d["projection"])
    else:
        _, metrics = estimate.run(p, d["prepare"], d["reference"], d["cache"], d["projection"], d["groundtruth"])
    run.metrics[stage] = metrics
    return metrics


def full_run(params: Params, root: Path) -> Run:
    run = Run.at(params, root)
    for stage in STAGES:
        run_stage(run, stage)
    return run


# Values that measure a run rather than its result: timings (and what is derived from them, like the size of
# a header that records a timing), and how many units a resumed run found done.
MEASURED = ("seconds", "per_second", "speedup", "break_even", "peak_", "overhead")
RUN_FACTS = {"build", "workers", "free_bytes", "missing_bytes", "resumed_from_step", "files_built", "files_reused",
             "total_file_bytes", "measured_at", "retrain_seconds_timed"}


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


def edited(run: Run, edit: Callable[[dict], None]) -> dict:
    """The run's params as a dict, changed by `edit`."""
    d = dataclasses.asdict(run.params)
    edit(d)
    return d
