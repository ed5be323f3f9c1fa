"""Every estimator, declared once: what it is and what it needs from the cache. Config validation, the cache
builder, the estimate stage, the ablations and the sweep read this table; nothing else lists method names.

Names say the Adam state and the curvature: `fut:<curvature>` keeps the reference run's Adam moments (the paper's
FUT), `fut-state:<curvature>` replays the order's own moments, `fut-subspace` replays the order's own first moment
in closed form (fut/subspace.py). Curvatures: `none`; `secant`, the positive part of the elementwise secant of
each batch's gradient between consecutive reference checkpoints; `secant-raw`, the paper's literal secant of the
update term ΔΓ/Δθ; `eig`, the cached top eigenspace of the Hessian of a batch of the same domain; `hvp`, the exact
Hessian of the batch itself (an accuracy reference: one Hessian-vector product per step and order).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    family: str                 # baseline | paper | ours | influence
    state: str                  # what Adam state the replay uses: none | reference | own | own-m
    curvature: str              # none | secant | secant-raw | eig | hvp
    every_checkpoint: bool      # reads g(θ_t, B_j) at every checkpoint (a full pair cache)
    estimates_parameters: bool  # gives θ_T + δ, so any readout (per-domain, per-batch loss) is available
    readout: str                # exact | quadratic | linear | direct
    # Which orders the estimate stage scores it on: `all`, `replay` (a full-space replay, about a second per
    # order: estimate.replay_orders of each split) or `expensive` (a curvature product per step and order, more
    # than a retrain: estimate.expensive_orders test orders).
    scored_on: str = "all"
    about: str = ""

    @property
    def needs_eigenspaces(self) -> bool:
        return self.curvature == "eig"

    @property
    def needs_subspace(self) -> bool:
        return self.name.startswith("fut-subspace")

    @property
    def needs_projection(self) -> bool:
        return self.name in ("tracin", "fut:projected")

    @property
    def needs_eval_gradients(self) -> bool:
        """∇L_E at every checkpoint (only the final one is needed otherwise)."""
        return self.name.startswith("tracin") or self.name == "fut:projected"


def _m(name, family, state, curvature, every, params, readout, about=""):
    scored_on = "expensive" if curvature == "hvp" else ("replay" if state in ("reference", "own") and params
                                                          and readout == "exact" else "all")
    return Method(name, family, state, curvature, every, params, readout, scored_on, about)


METHODS: dict[str, Method] = {m.name: m for m in [
    _m("naive", "baseline", "none", "none", False, True, "exact", about="order does not matter: the reference θ_T"),
    _m("fut-subspace", "ours", "own-m", "eig", False, True, "quadratic",
       about="own first moment, frozen second, replayed in closed form in the span of cached gradients; "
             "calibrated quadratic readout"),
    _m("fut-subspace:exact", "ours", "own-m", "eig", False, True, "exact",
       about="fut-subspace's parameters, read out by evaluating them"),
    _m("fut:secant-raw", "paper", "reference", "secant-raw", True, True, "exact",
       about="the paper's FUT as written: elementwise secant ΔΓ/Δθ between consecutive checkpoints"),
    _m("fut:secant", "paper", "reference", "secant", True, True, "exact",
       about="FUT with the Jacobian f'(g)∘(D δ) + λδ, D the guarded secant of the gradient"),
    _m("fut:eig", "paper", "reference", "eig", True, True, "exact", about="FUT with the cached eigenspace"),
    _m("fut:hvp", "paper", "reference", "hvp", True, True, "exact",
       about="FUT with the exact Jacobian-vector product of Γ (frozen reference moments)"),
    _m("fut++:secant", "paper", "reference", "secant", True, True, "exact",
       about="fut:secant plus the paper's second-order term from the same batch's second difference"),
    _m("fut:projected", "paper", "reference", "none", True, False, "direct",
       about="FUT on the projected cache as the paper stores it, read out with the projected eval gradient"),
    _m("fut-state:none", "ours", "own", "none", True, True, "exact"),
    _m("fut-state:secant", "ours", "own", "secant", True, True, "exact"),
    _m("fut-state:eig", "ours", "own", "eig", True, True, "exact"),
    _m("fut-state:hvp", "ours", "own", "hvp", True, True, "exact"),
    _m("tracin", "influence", "reference", "none", True, False, "direct",
       about="first-order influence along the reference path, projected"),
    _m("tracin:full", "influence", "reference", "none", True, False, "direct", about="tracin in full space"),
    _m("tracin:momentum", "influence", "reference", "none", True, False, "direct",
       about="tracin with each gradient's effect unrolled through the momentum (full space)"),
]}

DEFAULT = "fut-subspace"


def method(name: str) -> Method:
    return METHODS[name]


def parameter_methods() -> list[str]:
    """Methods that estimate θ_T + δ: every readout of the trained model is available."""
    return [n for n, m in METHODS.items() if m.estimates_parameters]


def trajectory_methods() -> list[str]:
    """Methods whose estimated parameters can be evaluated along the steps at a replay's cost (the trajectory
    figure): fut-subspace's through its exact readout, no Hessian-vector product per step."""
    return [n for n, m in METHODS.items() if m.estimates_parameters and n != "naive" and m.readout == "exact"
            and m.scored_on != "expensive"]


def strided_methods() -> list[str]:
    """What runs on a cache without g(θ_t, B_j) at every checkpoint."""
    return [n for n, m in METHODS.items() if not m.every_checkpoint]
