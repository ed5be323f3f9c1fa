"""The GPU benchmark scripts run on the CPU in their tiny modes, as a lent GPU machine runs them at size."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import yaml

from checks.tiny import tiny_params
from conftest import ROOT
from fut import config
from fut.cache import has_pairs
from fut.model import count_parameters
from fut.pipeline import held_out


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, f"benchmarks/{name}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_profile_tiny_builds_a_cache_and_checks_estimates_against_retraining(tmp_path):
    out = tmp_path / "gpu_profile.json"
    printed = run_script("gpu_profile.py", "--tiny", "--workdir", str(tmp_path / "work"), "--out", str(out))
    r = json.loads(out.read_text())
    params = config.from_dict(r["run_params"])
    profile = yaml.safe_load((ROOT / "profiles/gpu-200m.yaml").read_text())
    T = params.window.steps
    assert r["mode"] == "tiny" and r["device"] == "cpu" and r["window_steps"] == T
    # The profile's cache layout, at a stride that leaves checkpoints without pairs.
    assert (r["cache_dtype"], params.cache.curvature) == (profile["cache"]["dtype"], profile["cache"]["curvature"])
    assert 1 < r["checkpoint_stride"] < T
    assert r["pairs"] == sum(T if has_pairs(params, t) else int(t < T) for t in range(T + 1))
    assert r["plan_bytes"] == r["actual_tensor_bytes"]
    assert r["throughput_fraction_of_limit"] == r["pairs_per_second"] * r["train_step_seconds"]
    assert r["identity_retrain_bitwise"] is True
    # Every estimator of the profile was scored on the held-out half of the retrained orders.
    assert sorted(r["methods"]) == sorted(profile["estimate"]["methods"])
    assert r["orders_checked"] == len(held_out([f"o{i}" for i in range(r["ground_truth_orders"] - 1)], 0))
    for method, score in r["methods"].items():
        assert score["identity_returns_reference"] is True, method
        assert score["n_non_finite"] == 0 and -1e9 < score["r2_order_effect"] <= 1, method
        assert method in printed
    assert r["methods"]["naive"]["r2_order_effect"] == 0.0


def test_gpu_step_costs_on_a_cpu_profile(tmp_path, text_dir):
    params_file, out = tmp_path / "params.yaml", tmp_path / "steps.json"
    params_file.write_text(yaml.safe_dump(tiny_params(text_dir)))
    run_script("gpu_step_costs.py", "--params", str(params_file), "--orders", "1", "3", "--repeat", "1",
               "--out", str(out))
    r = json.loads(out.read_text())
    params = config.load(params_file)
    assert r["device"] == "cpu"
    assert r["n_params"] == count_parameters(params.model, params.tokenizer.vocab_size, params.data.seq_len)
    assert [row["orders"] for row in r["replay"]] == [1, 3]
    assert all(row["replay_step_seconds"] > 0 for row in r["replay"]) and r["train_step_seconds"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is of a machine without CUDA")
def test_gpu_profile_without_a_gpu_is_refused_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_profile.py", "--workdir", str(tmp_path / "work"),
                           "--out", str(tmp_path / "out.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "train.device = 'cuda' but no CUDA device is visible" in done.stderr
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "work").exists()


def test_gpu_profile_small_run_keeps_the_profile_layout_at_the_chosen_size():
    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "benchmarks/gpu_profile.py")
    gpu_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_profile)
    profile, defaults = ROOT / "profiles/gpu-200m.yaml", yaml.safe_load((ROOT / "params.yaml").read_text())
    at_gpu = config.from_dict(gpu_profile.small_params(profile, None))
    at_cpu = config.from_dict(gpu_profile.small_params(profile, ROOT / "params.yaml"))
    for p in (at_gpu, at_cpu):   # SMALL's shrinking, the profile's cache layout and methods
        assert (p.window.steps, p.warmstart.steps, p.cache.checkpoint_stride) == (6, 200, 3)
        assert (p.cache.dtype, p.cache.curvature) == ("bfloat16", ["domain"])
        assert p.estimate.methods == yaml.safe_load(profile.read_text())["estimate"]["methods"]
    assert (at_gpu.train.precision, at_gpu.model.hidden_size) == ("bf16", 1024)
    assert at_cpu.model == config.from_dict(defaults).model and at_cpu.train.precision == defaults["train"]["precision"]
    assert at_cpu.window.batch_size == defaults["window"]["batch_size"]
