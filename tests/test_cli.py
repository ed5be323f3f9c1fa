"""`python -m fut retrain|estimate --orders FILE`: JSON out, clear errors on bad orders."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import tiny_params_dict
from fut import pipeline


@pytest.fixture(scope="module")
def cli(tiny, text_dir, tmp_path_factory):
    params, data_dir, ref_dir, _ = tiny
    root = tmp_path_factory.mktemp("cli")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(text_dir)))
    pipeline.cache(params, data_dir, ref_dir, root / "cache")

    def run(command, orders_text, *extra):
        (root / "orders.txt").write_text(orders_text)
        args = [sys.executable, "-m", "fut", command, "--orders", str(root / "orders.txt"),
                "--params", str(root / "params.yaml"), "--data", str(data_dir), "--reference", str(ref_dir), *extra]
        if command == "estimate":
            args += ["--cache", str(root / "cache")]
        return subprocess.run(args, capture_output=True, text=True)

    return run, params.window.steps


def test_retrain_and_estimate_print_comparable_json(cli):
    run, T = cli
    orders = [list(range(T)), list(reversed(range(T)))]
    text = "\n".join(",".join(map(str, o)) for o in orders) + "\n"
    retrained = run("retrain", text)
    assert retrained.returncode == 0, retrained.stderr
    truth = json.loads(retrained.stdout)
    assert [r["order"] for r in truth] == orders and set(truth[0]) == {"order", "eval_loss", "eval_ppl"}
    estimated = run("estimate", text, "--method", "fut-state:hvp")
    assert estimated.returncode == 0, estimated.stderr
    est = json.loads(estimated.stdout)
    assert [e["method"] for e in est] == ["fut-state:hvp"] * 2 and [e["order"] for e in est] == orders
    assert est[0]["eval_loss"] == pytest.approx(truth[0]["eval_loss"], abs=1e-6)   # identity: the reference


@pytest.mark.parametrize("text, needle", [
    ("0,1,2\n", "line 1: order has 3 entries; window.steps = 6"),
    ("0,1,2,3,4,9\n", "order[5] = 9 is not a batch index; allowed: integers 0..5"),
    ("0,1,x,3,4,5\n", "is not comma-separated integers"),
])
def test_invalid_orders_are_refused_before_any_work(cli, text, needle):
    run, _ = cli
    for command in ("retrain", "estimate"):
        proc = run(command, text)
        assert proc.returncode == 2 and needle in proc.stderr and proc.stdout == ""


def test_unknown_method_is_refused_with_the_allowed_names(cli):
    run, T = cli
    proc = run("estimate", ",".join(map(str, range(T))), "--method", "magic")
    assert proc.returncode == 2 and "invalid choice: 'magic'" in proc.stderr and "fut-state:secant" in proc.stderr
