"""Estimators on the tiny reference run: exactness for the identity order, curvature kernels against finite
differences, projected against full-space terms, the paper's Jacobian against autodiff, and agreement with
retraining where the math says so."""
import math

import pytest
import torch

from fut import config
from fut.adam import update_term, update_term_slope
from fut.cache import (MANIFEST, CacheBuilder, UpdateCache, cache_files, curvature_batches, curvature_step_at,
                       curvature_steps, shard_path)
from fut.curvature import lanczos_top_eigen
from fut.estimators import EstimationContext, estimate, estimate_along_steps, secant_raw_gain
from fut.groundtruth import Oracle
from fut.methods import METHODS, strided_methods
from fut.projected import ProjectedStore
from fut.reference import ReferenceRun
from fut.stages import cache as cache_stage, projection as projection_stage
from fut.storage import ArtefactMismatch


@pytest.fixture(scope="module")
def ctx(tiny, tmp_path_factory):
    params, data_dir, ref_dir, _ = tiny
    root = tmp_path_factory.mktemp("estimators")
    cache_stage.run(params, data_dir, ref_dir, root / "cache")
    projection_stage.run(params, data_dir, ref_dir, root / "cache", root / "projection")
    return EstimationContext(ReferenceRun(params, data_dir, ref_dir), root / "cache", root / "projection")


def retrained_theta(ctx, order):
    return ctx.layout.flatten(Oracle(ctx.run).trainer(order).state().theta)


@pytest.mark.parametrize("method", list(METHODS))
def test_identity_order_returns_the_reference_exactly(ctx, method):
    est = estimate(ctx, [list(range(ctx.T))], method)
    assert float(est.eval_loss[0]) == ctx.naive_loss
    if est.deviation is not None:
        assert torch.count_nonzero(est.deviation) == 0


def test_cached_gradients_are_the_training_gradients(ctx):
    """The replayed Adam moments of the identity order equal the stored ones bit for bit, which needs the cached
    g(θ_t, B_t) to be the gradient training used."""
    from fut.adam import adam_moments

    for t in (0, ctx.T - 1):
        _, m, v, _ = ctx.flat_state(t)
        m1, v1 = adam_moments(ctx.cache.grads(t)[t], m, v, ctx.hp)
        assert torch.equal(m1, ctx.flat_state(t + 1)[1]) and torch.equal(v1, ctx.flat_state(t + 1)[2])


def test_hvp_matches_finite_differences(ctx):
    theta = ctx.flat_state(2)[0]
    batch = ctx.prepared.window[1]
    u = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(0))
    u = u / u.norm()
    hv = ctx.run.loss.hvp(theta, batch, u[None])[0]
    eps = 1e-2
    fd = (ctx.run.loss.grad(theta + eps * u, batch) - ctx.run.loss.grad(theta - eps * u, batch)) / (2 * eps)
    # Central differences: O(eps²) truncation plus float32 gradient noise / eps.
    assert (fd - hv).norm() / hv.norm() < 2e-2


def test_update_term_slope_is_the_derivative_of_the_update_term(ctx):
    """f′(g) of the paper's Jacobian, against autodiff of Γ with the moments before the step held fixed. In
    float64: f′ is a difference of two terms that nearly cancel where Adam saturates, so in float32 both sides
    carry rounding of the terms' size (it differs between CPU models); in float64 that is 2^-29 of float32's."""
    theta, m, v, step = (x.double() if torch.is_tensor(x) else x for x in ctx.flat_state(3))
    g = ctx.own_grad(3).double().requires_grad_(True)
    (auto,) = torch.autograd.grad(update_term(theta, g, m, v, step + 1, ctx.hp)[0].sum(), g)
    torch.testing.assert_close(update_term_slope(g.detach(), m, v, step + 1, ctx.hp), auto, rtol=1e-9, atol=1e-9)


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
    assert set(batches) == {f"domain{d}" for d in ctx.prepared.window_domains}
    s = curvature_step_at(ctx.params, ctx.T, t)          # the checkpoint whose eigenspace step t uses
    for group, batch in batches.items():
        vals, vecs = ctx.cache.eigen(t, group)
        assert vecs.shape == (ctx.params.cache.curvature_rank, ctx.layout.dim)
        exact = ctx.run.loss.hvp(ctx.flat_state(s)[0], batch, vecs[:1])[0]
        torch.testing.assert_close(exact @ vecs[0], vals[0], rtol=0.05, atol=1e-4)


