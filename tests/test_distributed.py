"""Work shared over torch.distributed ranks: the assignment, and real 2-process torchrun runs (gloo on the CPU)
that must build exactly what one process builds."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fut import protocol
from fut.cache import MANIFEST, UpdateCache, build_cache, curvature_batches
from fut.distributed import assign
from fut.estimate_jobs import Unit, run_units
from fut.estimators import EstimationContext
from fut.groundtruth import RetrainSet, retrain_sets
from fut.hessian_jobs import ROWS, hessian_grams
from fut.reference import ReferenceRun
from fut.storage import load_tensors, read_json


@pytest.mark.parametrize("costs, world", [([5, 1, 1, 1, 1, 1], 2), ([3, 3, 2, 2, 2], 2), ([1] * 7, 3), ([4, 2], 4)])
def test_assignment_covers_every_unit_once_and_balances_load(costs, world):
    shares = assign(costs, world)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(costs)   # longest-first greedy: no rank exceeds another by a unit
    assert assign(costs, world) == shares

@pytest.mark.slow
def test_two_ranks_build_the_cache_one_process_builds(tiny_truth, tmp_path):
    params, data_dir, ref_dir, one_dir, _ = tiny_truth
    two = dataclasses.replace(params, parallel=dataclasses.replace(params.parallel, workers=2))
    built = build_cache(two, data_dir, ref_dir, tmp_path, progress=False)
    assert built["workers"] == 2 and built["files_reused"] == 0
    files = sorted(p.name for p in one_dir.glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == files
    for name in files:
        a, meta_a = load_tensors(one_dir / name)
        b, meta_b = load_tensors(tmp_path / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert {k: v for k, v in meta_a.items() if k != "build"} == {k: v for k, v in meta_b.items() if k != "build"}
    assert read_json(tmp_path / MANIFEST)["files"] == read_json(one_dir / MANIFEST)["files"]
    UpdateCache(ReferenceRun(params, data_dir, ref_dir), tmp_path)   # the one-worker params read it too

@pytest.mark.slow
def test_two_ranks_retrain_what_one_process_retrains(tiny_truth, tmp_path):
    """Two sets with their own readouts and folders (as the ground-truth stage's dev curves and plain orders) in
    one launch of two ranks: the results one process stored, each in its set's folder."""
    params, data_dir, ref_dir, _, gt_dir = tiny_truth
    assert params.parallel.workers == 1   # the stored truth was retrained in one process
    stored = protocol.dev_truth(gt_dir)
    curves = {n: r["order"] for n, r in stored.items() if "trajectory" in r}
    plain = {n: r["order"] for n, r in sorted(stored.items()) if "trajectory" not in r}
    plain = dict(list(plain.items())[:2])
    two = dataclasses.replace(params, parallel=dataclasses.replace(params.parallel, workers=2))
    sets = [RetrainSet(curves, tmp_path / "curves", ("trajectory",), params.groundtruth.eval_every),
            RetrainSet(plain, tmp_path / "plain")]
    got_curves, got_plain = retrain_sets(two, sets, data_dir, ref_dir, progress=False)
    assert sorted(p.stem for p in (tmp_path / "curves").glob("*.json")) == sorted(curves)
    for name in curves:
        assert got_curves[name]["eval_loss"] == stored[name]["eval_loss"]
        assert got_curves[name]["trajectory"] == stored[name]["trajectory"]
    assert sorted(p.stem for p in (tmp_path / "plain").glob("*.json")) == sorted(plain)
    assert all(got_plain[n]["eval_loss"] == stored[n]["eval_loss"] and "trajectory" not in got_plain[n]
               for n in plain)


@pytest.mark.slow
def test_two_ranks_estimate_what_one_process_estimates(tiny_truth):
    """The estimate stage's units (final estimates of replay, subspace and projected methods, a trajectory) give
    the same bits from two torchrun ranks as from one process."""
    params, data_dir, ref_dir, cache_dir, gt_dir = tiny_truth
    dev = protocol.dev_truth(gt_dir)
    names = sorted(dev)[:3]
    orders = {n: dev[n]["order"] for n in names}
    ctx = EstimationContext(ReferenceRun(params, data_dir, ref_dir), cache_dir, cache_dir.parent / "projection")
    units = [Unit(m, orders, cost=c) for m, c in (("fut-state:eig", 3.0), ("fut-subspace", 0.1), ("tracin", 0.1))]
    units.append(Unit("fut:secant", orders, steps={n: [2, params.window.steps] for n in names}, cost=3.0))
    truth = {n: torch.randn(ctx.theta_T.numel()) for n in names}
    dirs = {"data": data_dir, "reference": ref_dir, "cache": cache_dir, "projection": cache_dir.parent / "projection"}
    here = run_units(ctx, dirs, units, truth)
    ctx.params = dataclasses.replace(params, parallel=dataclasses.replace(params.parallel, workers=2))
    ranks = run_units(ctx, dirs, units, truth)
    drop = lambda outs: [{k: v for k, v in out.items() if k != "seconds"} for out in outs]
    assert drop(ranks) == drop(here)
    assert list(here[0]["eval_loss"]) == names and here[1]["indicators"] and set(here[3]["along"]) == set(names)


@pytest.mark.slow
def test_two_ranks_compute_the_galerkin_matrices_one_process_computes(tiny_truth):
    """B P̄ H P̄ Bᵀ per curvature batch (fut/epochs.py's Galerkin matrices): the same bits from two torchrun ranks
    as from one process, over a basis whose rows span more than one chunk."""
    params, data_dir, ref_dir, _, _ = tiny_truth
    run = ReferenceRun(params, data_dir, ref_dir)
    batches = list(curvature_batches(run.prepared, params.cache.curvature_batch, params.cache.curvature).values())
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(ROWS + 5, run.layout.dim, generator=gen)
    precond = torch.rand(run.layout.dim, generator=gen) + 0.5
    here = hessian_grams(run, run.theta(0), batches, basis, precond)
    two = dataclasses.replace(params, parallel=dataclasses.replace(params.parallel, workers=2))
    ranks = hessian_grams(ReferenceRun(two, data_dir, ref_dir), run.theta(0), batches, basis, precond)
    assert len(here) == len(batches) and here[0].shape == (len(basis), len(basis))
    assert all(torch.equal(a, b) for a, b in zip(here, ranks))
