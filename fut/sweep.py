"""Ablations of the knobs that shape the reference run itself: window batch size, window length T, window lr,
warm start on/off (params `sweep`). One cache cannot answer them, so every value is one self-contained run,
prepare → reference → ground truth → cache → estimates, in its own folder, with every other param as in
params.yaml. All points read the default run's corpus text (data/prepared/corpus), so they differ only in the
knob. No tuning happens inside a point: every retrained order except the identity is scored.

`python -m fut sweep` runs the points in parallel processes and writes one JSON per point to reports/sweeps/;
a point whose JSON matches its params is skipped, so an interrupted sweep resumes. The ablations stage
tabulates the JSONs.
"""
from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import math
import multiprocessing
import shutil
import statistics
import time
from pathlib import Path

from . import config, estimators, protocol
from .config import SWEEP_KNOBS, Params
from .estimators import EstimationContext
from .evaluation import finite_or_none, ppl_or_none
from .reference import ReferenceRun
from .stages import cache as cache_stage, groundtruth as groundtruth_stage, prepare as prepare_stage
from .stages import projection as projection_stage, reference as reference_stage
from .storage import atomic_write_json, read_json, versions

SUMMARY = ("spearman", "kendall", "r2_order_effect", "bias_ppl", "absdiff_ppl", "rel_err", "n", "n_non_finite")


def points(params: Params) -> dict[str, dict[str, object]]:
    """Point name ("default", "batch_size=4", ...) → the knob values it sets."""
    out: dict[str, dict[str, object]] = {"default": {}}
    for knob in SWEEP_KNOBS:
        for value in getattr(params.sweep, knob):
            out[f"{knob}={str(value).lower()}"] = {knob: value}
    return out


def point_params(params: Params, overrides: dict[str, object], corpus_dir: Path) -> Params:
    """The params of one point: the knob set, the corpus read from `corpus_dir`, the sweep's ground truth."""
    d = dataclasses.asdict(params)
    for knob, value in overrides.items():
        section, key = SWEEP_KNOBS[knob]
        d[section][key] = value
    corpus_dir = Path(corpus_dir).resolve()
    d["corpus"]["sources"] = {name: {"kind": "local_text", "path": str(corpus_dir / f"{name}.txt"),
                                     "optional": src.optional} for name, src in params.corpus.sources.items()}
    # The text is already sampled to the limit (plus paragraph breaks): read it whole, so the default point
    # prepares exactly the data of the default run.
    d["corpus"]["max_chars_per_domain"] = 2 ** 40
    s = params.sweep
    # A point scores every order it retrains (its own dev set: no test set, nothing is chosen inside a point).
    d["groundtruth"].update(n_random=s.n_random, structured=list(s.structured), trajectories=0,
                            test={**d["groundtruth"]["test"], "n_random": 0, "domain_blocks": 0, "difficulty": 0,
                                  "interleaved": 0})
    d["parallel"]["workers"] = 1
    d["estimate"].update(methods=list(s.methods),
                         default=params.estimate.default if params.estimate.default in s.methods else s.methods[-1])
    return config.from_dict(copy.deepcopy(d))


# The sections a point's run reads (its own corpus section only names where the text was read from, which
# differs between machines: the base run's corpus definition stands for it).
POINT_SECTIONS = ("tokenizer", "data", "model", "optimizer", "warmstart", "window", "train", "groundtruth", "cache",
                  "projection", "estimate")
# Keys of those sections that no point reads, left out of its provenance so that a new one does not make every
# stored point stale: the trajectory figure's methods (drawn for the base run only).
NOT_READ = {"estimate": ("trajectory_methods",)}


def point_key(point: Params, base: Params) -> str:
    """Provenance of a point: the sections its run reads (less NOT_READ), and the corpus definition its text
    came from."""
    return f"{point.section_hash(*POINT_SECTIONS, omit=NOT_READ)}-{base.section_hash('corpus')}"


