import dataclasses
from pathlib import Path

import pytest
import yaml

from fut import config
from fut.model import count_parameters

ROOT = Path(__file__).resolve().parents[1]


def test_default_params_load():
    p = config.load(ROOT / "params.yaml")
    assert p.window.steps == 24 and p.warmstart.enabled
    assert set(p.corpus.sources) == {"shakespeare", "bible", "python_docs", "linux_docs"}


@pytest.mark.parametrize("path, value, needle", [
    (("window", "batch_size"), 0, "window.batch_size = 0"),
    (("window", "lr"), -1e-4, "window.lr = -0.0001"),
    (("warmstart", "lr"), "fast", "warmstart.lr = 'fast'"),
    (("tokenizer", "vocab_size"), 200, "tokenizer.vocab_size = 200"),
    (("model", "num_attention_heads"), 3, "model.num_attention_heads = 3"),
    (("window", "steps"), 1, "window.steps = 1"),
    (("window", "batches"), "shuffled", "window.batches = 'shuffled'"),
    (("optimizer", "beta2"), 1.0, "optimizer.beta2 = 1.0"),
    (("train", "threads"), 2.5, "train.threads = 2.5"),
    (("groundtruth", "structured"), ["sideways"], "groundtruth.structured[0] = 'sideways'"),
    (("warmstart", "enabled"), "yes", "warmstart.enabled = 'yes'"),
    (("cache", "curvature"), ["domain", "domain"], "cache.curvature = ['domain', 'domain']"),
    (("cache", "curvature"), ["window"], "estimate.methods[1] = 'fut-subspace'"),   # needs domain eigenspaces
    (("cache", "curvature"), ["per-token"], "cache.curvature[0] = 'per-token'"),
    (("parallel", "workers"), 0, "parallel.workers = 0"),
    (("cache", "checkpoint_stride"), 0, "cache.checkpoint_stride = 0"),
    (("cache", "checkpoint_stride"), 2, "estimate.methods[3] = 'fut:secant-raw'"),   # reads every checkpoint
    (("cache", "curvature_checkpoints"), [3], "cache.curvature_checkpoints = [3]"),
    (("cache", "subspace_stride"), 0, "cache.subspace_stride = 0"),
    (("projection", "k"), 0, "projection.k = 0"),
    (("estimate", "default"), "fut", "estimate.default = 'fut'"),
    (("estimate", "trajectory_methods"), ["fut:hvp"], "estimate.trajectory_methods[0] = 'fut:hvp'"),  # no replay
    (("estimate", "trajectory_methods"), ["fut-subspace"], "estimate.trajectory_methods[0] = 'fut-subspace'"),
    (("groundtruth", "trajectories"), -1, "groundtruth.trajectories = -1"),
    (("curriculum", "finalists"), 0, "curriculum.finalists = 0"),
    (("curriculum", "population"), 1, "curriculum.population = 1"),
    (("curriculum", "elite"), 4, "curriculum.elite = 4"),
    (("curriculum", "mutation"), 1.5, "curriculum.mutation = 1.5"),
    (("curriculum", "searches"), ["genetic", "genetic"], "curriculum.searches = ['genetic', 'genetic']"),
    (("curriculum", "searches"), ["annealing"], "curriculum.searches[0] = 'annealing'"),
    (("curriculum", "verify_top"), 0, "curriculum.verify_top = 0"),
    (("curriculum", "generations"), 0, "curriculum.generations = 0"),
    (("domain_order", "max_orders"), 1, "domain_order.max_orders = 1"),
    (("domain_order", "verify"), 0, "domain_order.verify = 0"),
    (("sample_orders", "dev"), {"shuffled": 2}, "sample_orders.dev.shuffled = 2"),
    (("sample_orders", "test"), {"random": -1}, "sample_orders.test.random = -1"),
    (("multi_epoch", "epochs"), [1], "multi_epoch.epochs[0] = 1"),
    (("multi_epoch", "epochs"), [], "multi_epoch.epochs = []"),
    (("multi_epoch", "dev"), {"random": 2}, "multi_epoch.dev.random = 2"),
    (("multi_epoch", "damping"), {3: 50.0}, "multi_epoch.damping = {'3': 50.0}"),        # E = 2 has none
    (("multi_epoch", "damping"), {2: 50.0, 3: -1}, "multi_epoch.damping.3 = -1.0"),
    (("multi_epoch", "curvature_scale"), {3: 1.0}, "multi_epoch.curvature_scale = {'3': 1.0}"),    # E = 2 has none
    (("multi_epoch", "curvature_scale"), {2: 0, 3: 1.0}, "multi_epoch.curvature_scale.2 = 0.0"),
    (("multi_epoch", "curvature_batch"), {3: 8}, "multi_epoch.curvature_batch = {'3': 8}"),      # E = 2 has none
    (("multi_epoch", "curvature_batch"), {2: 0, 3: 8}, "multi_epoch.curvature_batch.2 = 0"),
    (("memorization", "batches"), 0, "memorization.batches = 0"),
    (("memorization", "positions"), 1, "memorization.positions = 1"),
    (("memorization", "true_positions"), 1, "memorization.true_positions = 1"),
    (("memorization", "true_positions"), 9, "memorization.true_positions = 9"),
    (("memorization", "methods"), ["tracin"], "memorization.methods[0] = 'tracin'"),
    (("memorization", "similar_fraction"), 0.7, "memorization.similar_fraction = 0.7"),
])
def test_bad_values_name_key_value_and_allowed(params_dict, path, value, needle):
    params_dict[path[0]][path[1]] = value
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(params_dict)
    assert needle in str(err.value) and "expected" in str(err.value)