def test_projected_tracin_agrees_with_full_space_within_the_jl_bound(ctx):
    orders = [list(reversed(range(ctx.T))), list(range(1, ctx.T)) + [0]]
    full = estimate(ctx, orders, "tracin:full").eval_loss - ctx.naive_loss
    proj = estimate(ctx, orders, "tracin").eval_loss - ctx.naive_loss
    # Each projected inner product errs by ≲ 4‖a‖‖b‖/sqrt(k); bound the sum with the actual norms.
    bound = 0.0
    for t in range(ctx.T):
        e = ctx.projected.eval_grad(t + 1).norm()
        g = ctx.projected.gamma(t).norm(dim=1).max()   # ‖PΓ‖ ≈ ‖Γ‖
        bound += ctx.lrs[t] * 2 * 4 * float(e * g) / ctx.params.projection.k ** 0.5
    assert (full - proj).abs().max() <= bound


def test_projected_terms_follow_the_projection_params(ctx, tiny, tmp_path, params_dict):
    params, data_dir, ref_dir, _ = tiny
    params_dict["projection"]["k"] = 32
    other = config.from_dict(params_dict)
    with pytest.raises(ArtefactMismatch, match=r"projector"):
        ProjectedStore(other, UpdateCache(ReferenceRun(other, data_dir, ref_dir), ctx.cache.cache_dir),
                       ctx.projection_dir)
    projection_stage.run(other, data_dir, ref_dir, ctx.cache.cache_dir, tmp_path)   # the cache is reused as it is
    assert ProjectedStore(other, ctx.cache, tmp_path).gamma(0).shape == (ctx.T, 32)


