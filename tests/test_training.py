"""Reference run, retraining oracle, ground truth: exactness, provenance and resumption."""
import dataclasses
import json

import pytest
import torch

from fut import config, data, protocol, reference
from fut.groundtruth import Oracle, result_path, retrain_all
from fut.orders import family
from fut.reference import ReferenceRun
from fut.stages import groundtruth as groundtruth_stage
from fut.storage import ArtefactMismatch, load_tensors


def test_identity_retrain_reproduces_reference_bit_for_bit(tiny):
    params, data_dir, ref_dir, metrics = tiny
    assert metrics["identity_retrain_bitwise"] is True
    oracle = Oracle(ReferenceRun(params, data_dir, ref_dir))
    T = params.window.steps
    final = oracle.trainer(range(T)).state()
    stored = reference.load_checkpoint(ref_dir, T, oracle.run.hash)
    for name in stored.theta:
        assert torch.equal(final.theta[name], stored.theta[name])
        assert torch.equal(final.m[name], stored.m[name]) and torch.equal(final.v[name], stored.v[name])
    assert final.adam_step == stored.adam_step == params.warmstart.steps + T


def test_every_stored_step_matches_the_retrained_trajectory(tiny):
    params, data_dir, ref_dir, _ = tiny
    oracle = Oracle(ReferenceRun(params, data_dir, ref_dir))
    mismatches = []

    def check(t, trainer, loss):
        want = reference.load_checkpoint(ref_dir, t, oracle.run.hash)
        if not reference.states_equal(trainer.state(), want):
            mismatches.append(t)

    oracle.trainer(range(params.window.steps), on_step=check)
    assert mismatches == []


def test_another_order_gives_another_model(tiny):
    params, data_dir, ref_dir, _ = tiny
    oracle = Oracle(ReferenceRun(params, data_dir, ref_dir))
    T = params.window.steps
    a = oracle.retrain(list(range(T)), ("batches", "sequences", "trajectory"), eval_every=2)
    b = oracle.retrain(list(reversed(range(T))))
    assert a["eval_loss"] != b["eval_loss"] and b["eval_loss"] == oracle.eval_loss(list(reversed(range(T))))
    assert len(a["batch_losses"]) == T and set(a["domain_eval_loss"]) == {"genesis", "gospels"}
    assert len(a["eval_sequence_losses"]) == len(oracle.prepared.eval_mixed)
    assert a["trajectory"]["step"] == [2, 4, T] and "trajectory" not in b and "batch_losses" not in b


def test_checkpoint_from_other_params_is_refused(tiny, params_dict):
    params, data_dir, ref_dir, _ = tiny
    params_dict["optimizer"]["weight_decay"] = 0.5

    other = config.from_dict(params_dict)
    with pytest.raises(ArtefactMismatch, match="metadata 'reference_hash'"):
        Oracle(ReferenceRun(other, data_dir, ref_dir))


def test_checkpoint_metadata_records_provenance(tiny):
    params, data_dir, ref_dir, _ = tiny
    _, meta = load_tensors(reference.checkpoint_path(ref_dir, 0))
    assert meta["window_step"] == 0 and meta["adam_step"] == params.warmstart.steps
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["reference_hash"].startswith(data.load_prepared(data_dir, params).prepare_hash)

@pytest.mark.slow

def test_groundtruth_resumes_and_ignores_partial_or_foreign_results(tiny, tmp_path):
    params, data_dir, ref_dir, _ = tiny
    T = params.window.steps
    orders = {"identity": list(range(T)), "reversed": list(reversed(range(T))), "shift": list(range(1, T)) + [0]}
    two = config.from_dict({**dataclasses.asdict(params), "parallel": {"workers": 2}})
    first = retrain_all(two, orders, data_dir, ref_dir, tmp_path, ("trajectory",), 2, progress=False)
    assert set(first) == set(orders)
    # An interrupted run: one result missing, one half-written, one from another reference run.
    result_path(tmp_path, "identity").unlink()
    result_path(tmp_path, "reversed").write_text('{"order": [')
    foreign = json.loads(result_path(tmp_path, "shift").read_text())
    foreign["reference_hash"] = "other"
    result_path(tmp_path, "shift").write_text(json.dumps(foreign))
    again = retrain_all(params, orders, data_dir, ref_dir, tmp_path, ("trajectory",), 2, progress=False)
    for name in orders:
        assert again[name]["eval_loss"] == first[name]["eval_loss"]   # bit-identical across processes
        assert again[name]["reference_hash"] == first[name]["reference_hash"]
    stamp = result_path(tmp_path, "identity").stat().st_mtime_ns
    retrain_all(params, orders, data_dir, ref_dir, tmp_path, ("trajectory",), 2, progress=False)
    assert result_path(tmp_path, "identity").stat().st_mtime_ns == stamp   # complete results are not redone
    retrain_all(params, orders, data_dir, ref_dir, tmp_path, (), 0, progress=False)   # other readouts: redone
    assert result_path(tmp_path, "identity").stat().st_mtime_ns != stamp


def test_groundtruth_stage_retrains_dev_and_test_apart(tiny, tmp_path):
    params, data_dir, ref_dir, _ = tiny
    results, metrics = groundtruth_stage.run(params, data_dir, ref_dir, tmp_path)
    dev, test = results[protocol.DEV], results[protocol.TEST]
    # dev: identity + 2 random + reversed + 2 domain blocks + easy/hard; test: 3 random, 1 of each structured kind
    assert metrics["dev"]["n_orders"] == len(dev) == 1 + 2 + 1 + 2 + 2
    assert metrics["test"]["n_orders"] == len(test) == 3 + 1 + 1 + 2 * 1
    assert not {tuple(r["order"]) for r in dev.values()} & {tuple(r["order"]) for r in test.values()}
    assert {family(n) for n in test} == {"random", "domain_blocks", "structured"}
    assert sum("trajectory" in r for r in dev.values()) == params.groundtruth.trajectories
    assert protocol.dev_truth(tmp_path) == dev
    assert dev["identity"]["eval_ppl"] == pytest.approx(torch.tensor(dev["identity"]["eval_loss"]).exp().item())
    noise = metrics["noise_floor"]
    assert set(noise) == {"rounding_perturbation_abs_ppl", "rounding_perturbation_param_rel", "thread_count_abs_ppl",
                          "thread_count_param_rel"}
    # One ulp at the start stays a rounding-sized change at the end (Adam does not amplify it here).
    assert 0 < noise["rounding_perturbation_param_rel"] < 1e-3


def test_trajectory_key_depends_on_values_not_file_bytes(tiny, tmp_path):
    """Results derived from the trajectory are keyed by its values: re-saving the same θ_T, m_T, v_T (a new
    file, possibly another header order) keeps the key; changing one value changes it."""
    import shutil

    params, data_dir, ref_dir, _ = tiny
    prepared = data.load_prepared(data_dir, params)
    key = reference.trajectory_key(params, prepared, ref_dir)
    copy = tmp_path / "reference"
    shutil.copytree(ref_dir, copy)
    T = params.window.steps
    state = reference.load_checkpoint(copy, T, reference.reference_hash(params, prepared))
    reference.save_checkpoint(copy, T, state, reference.reference_hash(params, prepared))
    assert reference.trajectory_key(params, prepared, copy) == key
    name = next(iter(state.theta))
    state.theta[name] = state.theta[name].clone()
    state.theta[name].view(-1)[0] += 1e-3
    reference.save_checkpoint(copy, T, state, reference.reference_hash(params, prepared))
    assert reference.trajectory_key(params, prepared, copy) != key
