"""The sweep of knobs that need their own reference run: points, one whole tiny run, resume, stale results."""
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from fut import config
from fut.cli import main
from fut.storage import read_json
from fut.sweep import collect, point_key, point_params, points, run_sweep


@pytest.fixture
def sweep_dict(params_dict):
    params_dict["sweep"] = {"batch_size": [], "steps": [4], "lr": [3e-4], "warmstart": [], "n_random": 2,
                            "structured": ["reversed"], "methods": ["naive", "fut-state:eig"], "jobs": 1}
    return params_dict


def test_points_set_one_knob_each_and_keep_the_corpus_text(sweep_dict, tiny):
    params = config.from_dict(sweep_dict)
    assert points(params) == {"default": {}, "steps=4": {"steps": 4}, "lr=0.0003": {"lr": 3e-4}}
    p = point_params(params, {"steps": 4}, tiny[1] / "corpus")
    assert p.window.steps == 4 and p.window.lr == params.window.lr
    assert p.groundtruth.n_random == 2 and p.cache.curvature == ["domain"] and p.estimate.default == "fut-state:eig"
    assert {n: s.path for n, s in p.corpus.sources.items()} == {
        n: str((tiny[1] / "corpus" / f"{n}.txt").resolve()) for n in params.corpus.sources}


def test_a_points_key_leaves_out_what_no_point_reads(sweep_dict):
    params = config.from_dict(sweep_dict)
    point = point_params(params, {"steps": 4}, Path("."))
    with_estimate = lambda **kw: dataclasses.replace(point, estimate=dataclasses.replace(point.estimate, **kw))
    key = point_key(point, params)
    assert point_key(with_estimate(trajectory_methods=["fut:secant"]), params) == key    # the base run's figure
    assert point_key(with_estimate(bootstrap=7), params) != key


def test_the_committed_sweep_points_are_those_of_the_committed_params():
    """reports/sweeps is tabulated by the ablations stage, which leaves out stale points: a change to what a
    point reads must come with the sweep rerun (python -m fut sweep)."""
    table, stale = collect(config.load(ROOT / "params.yaml"), ROOT / "reports/sweeps")
    assert stale == [] and table


def test_the_default_point_prepares_exactly_the_default_runs_data(sweep_dict, tiny, tmp_path):
    from fut.stages import prepare

    params = config.from_dict(sweep_dict)
    prepare.run(point_params(params, {}, tiny[1] / "corpus"), tmp_path)
    assert (tmp_path / "tokenizer/tokenizer.json").read_bytes() == (tiny[1] / "tokenizer/tokenizer.json").read_bytes()
    mine, theirs = load_file(str(tmp_path / "splits.safetensors")), load_file(str(tiny[1] / "splits.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

@pytest.mark.slow

def test_a_point_runs_whole_resumes_and_stale_results_are_refused(sweep_dict, tiny, tmp_path):
    params = config.from_dict(sweep_dict)
    out = tmp_path / "out"
    assert run_sweep(params, tiny[1] / "corpus", tmp_path / "work", out, only=["steps=4"]) == ["steps=4"]
    r = read_json(out / "steps=4.json")
    assert r["window_steps"] == 4 and r["identity_retrain_bitwise"] is True
    assert r["orders_scored"] == 3                     # 2 random + reversed; the identity is not scored
    assert set(r["methods"]) == {"naive", "fut-state:eig"}
    assert r["methods"]["naive"]["families"]["all"]["r2_order_effect"] == 0.0
    assert not (tmp_path / "work" / "steps=4").exists()           # the point's gigabytes are not kept
    assert run_sweep(params, tiny[1] / "corpus", tmp_path / "work", out, only=["steps=4"]) == []
    assert collect(params, out) == ({"steps": {"param": "window.steps", "values": {"4": r}}}, [])
    sweep_dict["curriculum"]["population"] += 1          # a section the point does not read
    assert collect(config.from_dict(sweep_dict), out)[1] == []
    sweep_dict["sweep"]["n_random"] = 3
    assert collect(config.from_dict(sweep_dict), out) == ({}, ["steps=4"])


def test_cli_names_an_unknown_point_before_any_work(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    assert main(["sweep", "--corpus", str(tmp_path / "corpus"), "--only", "steps=99"]) == 2
    assert "--only 'steps=99' is not a sweep point; points: default, batch_size=4" in capsys.readouterr().err