@pytest.mark.parametrize("method", ["fut-state:eig", "fut-state:hvp", "fut:eig", "fut-subspace:exact"])
def test_orders_batched_together_get_what_each_gets_alone(ctx, method):
    """Rows of one batch take different curvature groups at a step; none may see another's operator."""
    orders = [list(reversed(range(ctx.T))), list(range(1, ctx.T)) + [0], list(range(ctx.T))]
    together = estimate(ctx, orders, method).deviation
    for i, order in enumerate(orders):
        torch.testing.assert_close(together[i], estimate(ctx, [order], method).deviation[0], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", ["fut-state:hvp", "fut-subspace:exact"])
def test_replays_track_retraining(ctx, method):
    """fut-state with exact curvature is a first-order expansion of retraining in δ, and fut-subspace its
    closed form with cached curvature: both far closer to the true final parameters than the reference θ_T."""
    order = list(reversed(range(ctx.T)))
    truth = retrained_theta(ctx, order)
    delta = estimate(ctx, [order], method).deviation[0]
    assert (ctx.theta_T + delta - truth).norm() < 0.3 * (ctx.theta_T - truth).norm()


def test_cache_resumes_and_refuses_foreign_or_broken_shards(tiny, tmp_path, params_dict):
    params, data_dir, ref_dir, _ = tiny
    run = ReferenceRun(params, data_dir, ref_dir)
    builder = CacheBuilder(run, tmp_path)
    built = builder.build(progress=False)
    n_files = len(cache_files(params, run.T, run.layout.dim, list(builder.curvature), tmp_path))
    assert n_files == run.T + 1 + len(builder.curvature) * len(curvature_steps(params, run.T)) + 1   # + subspace
    assert (built["files_built"], built["files_reused"]) == (n_files, 0)
    grads = UpdateCache(run, tmp_path).grads(3).clone()
    shard_path(tmp_path, 3).unlink()          # a new file under the name, as a torn copy would leave
    shard_path(tmp_path, 3).write_bytes(b"truncated")
    built = builder.build(progress=False)
    assert (built["files_built"], built["files_reused"]) == (1, n_files - 1)
    assert torch.equal(UpdateCache(run, tmp_path).grads(3), grads)
    params_dict["cache"]["curvature_rank"] = 3
    other = config.from_dict(params_dict)
    with pytest.raises(ArtefactMismatch, match=r"cache params \[metadata 'cache_params'"):
        UpdateCache(ReferenceRun(other, data_dir, ref_dir), tmp_path)
    shard_path(tmp_path, 2).unlink()
    with pytest.raises(FileNotFoundError, match="cache is incomplete"):
        UpdateCache(run, tmp_path)
    builder.build(progress=False)
    (tmp_path / MANIFEST).unlink()            # files all there, but the build never said it finished
    with pytest.raises(FileNotFoundError, match="build did not finish"):
        UpdateCache(run, tmp_path)


def test_estimates_along_the_steps_end_at_the_final_estimate(ctx):
    order = list(reversed(range(ctx.T)))
    for method in ("fut-state:secant", "fut-subspace:exact"):
        along, delta = estimate_along_steps(ctx, order, method, [2, ctx.T])
        final = estimate(ctx, [order], method)
        assert set(along) == {2, ctx.T}
        assert along[ctx.T] == float(final.eval_loss[0]) and torch.equal(delta.cpu(), final.deviation[0])


def test_the_default_methods_cache_alone_gives_the_same_estimates(ctx, tiny, tmp_path, params_dict):
    """fut-subspace reads pairs at checkpoints 0 and T only: a cache holding just those (and eval gradients at 0
    and T) gives its estimates bit for bit, and refuses the methods that read every checkpoint."""
    params, data_dir, ref_dir, _ = tiny
    T = ctx.T
    params_dict["cache"].update(checkpoint_stride=T, eval_grad_stride=T)
    params_dict["estimate"].update(methods=["naive", "fut-subspace", "fut-subspace:exact"], default="fut-subspace")
    params_dict["memorization"]["methods"] = ["fut-subspace:exact"]
    params_dict["sweep"]["methods"] = ["naive", "fut-subspace"]
    small = config.from_dict(params_dict)
    metrics = cache_stage.run(small, data_dir, ref_dir, tmp_path)
    assert metrics["gradients"] == 2 * T + (T - 1) + (T - 1)     # pairs at 0 and T, own and after-step between
    mini = EstimationContext(ReferenceRun(small, data_dir, ref_dir), tmp_path)
    assert torch.equal(mini.subspace.gram, ctx.subspace.gram)
    assert torch.equal(mini.subspace.forcing, ctx.subspace.forcing)
    orders = [list(range(T)), list(reversed(range(T))), list(range(1, T)) + [0]]
    a, b = estimate(mini, orders, "fut-subspace"), estimate(ctx, orders, "fut-subspace")
    assert torch.equal(a.eval_loss, b.eval_loss)
    refused = sorted(set(METHODS) - set(strided_methods()))
    with pytest.raises(ValueError, match="reads the cache at every checkpoint"):
        estimate(mini, orders, refused[0])


def test_a_bfloat16_cache_keeps_the_identity_order_exact(tiny, tmp_path, params_dict):
    params, data_dir, ref_dir, _ = tiny
    params_dict["cache"]["dtype"] = "bfloat16"
    compact = config.from_dict(params_dict)
    cache_stage.run(compact, data_dir, ref_dir, tmp_path)
    ctx = EstimationContext(ReferenceRun(compact, data_dir, ref_dir), tmp_path)
    assert ctx.cache.tensor(1, "grad").dtype == torch.bfloat16
    for method in ("fut-state:eig", "fut-state:none", "fut-subspace:exact"):
        assert not estimate(ctx, [list(range(ctx.T))], method).deviation.any()


def test_secant_raw_gain_counts_every_factor_the_recursion_multiplies_by(ctx):
    """One factor per checkpoint, batch and sampled coordinate; quantiles in order; shares are shares."""
    g = secant_raw_gain(ctx, coordinates=50)
    assert g["factors"] == ctx.T * ctx.T * 50 and g["coordinates"] == 50
    for key in ("eta_j_quantiles", "window_gain_quantiles"):
        q = list(g[key].values())
        assert q == sorted(q) and all(map(math.isfinite, q))
    assert 0 <= g["share_factor_above_10"] <= g["share_amplifying"] <= 1
