"""Our Γ(θ, B; m, v, t) against torch.optim.AdamW, step by step."""
import pytest
import torch

from fut.adam import AdamHyper, clip_scale, update_term


@pytest.mark.parametrize("weight_decay, start_step", [(0.0, 0), (0.1, 0), (0.01, 37)])
def test_update_term_reproduces_torch_adamw(weight_decay, start_step):
    gen = torch.Generator().manual_seed(0)
    hp = AdamHyper(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay)
    lr = 3e-3
    theta = torch.randn(1000, generator=gen)
    m = torch.randn(1000, generator=gen) * 1e-2 if start_step else torch.zeros(1000)
    v = torch.rand(1000, generator=gen) * 1e-3 if start_step else torch.zeros(1000)

    p = torch.nn.Parameter(theta.clone())
    opt = torch.optim.AdamW([p], lr=lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=weight_decay,
                            foreach=False)
    if start_step:
        opt.state[p] = {"step": torch.tensor(float(start_step)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    for k in range(1, 6):
        grad = torch.randn(1000, generator=gen)
        gamma, m, v = update_term(theta, grad, m, v, start_step + k, hp)
        theta = theta - lr * gamma
        p.grad = grad.clone()
        opt.step()
        # Same formula, different association of the float32 operations: agree to a few ulps of |θ|.
        torch.testing.assert_close(theta, p.detach(), rtol=4e-7, atol=1e-7)
        torch.testing.assert_close(m, opt.state[p]["exp_avg"], rtol=1e-6, atol=0)
        torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"], rtol=1e-6, atol=0)
    assert not torch.equal(theta, torch.zeros_like(theta))


def test_bias_correction_dominates_the_first_step():
    """At step 1, m̂ = g and v̂ = g², so the direction is g / (|g| + ε) ≈ sign(g)."""
    hp = AdamHyper(0.9, 0.999, 1e-8, 0.0)
    g = torch.tensor([0.5, -2.0, 1e-3])
    gamma, _, _ = update_term(torch.zeros(3), g, torch.zeros(3), torch.zeros(3), 1, hp)
    torch.testing.assert_close(gamma, g / (g.abs() + 1e-8))


def test_clip_scale_matches_clip_grad_norm():
    g = torch.randn(50, generator=torch.Generator().manual_seed(1)) * 10
    p = torch.nn.Parameter(torch.zeros(50))
    p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    torch.testing.assert_close(g * clip_scale(g.norm(), 1.0), p.grad)
    assert clip_scale(g.norm(), None) == 1.0
