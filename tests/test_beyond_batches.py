"""Sample-level and multi-epoch orders on the tiny run: the reference's own batches re-expressed as a sample-level
order, and the E-epoch reference order, retrain bit for bit to the reference and are estimated as the reference
exactly; the studies produce the validity issue's blocks and their applications."""
import pytest
import torch

from fut.cache import DTYPES
from fut.device import autocast
from fut.epochs import EpochReference, epoch_path, reference_order
from fut.estimators import EstimationContext
from fut.groundtruth import Oracle
from fut.multi_epoch import multi_epoch
from fut.reference import ReferenceRun
from fut.sample_orders import sample_orders
from fut.schedules import as_units, sequence_batches
from fut.sequence_cache import SequenceCache
from fut.storage import read_metadata

KEYS = {"spearman", "kendall", "r2_order_effect", "bias_ppl", "absdiff_ppl", "rel_err", "n"}


@pytest.fixture(scope="module")
def ctx(tiny_truth):
    params, data_dir, ref_dir, cache_dir, _ = tiny_truth
    return EstimationContext(ReferenceRun(params, data_dir, ref_dir), cache_dir)


def flat_params(trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


def test_reference_batches_as_a_sample_level_order_retrain_bitwise(ctx):
    oracle = Oracle(ctx.run)
    T, b = ctx.T, ctx.run.batch_size
    assert torch.equal(flat_params(oracle.trainer(sequence_batches(T, b))), flat_params(oracle.trainer(range(T))))
    shuffled_within = [list(reversed(batch)) for batch in sequence_batches(T, b)]      # same batches, other rows
    moved = flat_params(oracle.trainer(shuffled_within)) - flat_params(oracle.trainer(range(T)))
    assert float(moved.abs().max()) < 1e-5                   # a batch's mean: only the summation order differs


def test_sample_level_cache_estimates_the_reference_batches_exactly(ctx, tmp_path):
    cache = SequenceCache(ctx.cache, tmp_path / "cache")
    sub = cache.build(progress=False)
    T, b = ctx.T, ctx.run.batch_size
    S = sub.replay(as_units([sequence_batches(T, b)]))
    assert torch.count_nonzero(S) == 0 and float(sub.quadratic(S, ctx.naive_loss)[0]) == ctx.naive_loss
    again = SequenceCache(ctx.cache, tmp_path / "cache")           # a rerun reuses every file
    stamps = {p: p.stat().st_mtime_ns for p in again.files()}
    again.build(progress=False)
    assert {p: p.stat().st_mtime_ns for p in again.files()} == stamps
    assert torch.equal(again.subspace().gram, sub.gram)
    # each sequence's own-direction curvature row: H(θ_j, x_i) P̄ g(θ_j, x_i) at its own step j
    src = cache.sources()
    i = b + 1                                                      # the second sequence of batch 1
    row = src.rows(slice(0, src.dim))
    own, h = row[src.own_directions[i][0]], row[-cache.n + i]
    with autocast(ctx.run.params.train, ctx.run.device):
        want = ctx.run.loss.hvp(ctx.run.theta(1), cache.sequences[i: i + 1], (src.precond * own)[None])[0]
    assert torch.equal(h, want.to(DTYPES[ctx.run.params.cache.dtype]).float()) and sub.own_curv is not None


def test_epoch_reference_is_the_retrain_of_its_order_and_its_estimate_is_exact(ctx, tmp_path):
    ref = EpochReference(ctx.cache, 2, tmp_path)
    sub, record = ref.load_or_build()
    trainer = Oracle(ctx.run).trainer(reference_order(ctx.T, 2))
    theta = ctx.run.layout.flatten(trainer.state().theta)
    assert record["eval_loss"] == ctx.run.loss_on(theta, ctx.prepared.eval_mixed)
    S = sub.replay(as_units([reference_order(ctx.T, 2)]))
    assert torch.count_nonzero(S) == 0
    loaded, naive = EpochReference(ctx.cache, 2, tmp_path).load()
    assert naive == record["eval_loss"] and torch.equal(loaded.forcing, sub.forcing)
    assert torch.equal(loaded.hessian_ops, sub.hessian_ops)


def test_epoch_replay_applies_each_groups_curvature_batch_hessian_on_the_whole_basis(ctx, tmp_path):
    """The Galerkin matrices B P̄ H P̄ Bᵀ: one per eigenspace, H its group's curvature batch's Hessian at θ_0, each
    column the basis against the Hessian-vector product of one preconditioned basis row."""
    from fut.cache import curvature_batches
    from fut.epochs import epoch_checkpoints
    ref = EpochReference(ctx.cache, 2, tmp_path)
    thetas, preconds, _, _ = ref.trajectory()
    src = ref.sources(thetas, preconds, epoch_checkpoints(ctx.T, 2))
    basis, P = src.rows(slice(0, src.dim)), src.precond
    assert len(src.hessian_grams) == len(src.eigen_keys) and src.hessian_grams[0].shape == (len(basis),) * 2
    params = ctx.run.params
    (c, g), k = src.eigen_keys[-1], len(basis) - 1
    # multi_epoch.curvature_batch["2"] sequences (the tiny run's 3, not the batch-level cache's 2)
    batch = curvature_batches(ctx.prepared, params.multi_epoch.curvature_batch["2"], params.cache.curvature)[g]
    with autocast(params.train, ctx.run.device):
        hv = ctx.run.loss.hvp(thetas[c], batch, (P * basis[k])[None])[0]
    torch.testing.assert_close(src.hessian_grams[-1][:, k], (basis @ (P * hv)).double(), rtol=1e-5,
                               atol=1e-6 * float(src.hessian_grams[-1][:, k].abs().max()))
    assert ref.sources(thetas, preconds, epoch_checkpoints(ctx.T, 2), galerkin=False).hessian_grams is None


def test_stored_replays_of_another_source_layout_are_refused_and_rebuilt(ctx, tmp_path, monkeypatch):
    import fut.epochs
    import fut.sequence_cache
    from fut.storage import ArtefactMismatch
    EpochReference(ctx.cache, 2, tmp_path).load_or_build()
    SequenceCache(ctx.cache, tmp_path / "seq").build(progress=False)
    monkeypatch.setattr(fut.epochs, "OWN_DIRECTIONS", "another layout")
    monkeypatch.setattr(fut.sequence_cache, "SUBSPACE_SOURCES", {"own_curvature": "another layout"})
    with pytest.raises(ArtefactMismatch, match="own_directions"):
        EpochReference(ctx.cache, 2, tmp_path).load()
    with pytest.raises(ArtefactMismatch, match="own_curvature"):
        SequenceCache(ctx.cache, tmp_path / "seq").subspace()
    EpochReference(ctx.cache, 2, tmp_path).load_or_build()          # rebuilt under the new layout
    SequenceCache(ctx.cache, tmp_path / "seq").build(progress=False)
    EpochReference(ctx.cache, 2, tmp_path).load()
    SequenceCache(ctx.cache, tmp_path / "seq").subspace()


def test_an_epoch_cache_with_pairs_at_other_checkpoints_is_refused_and_rebuilt(ctx, tmp_path, monkeypatch):
    """The E-epoch basis has pairs at every epoch boundary; a file built with others (the layout before) is
    refused by estimates and rebuilt by the stage."""
    import fut.epochs
    from fut.storage import ArtefactMismatch
    T = ctx.T
    assert EpochReference(ctx.cache, 2, tmp_path).meta["pair_checkpoints"] == [0, T, 2 * T]
    monkeypatch.setattr(fut.epochs, "epoch_checkpoints", lambda steps, epochs: [0, steps * epochs])
    ends, record = EpochReference(ctx.cache, 2, tmp_path).load_or_build()
    assert record["gradients"] == 2 * T + 2 * 2 * T + 1               # pairs at 0 and 2T, own and after-step
    monkeypatch.undo()
    with pytest.raises(ArtefactMismatch, match="pair_checkpoints"):
        EpochReference(ctx.cache, 2, tmp_path).load()
    every, record = EpochReference(ctx.cache, 2, tmp_path).load_or_build()
    assert record["gradients"] == 3 * T + 2 * 2 * T + 1 and every.dim == ends.dim + T


@pytest.mark.parametrize("knob", ["damping", "curvature_scale", "curvature_batch"])
def test_an_epoch_cache_of_another_damping_or_curvature_is_refused_and_rebuilt_with_the_params_one(ctx, tmp_path,
                                                                                                  knob):
    """multi_epoch.damping[E], multi_epoch.curvature_scale[E] and multi_epoch.curvature_batch[E] are part of the
    E-epoch file's provenance: estimates refuse a file replayed with another value, and the stage rebuilds it with
    the params' value."""
    import copy
    import dataclasses
    from fut.storage import ArtefactMismatch
    first = EpochReference(ctx.cache, 2, tmp_path)
    sub, _ = first.load_or_build()
    value = {"damping": first.damping + 5.0, "curvature_scale": 2 * first.curvature_scale,
             "curvature_batch": first.curvature_batch + 1}[knob]
    store = copy.copy(ctx.cache)
    store.params = dataclasses.replace(ctx.cache.params, multi_epoch=dataclasses.replace(
        ctx.cache.params.multi_epoch, **{knob: {"2": value}}))
    with pytest.raises(ArtefactMismatch, match=knob):
        EpochReference(store, 2, tmp_path).load()
    rebuilt, _ = EpochReference(store, 2, tmp_path).load_or_build()
    assert read_metadata(epoch_path(tmp_path, 2))[knob] == value
    if knob == "damping":
        assert rebuilt.damping == value and EpochReference(store, 2, tmp_path).load()[0].damping == value
    elif knob == "curvature_scale":
        assert torch.equal(rebuilt.hessian_ops, 2 * sub.hessian_ops)   # G⁺ (2 M) exactly
    else:                                                              # another batch's Hessian, the same basis
        assert torch.equal(rebuilt.gram, sub.gram) and not torch.equal(rebuilt.hessian_ops, sub.hessian_ops)
    order = as_units([list(reversed(range(ctx.T))) * 2])
    assert not torch.equal(rebuilt.replay(order), sub.replay(order))


def test_the_studies_report_blocks_costs_and_applications(tiny_truth, tmp_path):
    params, data_dir, ref_dir, cache_dir, _ = tiny_truth
    rows, m = sample_orders(params, data_dir, ref_dir, cache_dir, tmp_path / "sample")
    for split in ("dev", "test"):
        assert KEYS <= set(m[split]["families"]["all"]["fut-subspace"])
    assert m["test"]["families"]["all"]["naive"]["r2_order_effect"] == 0.0
    assert m["cache_bytes"] > 0 and m["cache_seconds"] > 0 and m["batch_cache_bytes"] > 0
    assert {r["split"] for r in rows} == {"dev", "test"}
    assert "search_best" in m["curriculum"]["strategies"] and m["memorization"]["rows"]
    rows, m = multi_epoch(params, data_dir, ref_dir, cache_dir, tmp_path / "epochs")
    assert m["epochs"] == params.multi_epoch.epochs[0] and [g["epochs"] for g in m["error_growth"]] == \
        params.multi_epoch.epochs
    assert KEYS <= set(m["test"]["families"]["random"]["fut-subspace"]) and m["cache_bytes"] > 0
    assert m["domain_order"]["n_orders"] == 2
