"""Projector properties, in the style of TRAK's JL tests (on the CPU)."""
import math

import pytest
import torch

from fut.projection import make_projector, prefix

D = 5000
KINDS = ["sparse", "gaussian"]


def _vectors(n, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_projection_across_instances(kind):
    x = _vectors(3)
    a = make_projector(kind, D, 256, seed=7).project(x)
    b = make_projector(kind, D, 256, seed=7).project(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, make_projector(kind, D, 256, seed=8).project(x))


@pytest.mark.parametrize("kind", KINDS)
def test_identical_inputs_identical_outputs_and_linearity(kind):
    P = make_projector(kind, D, 128, seed=0)
    x, y = _vectors(2, seed=1)
    assert torch.equal(P.project(x), P.project(x.clone()))
    torch.testing.assert_close(P.project(2 * x + y), 2 * P.project(x) + P.project(y), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(P.project(torch.stack([x, y]))[1], P.project(y), rtol=1e-5, atol=1e-5)


def test_sparse_projection_of_a_row_is_its_row_of_the_batch_bit_for_bit():
    # The cache builder projects each Adam term as it is made; a shard equals one projected in one batch.
    P, x = make_projector("sparse", D, 256, seed=0), _vectors(6, seed=2)
    assert torch.equal(torch.stack([P.project(row) for row in x]), P.project(x))


@pytest.mark.parametrize("kind", KINDS)
def test_norms_and_inner_products_within_jl_bound(kind):
    """For k = 2048, |‖Px‖²/‖x‖² − 1| ≲ 4·sqrt(2/k) ≈ 0.125 (four standard deviations of a χ²_k/k)."""
    k = 2048
    P = make_projector(kind, D, k, seed=3)
    x = _vectors(20, seed=2)
    z = P.project(x)
    ratio = z.norm(dim=1) ** 2 / x.norm(dim=1) ** 2
    assert (ratio - 1).abs().max() < 4 * math.sqrt(2 / k)
    cos_true = torch.nn.functional.cosine_similarity(x[0], x[1], dim=0)
    ip = (z[0] @ z[1]) / (x[0].norm() * x[1].norm())
    assert abs(ip - cos_true) < 4 / math.sqrt(k)


@pytest.mark.parametrize("kind", KINDS)
def test_smaller_k_is_a_rescaled_prefix_of_larger_k(kind):
    x = _vectors(2)
    big = make_projector(kind, D, 512, seed=5)
    small = make_projector(kind, D, 128, seed=5)
    torch.testing.assert_close(prefix(big.project(x), 128), small.project(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_coordinate_matters(kind):
    """Dense: always. Sparse: a coordinate is missed with probability exp(−k/sqrt(d)), here e^−29."""
    P = make_projector(kind, D, 2048, seed=0)
    base = P.project(torch.zeros(D))
    moved = [i for i in range(0, D, 97) if not torch.equal(P.project(torch.eye(D)[i]), base)]
    assert len(moved) == len(range(0, D, 97))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="k = 0"):
        make_projector("sparse", D, 0, 0)
    with pytest.raises(ValueError, match="not one of"):
        make_projector("dense", D, 8, 0)
    with pytest.raises(ValueError, match=r"prefix size 9 must be in 1\.\.8"):
        prefix(torch.zeros(2, 8), 9)
    with pytest.raises(ValueError, match="built for d = 5000"):
        make_projector("sparse", D, 8, 0).project(torch.zeros(10))