def run_point(params: Params, key: str, name: str, work_dir: Path, out_file: Path, keep: bool = False) -> dict:
    """One whole run; writes and returns its summary under the provenance `key`."""
    work = Path(work_dir) / name
    dirs = {k: work / k for k in ("prepared", "reference", "groundtruth", "cache", "projection")}
    t0 = time.perf_counter()
    prepare_stage.run(params, dirs["prepared"])
    _, ref = reference_stage.run(params, dirs["prepared"], dirs["reference"])
    results, gt = groundtruth_stage.run(params, dirs["prepared"], dirs["reference"], dirs["groundtruth"])
    cache = cache_stage.run(params, dirs["prepared"], dirs["reference"], dirs["cache"])
    projection_stage.run(params, dirs["prepared"], dirs["reference"], dirs["cache"], dirs["projection"])
    truth = results[protocol.DEV]
    named = protocol.scored({n: r["order"] for n, r in truth.items()})
    ctx = EstimationContext(ReferenceRun(params, dirs["prepared"], dirs["reference"]), dirs["cache"],
                            dirs["projection"])
    estimates, seconds, trust = {}, {}, []
    for method in params.estimate.methods:
        est = estimators.estimate(ctx, list(named.values()), method)
        estimates[method] = dict(zip(named, est.eval_loss.double().tolist()))
        seconds[method] = est.seconds / len(named)
        if method == params.estimate.default and est.indicators:
            trust = [trust_row(n, ppl_or_none(estimates[method][n]), truth[n]["eval_ppl"],
                               {k: v[i] for k, v in est.indicators.items()}) for i, n in enumerate(named)]
    block = protocol.score_block(estimates, {n: truth[n]["eval_loss"] for n in named}, ctx.naive_loss,
                                 params.estimate.bootstrap, 0)
    methods = {m: {"families": {f: {k: v[m][k] for k in SUMMARY} for f, v in block["families"].items() if m in v},
                   "seconds_per_order": seconds[m]} for m in params.estimate.methods}
    summary = {
        "point": name, "params_key": key, "versions": versions(),
        "window_steps": params.window.steps, "batch_size": params.window.batch_size, "lr": params.window.lr,
        "warmstart": params.warmstart.enabled, "n_params": ref["n_params"],
        "identity_retrain_bitwise": ref["identity_retrain_bitwise"],
        "eval_ppl_start": ref["eval_ppl_start"], "eval_ppl_end": ref["eval_ppl_end"],
        "orders_scored": len(named), "true_ppl_std": gt[protocol.DEV]["true_ppl_std"],
        "random_ppl_std": gt[protocol.DEV]["families"].get("random", {}).get("true_ppl_std"),
        "retrain_seconds_per_order": statistics.fmean(truth[n]["seconds"] for n in named),
        "cache_seconds": cache["seconds"], "cache_seconds_per_gradient": cache["seconds_per_gradient"],
        "naive_eval_loss": ctx.naive_loss, "methods": methods, "seconds": time.perf_counter() - t0,
        "default_method": params.estimate.default, "trust": trust,
    }
    atomic_write_json(out_file, summary)
    if not keep:   # the cache of one point is gigabytes; its summary is what the sweep keeps
        shutil.rmtree(work, ignore_errors=True)
    return summary


def trust_row(name: str, est_ppl: float | None, true_ppl: float, indicators: dict) -> dict:
    """One order's estimate, its true error and its indicators; a diverged estimate keeps None for all three."""
    return {"order": name, "est_ppl": est_ppl, "abs_error_ppl": None if est_ppl is None else abs(est_ppl - true_ppl),
            **{k: finite_or_none(v) for k, v in indicators.items()}}


def is_done(out_file: Path, key: str) -> bool:
    try:
        return read_json(out_file)["params_key"] == key
    except (FileNotFoundError, ValueError, KeyError):
        return False


def _run_in_worker(params: Params, key: str, name: str, work_dir: Path, out_file: Path) -> str:
    if not is_done(out_file, key):      # another sweep process on the same folders may have finished it
        run_point(params, key, name, work_dir, out_file)
    return name


def run_sweep(params: Params, corpus_dir: Path, work_dir: Path, out_dir: Path, jobs: int | None = None,
              only: list[str] | None = None) -> list[str]:
    """Run every point not yet done, `jobs` at a time; returns the names run."""
    all_points = points(params)
    unknown = sorted(set(only or []) - set(all_points))
    if unknown:
        raise ValueError(f"--only {unknown[0]!r} is not a sweep point; points: {', '.join(all_points)}")
    todo = {}
    for name, overrides in all_points.items():
        if only and name not in only:
            continue
        p = point_params(params, overrides, corpus_dir)
        key = point_key(p, params)
        if not is_done(Path(out_dir) / f"{name}.json", key):
            todo[name] = (p, key)
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(1, min(jobs or params.sweep.jobs, len(todo) or 1)),
                                mp_context=ctx) as pool:
        futures = [pool.submit(_run_in_worker, p, key, n, Path(work_dir), Path(out_dir) / f"{n}.json")
                   for n, (p, key) in todo.items()]
        for fut in cf.as_completed(futures):
            print(f"sweep point done: {fut.result()}", flush=True)
    return list(todo)


def collect(params: Params, out_dir: Path) -> tuple[dict, list[str]]:
    """Per knob, {"param": key, "values": {value: point summary}}, the default point under the default value;
    and the names of points whose stored summary was computed with other params (refused: rerun them).
    Points not run yet are absent."""
    table, stale = {}, []
    for name, overrides in points(params).items():
        path = Path(out_dir) / f"{name}.json"
        if not path.is_file():
            continue
        r = read_json(path)
        if r["params_key"] != point_key(point_params(params, overrides, Path(".")), params):
            stale.append(name)
            continue
        knobs = overrides or {k: getattr(getattr(params, s), key) for k, (s, key) in SWEEP_KNOBS.items()}
        for knob, value in knobs.items():
            section, key = SWEEP_KNOBS[knob]
            entry = table.setdefault(knob, {"param": f"{section}.{key}", "values": {}})
            entry["values"][str(value).lower()] = (value, r)
    for entry in table.values():        # values in ascending order, for tables and figures
        entry["values"] = {v: r for v, (_, r) in sorted(entry["values"].items(), key=lambda kv: kv[1][0])}
    return table, stale
