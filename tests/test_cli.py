"""`python -m fut retrain|estimate --orders FILE`: JSON out, progress on stderr, help with defaults, and every
refused input as one line `error: ...` on stderr (no traceback)."""
import json
import subprocess
import sys
from importlib import metadata
from types import SimpleNamespace

import pytest
import yaml

from checks.tiny import tiny_params
from fut.stages import cache as cache_stage
from fut.cli import main


@pytest.fixture(scope="module")
def files(tiny, text_dir, tmp_path_factory):
    """The tiny run as the command line takes it: a params file, the prepared data, the reference run, a built
    cache, and a file holding the identity order."""
    params, data_dir, ref_dir, _ = tiny
    root = tmp_path_factory.mktemp("cli")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(text_dir)))
    cache_stage.run(params, data_dir, ref_dir, root / "cache")
    (root / "identity.txt").write_text(",".join(map(str, range(params.window.steps))) + "\n")
    return SimpleNamespace(root=root, params=root / "params.yaml", data=data_dir, reference=ref_dir,
                           cache=root / "cache", orders=root / "identity.txt", T=params.window.steps)


@pytest.fixture(scope="module")
def cli(files):
    def run(command, orders_text, *extra):
        (files.root / "orders.txt").write_text(orders_text)
        args = [sys.executable, "-m", "fut", command, "--orders", str(files.root / "orders.txt"),
                "--params", str(files.params), "--data", str(files.data), "--reference", str(files.reference), *extra]
        if command == "estimate":
            args += ["--cache", str(files.cache)]
        return subprocess.run(args, capture_output=True, text=True)

    return run, files.T

@pytest.mark.slow

def test_retrain_and_estimate_print_comparable_json(cli):
    run, T = cli
    orders = [list(range(T)), list(reversed(range(T)))]
    text = "\n".join(",".join(map(str, o)) for o in orders) + "\n"
    retrained = run("retrain", text)
    assert retrained.returncode == 0, retrained.stderr
    truth = json.loads(retrained.stdout)
    assert [r["order"] for r in truth] == orders and set(truth[0]) == {"order", "eval_loss", "eval_ppl"}
    assert "retrain: 100%" in retrained.stderr and "2/2" in retrained.stderr   # progress, beside pure JSON
    estimated = run("estimate", text, "--method", "fut-state:hvp")
    assert estimated.returncode == 0, estimated.stderr
    est = json.loads(estimated.stdout)
    assert [e["method"] for e in est] == ["fut-state:hvp"] * 2 and [e["order"] for e in est] == orders
    assert est[0]["eval_loss"] == pytest.approx(truth[0]["eval_loss"], abs=1e-6)   # identity: the reference


@pytest.mark.slow
@pytest.mark.parametrize("text, needle", [
    ("0,1,2\n", "line 1: order has 3 entries; window.steps = 6"),
    ("0,1,2,3,4,9\n", "order[5] = 9 is not a batch index; allowed: integers 0..5"),
    ("0,1,x,3,4,5\n", "is not comma-separated integers"),
    ("0,1,2,3,4,5\n0,1;2,3;4,5;6,7;8,9;10,0\n", "line 2: sequence 0 appears twice (batches 0 and 5)"),
    ("0,1;2,3;4,5;6,7;8,9;10\n", "line 1: batch 5 has 1 sequences; window.batch_size = 2"),
    ("0,1,2,3,4,5,0,1,2,3,4,4\n", "line 1: order holds batch 4 3 times; 2 epochs require"),
])
def test_invalid_orders_are_refused_before_any_work(cli, text, needle):
    run, _ = cli
    for command in ("retrain", "estimate"):
        proc = run(command, text)
        assert proc.returncode == 2 and needle in proc.stderr and proc.stdout == ""

@pytest.mark.slow
def test_orders_beyond_batches_need_their_stage_and_fut_subspace(cli, files):
    run, T = cli
    two_epochs = ",".join(map(str, list(range(T)) * 2)) + "\n"
    proc = run("estimate", two_epochs, "--epochs-cache", str(files.root / "no-epochs"))
    assert proc.returncode == 2 and "no 2-epoch cache; run the multi_epoch stage" in proc.stderr
    proc = run("estimate", two_epochs, "--method", "fut-state:eig")
    assert proc.returncode == 2 and "estimated by fut-subspace (or naive) only" in proc.stderr
    proc = run("estimate", ",".join(map(str, range(T))) + "\n" + two_epochs)
    assert proc.returncode == 2 and "mixes kinds of orders" in proc.stderr


@pytest.mark.slow
def test_unknown_method_is_refused_with_the_allowed_names(cli):
    run, T = cli
    proc = run("estimate", ",".join(map(str, range(T))), "--method", "magic")
    assert proc.returncode == 2 and "invalid choice: 'magic'" in proc.stderr and "fut-state:secant" in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


