"""`python -m fut plan`: the plan's counts are what the build writes and does; too small a disk is refused."""
from __future__ import annotations

import json
from types import SimpleNamespace
from unittest import mock

import yaml

from checks.tiny import tiny_params
from fut import cli
from fut.cache import UpdateCache
from fut.plan import cache_plan
from fut.reference import ReferenceRun


def test_plan_counts_are_what_the_built_cache_holds(tiny_truth):
    params, data_dir, ref_dir, cache_dir, _ = tiny_truth
    run = ReferenceRun(params, data_dir, ref_dir)
    plan = cache_plan(params, run.prepared, cache_dir)
    store = UpdateCache(run, cache_dir)
    sizes = store.bytes()
    assert plan["bytes"] == sum(v for k, v in sizes.items() if k != "total_file_bytes")
    assert plan["files"] == len(store.paths()) and plan["missing_bytes"] == 0
    counted = plan["pair_gradients"] + plan["own_gradients"] + plan["after_gradients"]
    assert counted == store.build_cost()["gradients"]


def test_plan_command_prints_json_and_refuses_a_small_disk(tiny, text_dir, tmp_path, capsys):
    params, data_dir, ref_dir, _ = tiny
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(text_dir)))
    args = ["plan", "--params", str(tmp_path / "params.yaml"), "--data", str(data_dir), "--reference", str(ref_dir),
            "--cache", str(tmp_path / "cache")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    plan = json.loads(out.splitlines()[-1])
    assert plan["missing_bytes"] == plan["bytes"] > 0 and plan["estimated_seconds"] > 0
    with mock.patch("shutil.disk_usage", return_value=SimpleNamespace(free=plan["bytes"] - 1)):
        assert cli.main([*args, "--no-timing"]) == 1
    assert "is free on its disk" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
