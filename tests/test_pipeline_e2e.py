"""The real pipeline: `dvc repro` (real papermill, real notebooks) on tiny params in a copy of the repo."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from checks.tiny import tiny_params
from conftest import ROOT


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory, text_dir):
    """A fresh clone-like copy (tracked and unignored files only) with tiny params, committed."""
    dest = tmp_path_factory.mktemp("e2e") / "repo"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("reports/", "dvc.lock")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "data" / "sources").mkdir(parents=True, exist_ok=True)   # a declared dependency of prepare
    (dest / "reports" / "sweeps").mkdir(parents=True)   # the ablations stage's: no sweep points for tiny params
    params = tiny_params(text_dir)
    params["cache"]["workers"] = 2        # the stage launches torchrun ranks from its notebook, as by default
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        _run(cmd, dest, env)
    return dest, env


@pytest.mark.slow
def test_dvc_repro_builds_every_stage(repo):
    dest, env = repo
    _run(["dvc", "repro"], dest, env)
    ref = json.loads((dest / "reports/metrics/reference.json").read_text())
    assert ref["identity_retrain_bitwise"] is True and ref["window_steps"] == 6 and ref["batch_size"] == 2
    assert ref["n_params"] > 0 and ref["eval_ppl_end"] > 1
    gt = json.loads((dest / "reports/metrics/groundtruth.json").read_text())
    for key in ("n_orders", "true_ppl_mean", "true_ppl_std", "true_ppl_min", "true_ppl_max",
                "retrain_seconds_per_order"):
        assert key in gt
    assert gt["n_orders"] == 8
    est = json.loads((dest / "reports/metrics/estimators.json").read_text())
    default = yaml.safe_load((dest / "params.yaml").read_text())["estimate"]["default"]
    assert est["default_method"] == default and est["retrain_seconds_per_order"] > 0
    for name, m in est["methods"].items():
        for key in ("spearman", "kendall", "r2_order_effect", "absdiff_ppl", "rel_err", "seconds_per_order",
                    "cache_seconds", "cache_bytes"):
            assert key in m, (name, key)
        assert m["identity_returns_reference"] is True, name
    assert est["methods"]["naive"]["r2_order_effect"] == 0.0
    cache = json.loads((dest / "reports/metrics/cache.json").read_text())
    assert cache["pairs"] == 7 * 6 and cache["bytes"]["grad"] == 7 * 6 * ref["n_params"] * 4
    assert cache["workers"] == 2      # built by 2 torchrun ranks, as planned byte for byte
    assert cache["plan"]["bytes"] == sum(v for k, v in cache["bytes"].items() if k != "total_file_bytes")
    for nb in ("01_prepare", "02_reference", "03_groundtruth", "04_cache", "05_estimate"):
        executed = json.loads((dest / f"reports/notebooks/{nb}.ipynb").read_text())
        assert any(c.get("outputs") for c in executed["cells"]), nb
    for fig in ("corpus_tokens", "reference_curves", "groundtruth_ppl", "groundtruth_trajectories", "cache_cost",
                "estimates_scatter", "estimate_trajectories"):
        assert (dest / f"reports/figures/{fig}.png").stat().st_size > 1000
    # Applications (issue 4) and the report.
    cur = json.loads((dest / "reports/metrics/curriculum.json").read_text())
    for name in ("random", "identity", "easy_to_hard", "interleaved_easy_to_hard", "genetic", "assignment",
                 "estimator_search"):
        assert {"true_ppl", "ci_low", "ci_high", "seconds", "peak_mb"} <= set(cur[name]), name
    assert cur["random"]["n_orders"] == 2 and -1 <= cur["rank_agreement"]["spearman"] <= 1
    mem = json.loads((dest / "reports/metrics/memorization.json").read_text())
    for name in (est["default_method"], "fut", "fut++"):
        assert {"mse", "mae", "spearman"} <= set(mem["estimators"][name]), name
        assert {"mse", "mae", "spearman"} <= set(mem["generalization"]["estimators"][name]), name
    dom = json.loads((dest / "reports/metrics/domain_order.json").read_text())
    assert dom["n_orders"] == 2 and dom["n_retrained"] == 0
    for nb in ("07_curriculum", "08_memorization", "09_domain_order"):
        executed = json.loads((dest / f"reports/notebooks/{nb}.ipynb").read_text())
        assert any(c.get("outputs") for c in executed["cells"]), nb
    for fig in ("curriculum_strategies", "curriculum_search", "memorization_heatmaps", "generalization",
                "domain_order"):
        assert (dest / f"reports/figures/{fig}.png").stat().st_size > 1000
    readme = (dest / "reports/README.md").read_text()
    for fig in (dest / "reports/figures").glob("*.png"):
        assert f"](figures/{fig.name})" in readme, fig.name
    assert "has not been built" not in readme
    status = _run(["dvc", "status"], dest, env)
    assert "up to date" in status

    # Changing a groundtruth-only param reruns groundtruth alone; metrics diff sees the change.
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["groundtruth"]["n_random"] = 3
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], dest, env)
    assert "Stage 'prepare' didn't change" in out and "Stage 'reference' didn't change" in out
    assert "Stage 'cache' didn't change" in out
    assert json.loads((dest / "reports/metrics/groundtruth.json").read_text())["n_orders"] == 9


@pytest.mark.slow
def test_dvc_exp_run_with_set_param(repo):
    dest, env = repo
    out = _run(["dvc", "exp", "run", "-S", "window.batch_size=3", "-S", "groundtruth.n_random=1"], dest, env)
    assert "Ran experiment" in out
    shown = _run(["dvc", "exp", "show", "--json"], dest, env)
    assert '"batch_size": 3' in shown.replace(" ", "").replace('"batch_size":3', '"batch_size": 3')