def refusal(capsys, files, command: str, **paths) -> str:
    """The line `python -m fut COMMAND` (in this process) refuses with: exit status 2, one line on stderr
    starting `error: `, nothing on stdout. `paths` replace the tiny run's --params, --data, ... ."""
    args = {"params": files.params, "orders": files.orders, "data": files.data, "reference": files.reference,
            **({"cache": files.cache} if command == "estimate" else {}), **paths}
    status = main([command, *(s for k, v in args.items() for s in (f"--{k}", str(v)))])
    out, err = capsys.readouterr()
    assert status == 2 and out == "", err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def edited_params(files, folder, section: str, **values):
    p = yaml.safe_load(files.params.read_text())
    p[section].update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(p))
    return folder / "params.yaml"


def test_a_params_file_with_a_yaml_syntax_error_is_refused_naming_the_file_and_line(files, tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  hidden_size: 32\n    layers: 2\n")
    err = refusal(capsys, files, "retrain", params=bad)
    assert f"params file '{bad}': line 3, column 11: mapping values are not allowed here" in err
    assert "fix the YAML syntax" in err


def test_a_missing_params_file_is_refused(files, tmp_path, capsys):
    err = refusal(capsys, files, "estimate", params=tmp_path / "missing.yaml")
    assert f"params file '{tmp_path / 'missing.yaml'}' not found; pass --params FILE" in err


def test_a_bad_params_value_is_refused_naming_the_file(files, tmp_path, capsys):
    err = refusal(capsys, files, "retrain", params=edited_params(files, tmp_path, "window", steps=1))
    assert f"{tmp_path / 'params.yaml'}: params: window.steps = 1 is not allowed" in err


def test_a_cache_folder_without_a_built_cache_is_refused(files, tmp_path, capsys):
    err = refusal(capsys, files, "estimate", cache=tmp_path)
    assert f"{tmp_path / 'manifest.json'} is missing" in err and "run the cache stage (dvc repro cache)" in err


@pytest.mark.parametrize("flag, needle", [("data", "splits"), ("reference", "trajectory/step_")])
@pytest.mark.parametrize("command", ["retrain", "estimate"])
def test_missing_data_or_reference_folders_are_refused(files, tmp_path, capsys, command, flag, needle):
    err = refusal(capsys, files, command, **{flag: tmp_path / "missing"})
    assert str(tmp_path / "missing") in err and needle in err and "not found; run the stage" in err


@pytest.mark.parametrize("section, values, folder", [
    ("data", {"seed": 1}, "prepared"),                         # the prepared data of another run
    ("optimizer", {"weight_decay": 0.5}, "step_0000"),         # the reference run of another run
])
def test_data_or_reference_of_another_run_are_refused(files, tmp_path, capsys, section, values, folder):
    err = refusal(capsys, files, "retrain", params=edited_params(files, tmp_path, section, **values))
    assert folder in err and "was built for another run" in err and "Rebuild it (dvc repro)" in err

@pytest.mark.slow

def test_a_refusal_reaches_stderr_as_one_line_without_a_traceback(files, tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("window: [6\n")
    proc = subprocess.run([sys.executable, "-m", "fut", "retrain", "--orders", str(files.orders), "--params", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: params file '{bad}': line 2") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_version_is_the_installed_one(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"fut {metadata.version('fut')}\n"


def test_help_lists_the_commands_with_their_help_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["-h"])
    out = capsys.readouterr().out
    listed = [line.split() for line in out.splitlines()]
    for command in ("retrain", "estimate", "sweep", "plan", "cache"):
        assert any(words[:1] == [command] and len(words) > 1 for words in listed), command   # with its help
        with pytest.raises(SystemExit):
            main([command, "-h"])
        assert "(default: params.yaml)" in capsys.readouterr().out, command


def test_the_default_estimate_says_how_far_to_trust_it(files, capsys):
    """`estimate` with the default method prints each order's estimate with its error indicators; the identity order
    is the reference exactly, with nothing to distrust."""
    reversed_order = ",".join(map(str, reversed(range(files.T))))
    (files.root / "two.txt").write_text(f"{','.join(map(str, range(files.T)))}\n{reversed_order}\n")
    args = ["estimate", "--orders", str(files.root / "two.txt"), "--params", str(files.params), "--data",
            str(files.data), "--reference", str(files.reference), "--cache", str(files.cache)]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["method"] for o in out] == ["fut-subspace"] * 2
    assert set(out[0]["trust"]) == {"error_indicator_ppl", "knot_disagreement", "precond_drift"}
    assert out[0]["trust"]["error_indicator_ppl"] == 0.0
    assert out[1]["trust"]["error_indicator_ppl"] > 0 and out[1]["eval_ppl"] != out[0]["eval_ppl"]
