"""Estimators on the tiny reference run: exactness for the identity order, curvature kernels against finite
differences, projected against full-space caches, and agreement with retraining where the math says so."""
import pytest
import torch

from fut import pipeline
from fut.cache import (MANIFEST, CacheBuilder, UpdateCache, cache_files, curvature_batches, curvature_steps,
                       shard_path)
from fut.config import METHODS
from fut.curvature import lanczos_top_eigen
from fut.estimators import EstimationContext, estimate
from fut.groundtruth import Oracle
from fut.storage import ArtefactMismatch


@pytest.fixture(scope="module")
def ctx(tiny, tmp_path_factory):
    params, data_dir, ref_dir, _ = tiny
    cache_dir = tmp_path_factory.mktemp("cache")
    pipeline.cache(params, data_dir, ref_dir, cache_dir)
    return EstimationContext(params, data_dir, ref_dir, cache_dir)


@pytest.mark.parametrize("method", METHODS)
def test_identity_order_returns_the_reference_exactly(ctx, method):
    est = estimate(ctx, [list(range(ctx.T))], method)
    assert float(est.eval_loss[0]) == ctx.naive_loss
    if est.deviation is not None:
        assert torch.count_nonzero(est.deviation) == 0


def test_cached_gradients_are_the_training_gradients(ctx, tiny):
    """The replayed Adam moments of the identity order equal the stored ones bit for bit, which needs
    the cached g(θ_t, B_t) to be the gradient training used."""
    from fut.adam import AdamHyper, adam_moments

    hp = AdamHyper.from_config(ctx.params.optimizer)
    for t in (0, ctx.T - 1):
        _, m, v, _ = ctx.flat_state(t)
        m1, v1 = adam_moments(ctx.cache.grads(t)[t], m, v, hp)
        assert torch.equal(m1, ctx.flat_state(t + 1)[1]) and torch.equal(v1, ctx.flat_state(t + 1)[2])


def test_hvp_matches_finite_differences(ctx):
    theta = ctx.flat_state(2)[0]
    batch = ctx.prepared.window[1]
    u = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0))
    u = u / u.norm()
    hv = ctx.loss.hvp(theta, batch, u[None])[0]
    eps = 1e-2
    fd = (ctx.loss.grad(theta + eps * u, batch) - ctx.loss.grad(theta - eps * u, batch)) / (2 * eps)
    # Central differences: O(eps²) truncation plus float32 gradient noise / eps.
    assert (fd - hv).norm() / hv.norm() < 2e-2