def test_the_default_method_must_estimate_parameters(params_dict):
    """The applications read per-batch and per-domain losses from the default's parameters: an influence
    method is refused as the default, naming the ones that qualify (from the method registry)."""
    params_dict["estimate"]["default"] = "tracin"
    with pytest.raises(config.ConfigError, match=r"estimate\.default = 'tracin'.*estimates parameters: naive, "
                                                 r"fut-subspace"):
        config.from_dict(params_dict)


def test_a_method_needs_its_cached_eigenspaces(params_dict):
    params_dict["cache"]["curvature"] = ["window"]
    params_dict["estimate"]["methods"] = ["naive", "fut-state:eig"]
    params_dict["estimate"]["default"] = "naive"
    with pytest.raises(config.ConfigError, match=r"estimate\.methods\[1\] = 'fut-state:eig'.*needs 'domain'"):
        config.from_dict(params_dict)


def test_unknown_key_is_refused_with_allowed_keys(params_dict):
    params_dict["window"]["batchsize"] = 8
    with pytest.raises(config.ConfigError, match=r"unknown key window\.batchsize.*allowed keys here: steps, batch_size"):
        config.from_dict(params_dict)


def test_missing_section_is_refused(params_dict):
    del params_dict["model"]
    with pytest.raises(config.ConfigError, match="missing key model"):
        config.from_dict(params_dict)


def test_source_kind_needs_its_fields(params_dict):
    params_dict["corpus"]["sources"]["genesis"] = {"kind": "local_text"}
    with pytest.raises(config.ConfigError, match=r"corpus\.sources\.genesis\.path"):
        config.from_dict(params_dict)


def test_section_hash_tracks_only_named_sections(params_dict):
    a = config.from_dict(params_dict)
    params_dict["groundtruth"]["n_random"] = 7
    b = config.from_dict(params_dict)
    assert a.section_hash("model", "window") == b.section_hash("model", "window")
    assert a.section_hash("groundtruth") != b.section_hash("groundtruth")


def test_section_hash_leaves_out_only_the_omitted_keys(params_dict):
    a = config.from_dict(params_dict)
    params_dict["groundtruth"]["n_random"] = 7
    b = config.from_dict(params_dict)
    omit = {"groundtruth": ("n_random",)}
    assert a.section_hash("groundtruth", omit=omit) == b.section_hash("groundtruth", omit=omit)
    params_dict["groundtruth"]["seed"] += 1
    c = config.from_dict(params_dict)
    assert a.section_hash("groundtruth", omit=omit) != c.section_hash("groundtruth", omit=omit)
    assert "n_random" in dataclasses.asdict(a.groundtruth)      # the params themselves are left as they are


def test_default_model_is_about_one_million_parameters():
    p = config.load(ROOT / "params.yaml")
    n = count_parameters(p.model, p.tokenizer.vocab_size, p.data.seq_len)
    assert 0.8e6 <= n <= 1.2e6


def test_gpu_profile_is_about_200m_parameters_without_allocating():
    p = config.load(ROOT / "profiles" / "gpu-200m.yaml")
    n = count_parameters(p.model, p.tokenizer.vocab_size, p.data.seq_len)
    assert 180e6 <= n <= 230e6
    assert p.train.device == "cuda" and p.train.precision == "bf16"


def test_environment_yml_mirrors_requirements():
    reqs = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(r for r in reqs if r) == sorted(x for x in pip if not x.startswith("-e"))
