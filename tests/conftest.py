"""Shared fixtures: a tiny but real pipeline (real text, real BPE, real Llama) built once per session."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from checks.runs import Run
from checks.tiny import tiny_params, write_tiny_text
from fut import config
from fut.stages import cache, groundtruth, prepare, projection, reference
from fut.storage import atomic_write_json, read_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """Two domains of real prose: the World English Bible's first and last parts."""
    return write_tiny_text(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, text_dir):
    """Prepared data and a reference run for the tiny params: (params, data_dir, ref_dir, ref_metrics)."""
    root = tmp_path_factory.mktemp("tiny")
    params = config.from_dict(tiny_params(text_dir))
    atomic_write_json(root / "prepare.json", prepare.run(params, root / "prepared"))   # for `tiny_run`
    _, metrics = reference.run(params, root / "prepared", root / "reference")
    return params, root / "prepared", root / "reference", metrics


@pytest.fixture(scope="session")
def tiny_truth(tiny, tmp_path_factory):
    """The tiny run's cache and ground truth, as the application stages read them:
    (params, data_dir, ref_dir, cache_dir, gt_dir)."""
    params, data_dir, ref_dir, _ = tiny
    root = tmp_path_factory.mktemp("tiny_truth")
    cache.run(params, data_dir, ref_dir, root / "cache")
    atomic_write_json(root / "projection.json", projection.run(params, data_dir, ref_dir, root / "cache",
                                                                root / "projection"))
    groundtruth.run(params, data_dir, ref_dir, root / "groundtruth")
    return params, data_dir, ref_dir, root / "cache", root / "groundtruth"


@pytest.fixture(scope="session")
def tiny_run(tiny, tiny_truth) -> Run:
    """The tiny run as checks/runs.py compares runs: each stage's folder and metrics (the ground truth's
    recomputed from its stored results; only its noise floor retrains)."""
    params, data_dir, ref_dir, ref_metrics = tiny
    _, _, _, cache_dir, gt_dir = tiny_truth
    run = Run(params, {"prepare": data_dir, "reference": ref_dir, "groundtruth": gt_dir, "cache": cache_dir,
                       "projection": cache_dir.parent / "projection", "estimate": data_dir.parent / "estimate"})
    run.metrics = {"prepare": read_json(data_dir.parent / "prepare.json"), "reference": ref_metrics,
                   "groundtruth": groundtruth.run(params, data_dir, ref_dir, gt_dir)[1],
                   "cache": read_json(cache_dir / "stats.json"),
                   "projection": read_json(cache_dir.parent / "projection.json")}
    return run


@pytest.fixture
def params_dict(text_dir) -> dict:
    return copy.deepcopy(tiny_params(text_dir))