def test_lanczos_finds_the_top_eigenpairs_of_a_known_operator():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen))
    spectrum = torch.cat([torch.tensor([50.0, -30.0, 20.0]), torch.rand(197, generator=gen)])
    A = q @ torch.diag(spectrum) @ q.t()
    vals, vecs = lanczos_top_eigen(lambda x: A @ x, 200, 3, 40, seed=0)
    torch.testing.assert_close(vals, torch.tensor([50.0, -30.0, 20.0]), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(A @ vecs[0], 50.0 * vecs[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("t", [0, 1])
def test_every_cached_eigenspace_acts_like_the_exact_hessian_of_its_batch(ctx, t):
    batches = curvature_batches(ctx.prepared, ctx.params.cache.curvature_batch, ctx.params.cache.curvature)
    domains = {f"domain{d}" for d in ctx.prepared.window_domains}
    assert set(batches) == domains | {"window"}
    s = t - t % ctx.params.cache.curvature_stride       # the checkpoint whose eigenspace step t uses
    for group, batch in batches.items():
        vals, vecs = ctx.cache.eigen(t, group)
        assert vecs.shape == (ctx.params.cache.curvature_rank, ctx.layout.dim)
        exact = ctx.loss.hvp(ctx.flat_state(s)[0], batch, vecs[:1])[0]
        torch.testing.assert_close(exact @ vecs[0], vals[0], rtol=0.05, atol=1e-4)


def test_projected_tracin_agrees_with_full_space_within_the_jl_bound(ctx):
    orders = [list(reversed(range(ctx.T))), list(range(1, ctx.T)) + [0]]
    full = estimate(ctx, orders, "tracin:full").eval_loss - ctx.naive_loss
    proj = estimate(ctx, orders, "tracin").eval_loss - ctx.naive_loss
    # Each projected inner product errs by ≲ 4‖a‖‖b‖/sqrt(k); bound the sum with the actual norms.
    bound = 0.0
    for t in range(ctx.T):
        e = ctx.cache.tensor(t + 1, "eval_grad").norm()
        g = ctx.cache.tensor(t, "proj_gamma").norm(dim=1).max()   # ‖PΓ‖ ≈ ‖Γ‖
        bound += ctx.lrs[t] * 2 * 4 * float(e * g) / ctx.params.cache.k ** 0.5
    assert (full - proj).abs().max() <= bound


@pytest.mark.parametrize("method", ["fut-state:eig", "fut-state:eig-mixed", "fut-state:hvp", "fut-state:hvp-domain"])
def test_orders_batched_together_get_what_each_gets_alone(ctx, method):
    """Rows of one batch take different curvature groups at a step; none may see another's operator."""
    orders = [list(reversed(range(ctx.T))), list(range(1, ctx.T)) + [0], list(range(ctx.T))]
    together = estimate(ctx, orders, method).deviation
    for i, order in enumerate(orders):
        torch.testing.assert_close(together[i], estimate(ctx, [order], method).deviation[0], rtol=1e-5, atol=1e-9)


def test_exact_hessian_replay_tracks_retraining(ctx, tiny):
    """fut-state with exact curvature is a first-order expansion of retraining in δ: far closer to the true
    final parameters than the reference θ_T is."""
    params, data_dir, ref_dir, _ = tiny
    order = list(reversed(range(ctx.T)))
    truth = ctx.layout.flatten(Oracle(params, data_dir, ref_dir).retrain_trainer(order).state().theta)
    delta = estimate(ctx, [order], "fut-state:hvp").deviation[0]
    assert (ctx.theta_T + delta - truth).norm() < 0.2 * (ctx.theta_T - truth).norm()


def test_cache_resumes_and_refuses_foreign_or_broken_shards(tiny, tmp_path, params_dict):
    params, data_dir, ref_dir, _ = tiny
    from fut import config, data

    prepared = data.load_prepared(data_dir, params)
    builder = CacheBuilder(params, prepared, ref_dir, tmp_path)
    built = builder.build(progress=False)
    n_files = len(cache_files(params, builder.layout.dim, list(builder.curvature), tmp_path))
    assert n_files == params.window.steps + 1 + len(builder.curvature) * len(curvature_steps(params))
    assert (built["files_built"], built["files_reused"]) == (n_files, 0)
    grads = UpdateCache(params, prepared, ref_dir, tmp_path).grads(3).clone()
    shard_path(tmp_path, 3).unlink()          # a new file under the name, as a torn copy would leave
    shard_path(tmp_path, 3).write_bytes(b"truncated")
    built = builder.build(progress=False)
    assert (built["files_built"], built["files_reused"]) == (1, n_files - 1)
    assert torch.equal(UpdateCache(params, prepared, ref_dir, tmp_path).grads(3), grads)
    params_dict["cache"]["k"] = 32
    with pytest.raises(ArtefactMismatch, match=r"projection \[metadata 'projector'"):
        UpdateCache(config.from_dict(params_dict), prepared, ref_dir, tmp_path)
    shard_path(tmp_path, 2).unlink()
    with pytest.raises(FileNotFoundError, match="cache is incomplete"):
        UpdateCache(params, prepared, ref_dir, tmp_path)
    builder.build(progress=False)
    (tmp_path / MANIFEST).unlink()            # files all there, but the build never said it finished
    with pytest.raises(FileNotFoundError, match="build did not finish"):
        UpdateCache(params, prepared, ref_dir, tmp_path)


def test_estimates_along_the_steps_end_at_the_final_estimate(ctx):
    from fut.estimators import estimate_along_steps

    order = list(reversed(range(ctx.T)))
    along, delta = estimate_along_steps(ctx, order, "fut-state:secant", [2, ctx.T])
    final = estimate(ctx, [order], "fut-state:secant")
    assert set(along) == {2, ctx.T}
    assert along[ctx.T] == float(final.eval_loss[0]) and torch.equal(delta, final.deviation[0])


def test_a_strided_cache_gives_what_reading_a_full_one_strided_gives(ctx, tiny, tmp_path, params_dict):
    params, data_dir, ref_dir, _ = tiny
    from fut import config

    params_dict["cache"]["checkpoint_stride"] = 2
    params_dict["estimate"]["methods"] = ["naive", "fut-state:eig"]
    params_dict["memorization"]["methods"] = []
    params_dict["sweep"]["methods"] = ["fut-state:eig"]
    strided = config.from_dict(params_dict)
    metrics = pipeline.cache(strided, data_dir, ref_dir, tmp_path)
    assert metrics["pairs"] == 4 * ctx.T + 3        # checkpoints 0, 2, 4, 6 hold all pairs; 1, 3, 5 their own
    sparse = EstimationContext(strided, data_dir, ref_dir, tmp_path)
    read_strided = EstimationContext(params, data_dir, ref_dir, ctx.cache.cache_dir, checkpoint_stride=2)
    orders = [list(range(ctx.T)), list(reversed(range(ctx.T)))]
    a, b = estimate(sparse, orders, "fut-state:eig"), estimate(read_strided, orders, "fut-state:eig")
    assert torch.equal(a.deviation, b.deviation) and torch.equal(a.eval_loss, b.eval_loss)
    assert not a.deviation[0].any()                  # the identity order is still the reference exactly
    truth = ctx.layout.flatten(Oracle(params, data_dir, ref_dir).retrain_trainer(orders[1]).state().theta)
    assert (ctx.theta_T + a.deviation[1] - truth).norm() < 0.5 * (ctx.theta_T - truth).norm()
    with pytest.raises(ValueError, match="one checkpoint in 2; use one of naive"):
        estimate(sparse, orders, "fut")


def test_a_bfloat16_cache_keeps_the_identity_order_exact(tiny, tmp_path, params_dict):
    params, data_dir, ref_dir, _ = tiny
    from fut import config

    params_dict["cache"]["dtype"] = "bfloat16"
    compact = config.from_dict(params_dict)
    pipeline.cache(compact, data_dir, ref_dir, tmp_path)
    ctx = EstimationContext(compact, data_dir, ref_dir, tmp_path)
    assert ctx.cache.tensor(1, "grad").dtype == torch.bfloat16
    for method in ("fut-state:eig", "fut-state:none"):
        assert not estimate(ctx, [list(range(ctx.T))], method).deviation.any()
