"""Stage `cache`: plan the update cache (refused before any work when the disk cannot hold it), build or resume
it; returns the plan, its cost and storage."""
from __future__ import annotations

import time
from pathlib import Path

from ..cache import UpdateCache, build_cache
from ..config import Params
from ..plan import cache_plan, check_disk, describe, with_time
from ..reference import ReferenceRun
from ..storage import atomic_write_json


def run(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path) -> dict:
    ref = ReferenceRun(params, data_dir, ref_dir)
    plan = cache_plan(params, ref.prepared, cache_dir)
    check_disk(plan, cache_dir)
    plan = with_time(plan, params, ref.prepared)
    print(describe(plan), flush=True)
    start = time.perf_counter()
    built = build_cache(params, data_dir, ref_dir, cache_dir)
    wall = time.perf_counter() - start
    store = UpdateCache(ref, cache_dir)
    c = params.cache
    metrics = {**built, **store.build_cost(), "bytes": store.bytes(), "dtype": c.dtype,
               "curvature_rank": c.curvature_rank, "curvature_iterations": c.curvature_iterations,
               "curvature_checkpoints": c.curvature_checkpoints, "checkpoint_stride": c.checkpoint_stride,
               "plan": plan, "wall_seconds": wall}
    atomic_write_json(Path(cache_dir) / "stats.json", metrics)
    return metrics
