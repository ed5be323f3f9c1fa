"""The real pipelines: `dvc repro` and `dvc repro applications/dvc.yaml` (real papermill, real notebooks) on tiny
params in a copy of the repo."""
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
    params["parallel"]["workers"] = 2     # the stages launch torchrun ranks from their notebooks, as by default
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        _run(cmd, dest, env)
    return dest, env


def _set_workers(dest: Path, workers: int) -> None:
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["parallel"]["workers"] = workers
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_dvc_repro_builds_every_stage(repo):
    dest, env = repo
    out = _run(["dvc", "repro"], dest, env)
    # `dvc repro` builds the estimator and its validation, none of the applications.
    applications = ("curriculum", "memorization", "domain_order", "sample_orders", "multi_epoch")
    assert "Running stage 'estimate'" in out and not [a for a in applications if f"stage '{a}'" in out]
    assert not (dest / "reports/applications.md").exists()
    metrics = lambda name: json.loads((dest / f"reports/metrics/{name}.json").read_text())
    cache = metrics("cache")
    assert cache["workers"] == 2      # built by 2 torchrun ranks, as planned byte for byte
    assert cache["plan"]["bytes"] == sum(v for k, v in cache["bytes"].items() if k != "total_file_bytes")

    # The worker count is no param of any stage: changing it reruns nothing. The applications run in one process
    # (each torchrun launch costs about 6 s of imports here; launching from the notebooks is tested above).
    stale = json.loads(_run(["dvc", "status", "--json"], dest, env))
    _set_workers(dest, 1)
    assert json.loads(_run(["dvc", "status", "--json"], dest, env)) == stale
    out = _run(["dvc", "repro", "applications/dvc.yaml"], dest, env)
    assert "Running stage 'applications/dvc.yaml:report'" in out and "Running stage 'estimate'" not in out
    ref = metrics("reference")
    assert ref["identity_retrain_bitwise"] is True and ref["window_steps"] == 6 and ref["batch_size"] == 2
    gt = metrics("groundtruth")
    assert gt["dev"]["n_orders"] == 8 and gt["test"]["n_orders"] == 7
    est = metrics("estimators")
    default = yaml.safe_load((dest / "params.yaml").read_text())["estimate"]["default"]
    assert est["default_method"] == default and est["retrain_seconds_per_order"] > 0
    for split in ("dev", "test"):
        assert set(est[split]["families"]) == {"random", "domain_blocks", "structured", "all"}
        for method, acc in est[split]["families"]["all"].items():
            assert {"spearman", "kendall", "r2_order_effect", "bias_ppl", "absdiff_ppl", "rel_err", "n"} <= set(acc)
    assert est["test"]["families"]["all"]["naive"]["r2_order_effect"] == 0.0
    assert {"10", "100", "1000"} == set(est["from_scratch"]) and est["speedup_per_order"] > 0
    assert metrics("projection")["projector"]["k"] == 64
    for nb in ("01_prepare", "02_reference", "03_groundtruth", "04_cache", "05_estimate", "06_ablations",
               "07_curriculum", "08_memorization", "09_domain_order", "10_sample_orders", "11_multi_epoch"):
        executed = json.loads((dest / f"reports/notebooks/{nb}.ipynb").read_text())
        assert any(c.get("outputs") for c in executed["cells"]), nb
        assert "IProgress" not in json.dumps(executed), nb                # no widget warning in the notebooks
    cur = metrics("curriculum")
    for name in ("random", "identity", "easy_to_hard", "interleaved_easy_to_hard", "genetic", "assignment",
                 "estimator_search"):
        assert {"true_ppl", "ci_low", "ci_high", "seconds", "peak_mb"} <= set(cur[name]), name
    mem = metrics("memorization")
    assert {"mse", "mae", "spearman"} <= set(mem["estimators"][default])
    assert metrics("domain_order")["n_orders"] == 2
    assert set(metrics("error_proxy")) >= {"spearman_with_true_error", "n_orders", "flagged", "failing"}
    keys = {"spearman", "kendall", "r2_order_effect", "bias_ppl", "absdiff_ppl", "rel_err", "n"}
    for name, n_dev, n_test in (("sample_orders", 5, 6), ("multi_epoch", 4, 6)):
        m = metrics(name)
        assert m["dev"]["n_orders"] == n_dev and m["test"]["n_orders"] == n_test, name
        assert keys <= set(m["test"]["families"]["random"]["fut-subspace"]) and m["cache_bytes"] > 0, name
        assert m["cache_seconds"] > 0, name
    assert metrics("multi_epoch")["epochs"] == 2 and metrics("multi_epoch")["domain_order"]["n_orders"] == 2
    sample = metrics("sample_orders")
    assert "search_best" in sample["curriculum"]["strategies"] and sample["memorization"]["rows"]
    summary = metrics("summary")
    assert summary["default_method"] == default and set(summary["test"]) >= {"random", "all"}
    readme = (dest / "reports/README.md").read_text()
    pages = readme + (dest / "reports/applications.md").read_text()
    assert readme.index("## Summary") < readme.index("## Corpus")
    for fig in (dest / "reports/figures").glob("*.png"):
        assert f"](figures/{fig.name})" in pages, fig.name
    assert "has not been built" not in pages
    assert "up to date" in _run(["dvc", "status"], dest, env)

    # An edit to a module reports exactly the stages that import it.
    with open(dest / "fut/subspace.py", "a") as fh:
        fh.write("# an edit\n")
    changed = _run(["dvc", "status", "--json"], dest, env)
    stale = set(json.loads(changed))
    assert {"cache", "estimate", "ablations", *(f"applications/dvc.yaml:{a}" for a in applications)} <= stale
    assert not stale & {"prepare", "reference", "groundtruth"}, stale
    _run(["git", "checkout", "--", "fut/subspace.py"], dest, env)

    # An experiment with a new projection size and a larger ground truth (`dvc exp run -S`, as the README offers):
    # projection and groundtruth rerun with what reads them; prepare, reference and the cache do not; the
    # applications that read the ground truth are left for `dvc exp run applications/dvc.yaml`.
    out = _run(["dvc", "exp", "run", "-S", "projection.k=32", "-S", "groundtruth.n_random=3"], dest, env)
    assert "Ran experiment" in out and "Running stage 'projection'" in out and "Running stage 'groundtruth'" in out
    for stage in ("prepare", "reference", "cache"):
        assert f"Stage '{stage}' didn't change" in out, stage
    assert metrics("projection")["projector"]["k"] == 32 and metrics("groundtruth")["dev"]["n_orders"] == 9
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], dest, env))
    assert '"k": 32' in json.dumps(shown)
    stale = json.loads(_run(["dvc", "status", "--json"], dest, env))
    assert set(stale) == {f"applications/dvc.yaml:{a}" for a in ("curriculum", "memorization", "domain_order")}
