"""The AdamW update term Γ(θ, B; m, v, t), computed exactly as `torch.optim.AdamW` does.

θ_{t+1} = θ_t − η_t Γ with Γ = m̂_{t+1} / (sqrt(v̂_{t+1}) + ε) + λ θ_t, where m and v are first advanced by the
gradient g (after optional global-norm clipping) and `step` is the optimizer's step count after the update.
This is the unit the cache stores and the estimators replay.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import OptimizerConfig


@dataclass(frozen=True)
class AdamHyper:
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_clip: float | None = None

    @classmethod
    def from_config(cls, cfg: OptimizerConfig) -> "AdamHyper":
        return cls(cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.grad_clip)


def clip_scale(grad_norm: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """The factor `torch.nn.utils.clip_grad_norm_` multiplies gradients by."""
    if max_norm is None:
        return torch.ones((), dtype=grad_norm.dtype, device=grad_norm.device)
    return torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0)


def adam_moments(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hp: AdamHyper) -> tuple[torch.Tensor, torch.Tensor]:
    # The very kernels torch.optim.AdamW uses (lerp, mul + addcmul), so replayed moments match bit for bit.
    m_new = torch.lerp(m, grad, 1 - hp.beta1)
    v_new = v.mul(hp.beta2).addcmul(grad, grad, value=1 - hp.beta2)
    return m_new, v_new


def adam_direction(m_new: torch.Tensor, v_new: torch.Tensor, step: int, hp: AdamHyper) -> torch.Tensor:
    """m̂ / (sqrt(v̂) + ε) for the moments after `step` updates (bias correction included)."""
    bc1 = 1 - hp.beta1 ** step
    bc2_sqrt = (1 - hp.beta2 ** step) ** 0.5
    return (m_new / bc1) / (v_new.sqrt() / bc2_sqrt + hp.eps)


def update_term(theta: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
                hp: AdamHyper) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Γ and the advanced moments (m, v) for one flat parameter vector. `grad` is already clipped."""
    m_new, v_new = adam_moments(grad, m, v, hp)
    return adam_direction(m_new, v_new, step, hp) + hp.weight_decay * theta, m_new, v_new


def update_term_slope(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, hp: AdamHyper) -> torch.Tensor:
    """∂Γ/∂g elementwise at `grad` with the moments (m, v) before the step held fixed: the f′(g) of the paper's
    Jacobian ∂Γ·δ = f′(g) ∘ (H δ) + λδ. From Γ = (m₁/c₁) / (sqrt(v₁/c₂) + ε), m₁ = β1 m + (1−β1) g,
    v₁ = β2 v + (1−β2) g²."""
    m1, v1 = adam_moments(grad, m, v, hp)
    c1, c2 = 1 - hp.beta1 ** step, 1 - hp.beta2 ** step
    s = (v1 / c2).sqrt()
    den = s + hp.eps
    ds = (1 - hp.beta2) * grad / (c2 * s.clamp_min(1e-30))
    return (1 - hp.beta1) / c1 / den - (m1 / c1) * ds / den ** 2
