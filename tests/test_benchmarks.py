"""The benchmark scripts run on the CPU in their tiny modes, as a lent GPU machine runs them at size; the ones that
read `dvc repro`'s artefacts run on the tiny pipeline's."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from benchmarks.epoch_error_ladder import RUNGS
from benchmarks.options import calibrated_scores
from checks.tiny import tiny_params
from conftest import ROOT
from fut import config, protocol
from fut.model import build_model, count_parameters
from fut.reference import ReferenceRun
from fut.orders import family


def run_script(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, f"benchmarks/{name}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def artefacts(tiny_truth, tmp_path_factory) -> tuple[list[str], dict]:
    """The tiny pipeline's artefacts as the benchmarks' options name them, and its dev ground truth."""
    params, data_dir, ref_dir, cache_dir, gt_dir = tiny_truth
    params_file = tmp_path_factory.mktemp("bench") / "params.yaml"
    params_file.write_text(config.to_yaml(params))
    return (["--params", str(params_file), "--data", str(data_dir), "--reference", str(ref_dir)],
            {"cache": str(cache_dir), "groundtruth": str(gt_dir), "dev": protocol.dev_truth(gt_dir)})


def test_gpu_profile_tiny_builds_a_cache_and_checks_estimates_against_retraining(tmp_path):
    out, work = tmp_path / "gpu_profile.json", tmp_path / "work"
    printed = run_script("gpu_profile.py", "--tiny", "--workdir", str(work), "--out", str(out))
    r = json.loads(out.read_text())
    params = config.from_dict(r["run_params"])
    profile = yaml.safe_load((ROOT / "profiles/gpu-200m.yaml").read_text())
    T = params.window.steps
    assert r["mode"] == "tiny" and r["device"] == "cpu" and r["window_steps"] == T
    # The profile's cache layout, at a stride that leaves checkpoints without pairs.
    assert (r["cache_dtype"], params.cache.curvature) == (profile["cache"]["dtype"], profile["cache"]["curvature"])
    assert 1 < r["checkpoint_stride"] < T
    assert r["gradients"] == r["expected_gradients"] and r["gradients"] < T * (T + 1)
    assert r["plan_bytes"] == r["actual_tensor_bytes"]
    assert r["throughput_fraction_of_limit"] == r["gradients_per_second"] * r["train_step_seconds"]
    assert r["identity_retrain_bitwise"] is True
    # Every estimator of the profile was scored on every dev order (the test orders only by the estimate stage).
    assert sorted(r["methods"]) == sorted(profile["estimate"]["methods"])
    assert r["orders_checked"] == len(protocol.scored({n: x["order"] for n, x in
                                                        protocol.dev_truth(work / "groundtruth").items()}))
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
    assert [row["orders"] for row in r["replay"]] == [1, 3] == [row["orders"] for row in r["subspace_replay"]]
    assert all(row["replay_step_seconds"] > 0 for row in r["replay"]) and r["train_step_seconds"] > 0
    assert all(row["per_order_seconds"] > 0 for row in r["subspace_replay"])
    # fut-subspace's basis: pairs at 0 and T, own and after-step gradients, one eigenspace per corpus domain.
    T = params.window.steps
    assert r["subspace_basis"] == 4 * T + len(params.corpus.sources) * params.cache.curvature_rank


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
        assert p.parallel.workers == 1
    assert (at_gpu.train.precision, at_gpu.model.hidden_size) == ("bf16", 1024)
    assert at_cpu.model == config.from_dict(defaults).model and at_cpu.train.precision == defaults["train"]["precision"]
    assert at_cpu.window.batch_size == defaults["window"]["batch_size"]


def test_curvature_library_tiny_compares_lanczos_with_curvlinops_on_the_dev_orders(tmp_path):
    pytest.importorskip("curvlinops")
    out = tmp_path / "curvature_library.json"
    printed = run_script("curvature_library.py", "--tiny", "--out", str(out))
    r = json.loads(out.read_text())
    params = config.from_dict(tiny_params(tmp_path))
    rank, groups = params.cache.curvature_rank, r["groups"]
    assert r["mode"] == "tiny" and r["rank"] == rank and groups == ["domain0", "domain1"]
    assert sorted(r["methods"]) == ["fut-lanczos", "hessian-eigsh", "kfac-eigsh", "none"]
    lanczos = r["methods"]["fut-lanczos"]
    # fut's own Lanczos is the cache's, step for step: the same eigenspaces and the same fut-subspace matrices.
    assert lanczos["equals_cache"] is True and lanczos["matrices_equal_cache"] is True
    assert lanczos["matvecs"] == len(groups) * params.cache.curvature_iterations
    assert lanczos["eigenpairs"] == len(groups) * rank and lanczos["overlap_with_fut_lanczos"] == pytest.approx(1, abs=1e-4)
    for m in ("hessian-eigsh", "kfac-eigsh"):
        a = r["methods"][m]
        assert a["matvecs"] >= len(groups) * r["arpack"]["ncv"] and a["seconds"] > 0
        assert 0 <= a["eigenpairs"] <= len(groups) * rank
    # Every eigenspace was judged on every dev order, and the basis holds what was kept of it.
    T = params.window.steps
    for m, a in r["methods"].items():
        assert a["dev"]["all"]["n"] == r["dev_orders"] and a["dev"]["all"]["r2_order_effect"] is not None, m
        assert a["basis_vectors"] == 4 * T + a.get("eigenpairs", 0), m
        assert m in printed


def test_estimator_speed_times_fut_subspace_and_the_replays_against_a_fair_retrain(artefacts, tmp_path):
    common, a = artefacts
    out = tmp_path / "speed.json"
    printed = run_script("estimator_speed.py", *common, "--cache", a["cache"], "--groundtruth", a["groundtruth"],
                         "--orders", "2", "--methods", "fut-subspace", "fut-subspace:exact", "fut-state:eig",
                         "--out", str(out))
    r = json.loads(out.read_text())
    assert len(r["orders"]) == 2 and all(family(n) == "random" and n in a["dev"] for n in r["orders"])
    assert [(x["method"], x["readout"]) for x in r["estimators"]] == [
        ("fut-subspace", "quadratic"), ("fut-subspace:exact", "exact"), ("fut-state:eig", "exact"),
        ("fut-state:eig", "linear")]
    assert r["retrain_seconds_per_order"] > 0 and len(r["retrain_seconds_timed"]) == 2
    assert all(x["speedup"] == pytest.approx(r["retrain_seconds_per_order"] / x["seconds_per_order"])
               for x in r["estimators"])
    assert r["cache"]["gradients_per_second"] > 0 and len(r["tokens_per_batch_scaling"]) == 3
    assert "fut-subspace" in printed


def test_curvature_batch_replays_with_the_hessian_of_each_batch_on_dev_orders(artefacts, tmp_path):
    common, a = artefacts
    out = tmp_path / "curvature_batch.json"
    run_script("curvature_batch.py", *common, "--cache", a["cache"], "--groundtruth", a["groundtruth"],
               "--orders", "4", "--variants", "hvp", "hvp-domain", "eig", "--out", str(out))
    r = json.loads(out.read_text())
    assert len(r["dev_orders"]) == 4 and all(n in a["dev"] for n in r["dev_orders"])
    assert sum(family(n) == "random" for n in r["dev_orders"]) == 2
    assert sorted(r["variants"]) == ["eig", "hvp", "hvp-domain"]
    # The batch's own Hessian replays nearly exactly; the domain batch's is another Hessian (other estimates).
    assert r["variants"]["hvp"]["families"]["all"]["r2_order_effect"] > 0.9
    assert r["estimates"]["hvp"] != r["estimates"]["hvp-domain"]


def test_cache_scale_rebuilds_in_one_process_projects_and_stores_bfloat16(artefacts, tmp_path):
    common, a = artefacts
    out = tmp_path / "scale.json"
    run_script("cache_scale.py", *common, "--cache", a["cache"], "--groundtruth", a["groundtruth"],
               "--workdir", str(tmp_path), "--out", str(out), "--metrics", str(tmp_path / "metrics.json"))
    r = json.loads(out.read_text())
    assert r == json.loads((tmp_path / "metrics.json").read_text())
    assert r["workers_equivalence"] is True and r["plan_bytes"] == r["actual_tensor_bytes"]
    assert r["projection_seconds"] > 0 and r["projector"]["k"] == config.load(common[1]).projection.k
    assert sorted(r["dtype"]) == ["bfloat16", "float32"]
    assert r["dtype"]["bfloat16"]["grad_bytes"] < r["dtype"]["float32"]["grad_bytes"]
    assert sorted(r["bfloat16_max_abs_eval_loss_shift"]) == ["fut-subspace", "fut-subspace:exact"]
    assert all(0 < shift < 1e-2 for shift in r["bfloat16_max_abs_eval_loss_shift"].values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("fut-")]   # the temporary caches are gone


def test_from_scratch_builds_the_default_methods_cache_and_scores_orders(artefacts, tmp_path):
    common, a = artefacts
    out = tmp_path / "from_scratch.json"
    run_script("from_scratch.py", *common, "--pipeline-cache", a["cache"], "--orders", "2", "8", "--retrains", "1",
               "--out", str(out))
    r = json.loads(out.read_text())
    assert r["subspace_equals_pipeline_cache"] is True
    assert sorted(r["from_scratch"]) == ["2", "8"] and r["retrain_seconds_per_order"] > 0


def test_scaling_points_span_the_tokens_and_model_sizes_the_benchmark_claims(tmp_path):
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks/scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    base = config.load(ROOT / "params.yaml")
    sizes = {}
    for name, knobs in scaling.points().items():
        p = scaling.params_for(base, knobs, tmp_path, orders=3, warmstart_steps=50)
        T = p.window.steps
        assert (p.cache.checkpoint_stride, p.cache.eval_grad_stride, p.warmstart.steps) == (T, T, 50)
        assert p.groundtruth.n_random == 3 and p.estimate.methods == scaling.METHODS
        sizes[name] = (p.window.batch_size * p.data.seq_len,
                       count_parameters(p.model, p.tokenizer.vocab_size, p.data.seq_len))
    assert sorted(t for name, (t, _) in sizes.items() if name.startswith("tokens=")) == [512, 2048, 8192]
    n_params = sorted(n for _, n in sizes.values())
    assert 0.5e6 < n_params[0] < 2e6 and 15e6 < n_params[-1] < 25e6   # about 1M to 20M parameters


def epoch_dev_args(artefacts, tiny_truth, tmp_path, out) -> list[str]:
    """The multi_epoch stage run on the tiny run, and the options of a benchmark on its dev set (one extra order
    per family), writing `out` (last, so a bad-input call can drop it)."""
    from fut.multi_epoch import multi_epoch
    params, data_dir, ref_dir, cache_dir, _ = tiny_truth
    multi_epoch(params, data_dir, ref_dir, cache_dir, tmp_path / "me")
    common, a = artefacts
    return [*common, "--cache", a["cache"], "--multi-epoch", str(tmp_path / "me"), "--extra", "1", "1", "1",
            "--work", str(tmp_path / "work"), "--out", str(out)]


def test_epoch_curvature_scores_five_replays_and_the_dampings_on_dev_orders_only(artefacts, tiny_truth, tmp_path):
    params = tiny_truth[0]
    out = tmp_path / "epoch_curvature.json"
    args = epoch_dev_args(artefacts, tiny_truth, tmp_path, out)
    printed = run_script("epoch_curvature.py", *args, "--damping", "0", "5", "--calibrate", "2")
    r = json.loads(out.read_text())
    E = params.multi_epoch.epochs[0]
    n_random = sum(v for k, v in params.multi_epoch.dev.items() if k.startswith("random")) + 2     # + the extra
    calibrated = r["results"][f"E={E} pair at 0 exact"]["random_calibrated"]["2"]
    assert calibrated["affine"]["n_scored"] == n_random - 2 and "| R² line |" in printed
    adopted, eigen, ends = "galerkin, pair and visits", "pair and visits", "pair and visits, pairs at 0 and E·T only"
    labels = (adopted, eigen, "pair at 0", "none", ends)
    layouts = (adopted, eigen, ends)
    damped = tuple(f"{c}, damping {lam}" for c in layouts for lam in (0, 5))
    keys = {f"E={E} {c} {k}" for c in labels + damped for k in ("quadratic", "exact")}
    assert r["split"] == "dev" and set(r["results"]) == keys and "| R² random |" in printed
    n_dev = sum(params.multi_epoch.dev.values())
    assert all(x["all"]["n"] == n_dev + 3 for x in r["results"].values())
    assert len({json.dumps(r["results"][f"E={E} {c} exact"]) for c in labels}) == 5
    assert set(r["best_damping_per_layout"][str(E)]) == set(layouts)
    # λ = 0 is each layout itself; another λ changes the estimates; the chosen one is the adopted layout's best
    for c in layouts:
        assert r["results"][f"E={E} {c}, damping 0 exact"] == r["results"][f"E={E} {c} exact"]
        assert r["results"][f"E={E} {c}, damping 5 exact"] != r["results"][f"E={E} {c} exact"]
    assert r["chosen_damping"][str(E)] == r["best_damping_per_layout"][str(E)][adopted]["damping"]
    assert r["chosen_damping"][str(E)] in (0, 5) and "chosen: E = " in printed
    for bad, needle in ((["--seed", str(params.multi_epoch.seed)], "--seed must differ"),
                        (["--damping", "-1"], "--damping must be >= 0"),
                        (["--calibrate", "1"], "--calibrate needs K >= 2")):
        taken = subprocess.run([sys.executable, "benchmarks/epoch_curvature.py", *args[:-2], *bad], cwd=ROOT,
                               capture_output=True, text=True)
        assert taken.returncode == 2 and needle in taken.stderr


def test_epoch_curvature_scale_scores_every_scale_and_damping_on_dev_orders_only(artefacts, tiny_truth, tmp_path):
    params = tiny_truth[0]
    out = tmp_path / "scale.json"
    args = epoch_dev_args(artefacts, tiny_truth, tmp_path, out)
    printed = run_script("epoch_curvature_scale.py", *args, "--scales", "0.5", "1", "--damping", "0", "5")
    r = json.loads(out.read_text())
    E = params.multi_epoch.epochs[0]
    keys = {f"E={E} scale {a:g} damping {lam:g}" for a in (0.5, 1) for lam in (0, 5)}
    assert r["split"] == "dev" and set(r["results"]) == keys and "| R² random |" in printed
    n_dev = sum(params.multi_epoch.dev.values())
    assert all(x["all"]["n"] == n_dev + 3 for x in r["results"].values())
    assert len({json.dumps(x) for x in r["results"].values()}) == 4      # each scale and damping moves the estimates
    chosen = r["chosen"][str(E)]
    worse = lambda x: min(x[f]["r2_order_effect"] for f in ("random", "domain_blocks"))
    assert chosen["worse_family_r2"] == max(worse(x) for x in r["results"].values())
    assert worse(r["results"][f"E={E} scale {chosen['scale']:g} damping {chosen['damping']:g}"]) == chosen["worse_family_r2"]
    assert "chosen: E = " in printed
    for bad, needle in ((["--seed", str(params.multi_epoch.seed)], "--seed must differ"),
                        (["--scales", "0"], "--scales must be > 0")):
        taken = subprocess.run([sys.executable, "benchmarks/epoch_curvature_scale.py", *args[:-2], *bad], cwd=ROOT,
                               capture_output=True, text=True)
        assert taken.returncode == 2 and needle in taken.stderr


def test_epoch_curvature_source_scores_the_hessian_at_each_epoch_boundary_and_a_larger_batch(artefacts, tiny_truth,
                                                                                             tmp_path):
    params = tiny_truth[0]
    out = tmp_path / "source.json"
    args = epoch_dev_args(artefacts, tiny_truth, tmp_path, out)
    printed = run_script("epoch_curvature_source.py", *args, "--sizes", "5", "--damping", "0", "5")
    r = json.loads(out.read_text())
    E, T = params.multi_epoch.epochs[0], params.window.steps
    k = params.multi_epoch.curvature_batch[str(E)]
    labels = [f"θ_{t}, {k} sequences" for t in range(0, E * T + 1, T)] + ["θ_0, 5 sequences"]
    scales = sorted({1.0, params.multi_epoch.curvature_scale[str(E)]})
    keys = {f"E={E} {label} scale {a:g} damping {lam:g}" for label in labels for a in scales for lam in (0, 5)}
    assert r["split"] == "dev" and set(r["results"]) == keys and "| trace / θ_0's |" in printed
    spectra = r["spectra"][str(E)]
    assert set(spectra) == set(labels) and spectra[labels[0]]["trace_ratio"] == [1.0] * len(spectra[labels[0]]["domains"])
    assert all(np.isfinite(s["trace_ratio"] + s["top_eigenvalue"]).all() for s in spectra.values())
    # each curvature moves the estimates: no two sources score alike at the same scale and damping
    for a in scales:
        assert len({json.dumps(r["results"][f"E={E} {label} scale {a:g} damping 0"]) for label in labels}) == len(labels)
    worse = lambda x: min(x[f]["r2_order_effect"] for f in ("random", "domain_blocks"))
    for name, b in r["best"][str(E)].items():
        assert b["worse_family_r2"] == max(worse(r["results"][f"E={E} {name} damping {lam:g}"]) for lam in (0, 5))
    taken = subprocess.run([sys.executable, "benchmarks/epoch_curvature_source.py", *args[:-2], "--sizes", "0"],
                           cwd=ROOT, capture_output=True, text=True)
    assert taken.returncode == 2 and "--sizes must be >= 1" in taken.stderr


def test_epoch_deviation_compares_the_replay_with_training_every_half_epoch(artefacts, tiny_truth, tmp_path):
    from fut.multi_epoch import multi_epoch
    params, data_dir, ref_dir, cache_dir, _ = tiny_truth
    multi_epoch(params, data_dir, ref_dir, cache_dir, tmp_path / "me")
    common, a = artefacts
    out = tmp_path / "epoch_deviation.json"
    printed = run_script("epoch_deviation.py", *common, "--cache", a["cache"], "--multi-epoch", str(tmp_path / "me"),
                         "--out", str(out))
    E, T = params.multi_epoch.epochs[0], params.window.steps
    r = json.loads(out.read_text())["results"][str(E)]
    assert "| ‖δ replay‖" in printed and len(r["orders"]) == sum(params.multi_epoch.dev.values())
    for rows in r["orders"].values():
        assert [x["step"] for x in rows] == list(range(T // 2, E * T + 1, T // 2))
        assert all(x["cosine"] is None or -1 - 1e-6 <= x["cosine"] <= 1 + 1e-6 for x in rows)
        assert rows[-1]["true_norm"] > 0 and rows[-1]["cosine"] is not None


def test_epoch_error_ladder_reproduces_training_in_flat_form_and_scores_each_rung_on_dev_orders(artefacts, tiny_truth,
                                                                                                tmp_path):
    params = tiny_truth[0]
    out = tmp_path / "ladder.json"
    args = epoch_dev_args(artefacts, tiny_truth, tmp_path, out)
    E = params.multi_epoch.epochs[0]
    printed = run_script("epoch_error_ladder.py", *args, "--epochs", str(E))
    full = json.loads(out.read_text())
    r = full["results"]
    assert full["split"] == "dev" and set(r) == {f"E={E} {rung}" for rung in RUNGS} | {f"E={E} n"}
    assert r[f"E={E} n"]["all"] == sum(params.multi_epoch.dev.values()) + 3 and "| fut-subspace quadratic |" in printed
    # rung 0 is AdamW in flat form: it lands on each retrained loss up to float32 summation order
    assert r[f"E={E} adam"]["max_abs_loss_vs_truth"] < 1e-4
    assert r[f"E={E} adam"]["vs_previous"] is None and r[f"E={E} v from the reference"]["vs_previous"] is not None
    # every later rung is an approximation that moves the estimates
    assert all(r[f"E={E} {rung}"]["max_abs_loss_vs_truth"] > 1e-6 for rung in RUNGS[1:])
    assert len({json.dumps(r[f"E={E} {rung}"]["vs_truth"]) for rung in RUNGS}) == len(RUNGS)


def test_pretrained_finetune_saves_the_window_start_as_a_checkpoint_the_pipeline_loads_exactly(tiny, tmp_path):
    spec = importlib.util.spec_from_file_location("pretrained_finetune", ROOT / "benchmarks/pretrained_finetune.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    params, data_dir, ref_dir, _ = tiny
    ref = ReferenceRun(params, data_dir, ref_dir)
    checkpoint = bench.save_checkpoint(ref, tmp_path / "checkpoint")
    finetune = bench.finetune_params(params, checkpoint, data_dir / "corpus")
    elsewhere = bench.save_checkpoint(ref, tmp_path / "moved" / "checkpoint")      # a rerun from another checkout
    key = bench.checkpoint_key(finetune, params, checkpoint)
    assert key == bench.checkpoint_key(bench.finetune_params(params, elsewhere, data_dir / "corpus"), params, elsewhere)
    (elsewhere / "model.safetensors").write_bytes(b"other weights")
    assert key != bench.checkpoint_key(finetune, params, elsewhere)
    assert finetune.model.pretrained == str(checkpoint.resolve()) and not finetune.warmstart.enabled
    loaded = dict(build_model(finetune.model, ref.prepared.vocab_size, params.data.seq_len).named_parameters())
    assert loaded.keys() == ref.start.theta.keys()
    assert all(torch.equal(loaded[k], ref.start.theta[k]) for k in loaded)


def test_sequence_curvature_scores_three_replays_on_dev_orders_only(artefacts, tiny_truth, tmp_path):
    from fut.sample_orders import sample_orders
    params, data_dir, ref_dir, cache_dir, _ = tiny_truth
    sample_orders(params, data_dir, ref_dir, cache_dir, tmp_path / "so")
    common, a = artefacts
    out = tmp_path / "sequence_curvature.json"
    args = [*common, "--cache", a["cache"], "--sample-orders", str(tmp_path / "so"), "--extra-random", "2",
            "--work", str(tmp_path / "work"), "--out", str(out)]
    printed = run_script("sequence_curvature.py", *args)
    r = json.loads(out.read_text())
    keys = {f"{c} {k}" for c in ("at its own step", "at θ_0", "none") for k in ("quadratic", "exact")}
    assert r["split"] == "dev" and set(r["results"]) == keys and "| R² random |" in printed
    n_dev = sum(params.sample_orders.dev.values())
    assert r["n_all"] == n_dev + 2 and all(x["all"]["n"] == n_dev + 2 for x in r["results"].values())
    assert r["results"]["none exact"] != r["results"]["at its own step exact"]
    assert len(list((tmp_path / "work" / "groundtruth").glob("*.json"))) >= 2      # the extra retrains, kept
    taken = subprocess.run([sys.executable, "benchmarks/sequence_curvature.py", *args[:-2], "--seed",
                            str(params.sample_orders.test_seed)], cwd=ROOT, capture_output=True, text=True)
    assert taken.returncode == 2 and "--seed must differ" in taken.stderr


def test_surrogate_calls_fits_each_multiplier_on_dev_random_orders_only(artefacts, tmp_path):
    common, a = artefacts
    out = tmp_path / "surrogate_calls.json"
    printed = run_script("surrogate_calls.py", *common, "--cache", a["cache"], "--groundtruth", a["groundtruth"],
                         "--calls", "1", "8", "--held-out", "50", "--out", str(out))
    r = json.loads(out.read_text())
    T = config.load(common[1]).window.steps
    assert r["split"] == "dev" and r["n_dev_random"] == sum(family(n) == "random" for n in a["dev"])
    assert [x["estimator_calls"] for x in r["calls"].values()] == [T * T, 8 * T * T]
    assert r["chosen"] == max(r["calls"], key=lambda k: r["calls"][k]["dev_random"]["r2_order_effect"])
    assert "| calls per T² |" in printed and "chosen:" in printed
    bad = subprocess.run([sys.executable, "benchmarks/surrogate_calls.py", *common, "--calls", "0"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--calls must be positive" in bad.stderr


def test_a_calibration_on_k_orders_recovers_an_affinely_wrong_estimator():
    """Estimates off by a line (or a shift) become exact for every order outside the k it is fitted on."""
    truth = np.log(np.linspace(260.0, 264.0, 9))
    naive = float(np.log(262.5))
    rows = list(range(9))
    line = calibrated_scores(naive + 0.3 + 2.0 * (truth - naive), truth, naive, rows, k=3, draws=5, seed=0)
    assert line["affine"]["r2_order_effect"] == pytest.approx(1.0) and line["affine"]["n_scored"] == 6
    assert line["shift"]["r2_order_effect"] < 0.9                       # a shift cannot undo the slope
    shifted = calibrated_scores(truth + 0.01, truth, naive, rows, k=3, draws=5, seed=0)
    assert shifted["shift"]["r2_order_effect"] == pytest.approx(1.0)
    assert calibrated_scores(truth, truth, naive, rows, k=7, draws=5, seed=0) is None    # 2 left: too few to score
