"""fut-subspace's closed form (fut/subspace.py) on synthetic data: the replay in coefficients is the full-space
linear recursion it stands for, exactly; the identity order gives the reference exactly; the interpolation knots
and the readout fit do what they say."""
import math

import pytest
import torch

from fut.adam import AdamHyper
from fut.epochs import scaled_curvature
from fut.subspace import SubspaceSources, build_subspace, delta, interpolation, probe_orders

T, D, R = 6, 40, 3
HP = AdamHyper(0.9, 0.999, 1e-8, 0.01)


def synthetic(seed: int = 0, checkpoints=(0, 6)) -> tuple[SubspaceSources, dict]:
    """Random 'gradients', trajectory and eigenspaces with the shapes of a real cache (d = 40, T = 6, two groups)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    pairs = {c: rnd(T, D) for c in checkpoints}
    own, after = rnd(T, D), rnd(T, D)
    groups = ["a", "b", "a", "b", "a", "b"]
    eigen = {}
    for g in ("a", "b"):
        q, _ = torch.linalg.qr(rnd(D, R))
        eigen[(0, g)] = (torch.rand(R, generator=gen) * 5 + 1, q.t().contiguous())
    keys = sorted(eigen)
    thetas = rnd(T + 1, D)
    basis = torch.cat([pairs[c] for c in checkpoints] + [own, after] + [eigen[k][1] for k in keys])
    src = SubspaceSources(pair_checkpoints=list(checkpoints), eigen_keys=keys,
                          eigen_values=[eigen[k][0] for k in keys], groups=groups,
                          rows=lambda cols: basis[:, cols], dim=D, chunk=7, theta=lambda t: thetas[t],
                          precond=torch.rand(D, generator=gen) + 0.5, precond_drift=0.0, eval_grad=rnd(D),
                          lrs=[0.01] * T, adam_steps=[100 + t + 1 for t in range(T)], hp=HP)
    return src, {"pairs": pairs, "own": own, "after": after, "eigen": eigen, "thetas": thetas}


def direct_recursion(src: SubspaceSources, raw: dict, order: list[int]) -> torch.Tensor:
    """The linear recursion in full space, written out: μ ← β1 μ + (1−β1)(ĝ − g_own + H δ), δ ← a δ − b P̄ μ."""
    bc2_mid = 1 - HP.beta2 ** src.adam_steps[T // 2]
    delta_, mu = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    P = src.precond.double()
    for t, j in enumerate(order):
        vals, vecs = (x.double() for x in raw["eigen"][(0, src.groups[j])])
        force = torch.zeros(D, dtype=torch.float64)
        if j != t:
            line = torch.zeros(D, dtype=torch.float64)
            for (kind, idx), w, at in interpolation(t, j, src.pair_checkpoints):
                g = {"pair": lambda: raw["pairs"][idx][j], "own": lambda: raw["own"][idx],
                     "after": lambda: raw["after"][idx]}[kind]()
                force += w * g.double()
                line += w * raw["thetas"][at].double()
            force += vecs.t() @ (vals * (vecs @ (raw["thetas"][t].double() - line))) - raw["own"][t].double()
        mu = HP.beta1 * mu + (1 - HP.beta1) * (force + vecs.t() @ (vals * (vecs @ delta_)))
        steps = src.adam_steps[t]
        b = src.lrs[t] / (1 - HP.beta1 ** steps) * math.sqrt((1 - HP.beta2 ** steps) / bc2_mid)
        delta_ = (1 - src.lrs[t] * HP.weight_decay) * delta_ - b * P * mu
    return delta_


@pytest.mark.parametrize("checkpoints", [(0, 6), (0, 3, 6)])
def test_closed_form_replay_is_the_full_space_recursion(checkpoints):
    src, raw = synthetic(checkpoints=checkpoints)
    sub = build_subspace(src, None, 0.0, 0, 0)
    orders = [[5, 4, 3, 2, 1, 0], [1, 0, 3, 2, 5, 4], [0, 2, 4, 1, 3, 5]]
    S = sub.replay(torch.tensor(orders))
    got = delta(S, src.rows, src.precond, D, src.chunk).double()
    for i, order in enumerate(orders):
        want = direct_recursion(src, raw, order)
        # float32 basis and preconditioner (as stored) against the float64 recursion
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_identity_order_gives_the_reference_exactly():
    src, _ = synthetic()
    sub = build_subspace(src, None, 0.0, 0, 0)
    S = sub.replay(torch.tensor([list(range(T))]))
    assert torch.count_nonzero(S) == 0
    sub.readout_coef = torch.tensor([0.3, 0.7, 11.0], dtype=torch.float64)
    assert float(sub.quadratic(S, 2.5)[0]) == 2.5


def test_interpolation_knots_around_a_batchs_own_step():
    # B_3 between pair checkpoints 0 and 6: cached at 0 (pair), 3 (own gradient), 4 (after its step), 6 (pair)
    assert interpolation(3, 3, [0, 6]) == [(("own", 3), 1.0, 3)]
    assert interpolation(4, 3, [0, 6]) == [(("after", 3), 1.0, 4)]
    w = interpolation(1, 3, [0, 6])
    assert [k for k, _, _ in w] == [("pair", 0), ("own", 3)] and [x for _, x, _ in w] == pytest.approx([2 / 3, 1 / 3])
    w = interpolation(5, 3, [0, 6])
    assert [k for k, _, _ in w] == [("after", 3), ("pair", 6)] and [x for _, x, _ in w] == pytest.approx([0.5, 0.5])


def test_quadratic_readout_fit_recovers_a_readout_that_is_quadratic():
    """If the exact readout is L_T + ∇Lᵀδ + Σ c_g q_g + κ r (its own features), the fit finds c_g and κ."""
    src, _ = synthetic()
    sub = build_subspace(src, None, 1.0, 0, 0)
    truth = torch.tensor([0.25, 2.0, 5.0], dtype=torch.float64)

    def exact(deltas: torch.Tensor) -> torch.Tensor:      # readout features recomputed from δ in full space
        sigma = torch.tensor(probe_orders(T, src.groups, 24, 3))
        f = sub.readout_features(sub.replay(sigma))
        return 1.0 + f[:, 0] + f[:, 1:] @ truth

    fitted = build_subspace(src, exact, 1.0, 24, 3)
    torch.testing.assert_close(fitted.readout_coef, truth, rtol=1e-6, atol=1e-8)


def test_probe_orders_are_permutations_and_seeded():
    groups = ["a", "b"] * 4
    a, b = probe_orders(8, groups, 12, 5), probe_orders(8, groups, 12, 5)
    assert a == b and all(sorted(o) == list(range(8)) for o in a)
    blocks = a[3]                               # every 4th is a domain-block order
    assert [groups[j] for j in blocks] in (["a"] * 4 + ["b"] * 4, ["b"] * 4 + ["a"] * 4)


def test_tensors_round_trip():
    src, _ = synthetic()
    sub = build_subspace(src, None, 0.0, 0, 0)
    again = type(sub).from_tensors(sub.tensors(), sub.metadata())
    sigma = torch.tensor([[1, 0, 3, 2, 5, 4]])
    assert torch.equal(again.replay(sigma), sub.replay(sigma))


def test_knot_disagreement_vanishes_where_the_curvature_explains_each_gradients_path():
    """Leaving out the pairs at T (extrapolating from the after-step gradient with the curvature) changes nothing
    when g(θ_T, B_j) is exactly that extrapolation, and something when it is not; the indicator is zero for the
    identity order, whose estimate is the reference's."""
    src, raw = synthetic()
    sub = build_subspace(src, None, 0.0, 0, 0)
    assert sub.knot_disagreement > 1e-2
    sigma = torch.tensor([[5, 4, 3, 2, 1, 0], list(range(T))])
    ind = sub.indicators(sub.replay(sigma), 1.0)
    assert float(ind["error_indicator_ppl"][1]) == 0.0 and float(ind["error_indicator_ppl"][0]) > 0
    assert float(ind["knot_disagreement"][0]) == sub.knot_disagreement

    thetas = raw["thetas"]
    for j in range(T):
        vals, vecs = raw["eigen"][(0, src.groups[j])]
        raw["pairs"][T][j] = raw["after"][j] + vecs.t() @ (vals * (vecs @ (thetas[T] - thetas[j + 1])))
    basis = torch.cat([raw["pairs"][c] for c in src.pair_checkpoints] + [raw["own"], raw["after"]]
                      + [raw["eigen"][k][1] for k in src.eigen_keys])
    linear = build_subspace(SubspaceSources(**{**src.__dict__, "rows": lambda cols: basis[:, cols]}), None, 0.0, 0, 0)
    assert linear.knot_disagreement < 1e-4         # float32 replay: ~1e-6 relative



# --- units beyond one epoch's batches: sequences (sample-level orders) and batches visited E times -----------

def unit_sources(units: int, steps: int, visits, reference, groups, seed: int = 1, own_curvature: bool = False,
                 directions: list[list[int]] | None = None):
    """Synthetic sources over `units` with own/after rows per visit, pairs at 0 and `steps` (and, with
    `own_curvature`, rows h_{u,k} per unit: its Hessian along its own preconditioned gradients, those in basis rows
    `directions[u]`, default its pair at 0)."""
    directions = directions or [[u] for u in range(units)]
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)
    raw = {"pairs": {c: rnd(units, D) for c in (0, steps)}, "own": rnd(len(visits), D), "after": rnd(len(visits), D),
           "thetas": rnd(steps + 1, D), "eigen": {},
           "curv": rnd(units * len(directions[0]), D)}
    for g in sorted(set(groups)):
        q, _ = torch.linalg.qr(rnd(D, R))
        raw["eigen"][(0, g)] = (torch.rand(R, generator=gen) * 5 + 1, q.t().contiguous())
    keys = sorted(raw["eigen"])
    basis = torch.cat([raw["pairs"][c] for c in (0, steps)] + [raw["own"], raw["after"]]
                      + [raw["eigen"][k][1] for k in keys] + ([raw["curv"]] if own_curvature else []))
    raw["basis"] = basis
    src = SubspaceSources(pair_checkpoints=[0, steps], eigen_keys=keys, eigen_values=[raw["eigen"][k][0] for k in keys],
                          groups=list(groups), rows=lambda cols: basis[:, cols], dim=D, chunk=7,
                          theta=lambda t: raw["thetas"][t], precond=torch.rand(D, generator=gen) + 0.5,
                          precond_drift=0.0, eval_grad=rnd(D), lrs=[0.01] * steps,
                          adam_steps=[100 + t + 1 for t in range(steps)], hp=HP, visits=visits, reference=reference,
                          own_directions=directions if own_curvature else None)
    return src, raw


def unit_recursion(src: SubspaceSources, raw: dict, order: list[list[int]], damping: float = 0.0,
                   hessians: dict | None = None) -> torch.Tensor:
    """The full-space recursion over units, written out: a step's gradient is the mean over its units of each
    unit's interpolated gradient plus its group's curvature term, minus the same for the reference's units, plus
    the damping's restoring term λ P̄⁻¹ δ. With `hessians` (group -> [D, D]), the curvature term applies the
    group's whole Hessian and projects it on the basis in Adam's metric, Π x = Bᵀ (B P̄ Bᵀ)⁺ B P̄ x (Galerkin)."""
    steps = len(src.lrs)
    bc2_mid = 1 - HP.beta2 ** src.adam_steps[steps // 2]
    visits = {u: [(row, s) for row, (uu, s) in enumerate(src.visits) if uu == u] for u in range(len(src.groups))}
    delta_, mu = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    P = src.precond.double()

    def g_hat(t: int, u: int) -> torch.Tensor:
        vals, vecs = (x.double() for x in raw["eigen"][(0, src.groups[u])])
        out, line = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
        for (kind, idx), w, at in interpolation(t, u, src.pair_checkpoints, visits[u]):
            out += w * {"pair": lambda: raw["pairs"][idx][u], "own": lambda: raw["own"][idx],
                        "after": lambda: raw["after"][idx]}[kind]().double()
            line += w * raw["thetas"][at].double()
        return out + vecs.t() @ (vals * (vecs @ (raw["thetas"][t].double() - line)))

    B = raw["basis"].double()
    project = lambda x: B.t() @ (torch.linalg.pinv(B @ (P[:, None] * B.t()), hermitian=True) @ (B @ (P * x)))

    def group_curvature(u: int, x: torch.Tensor) -> torch.Tensor:
        if hessians is not None:
            return project(hessians[src.groups[u]].double() @ x)
        vals, vecs = (y.double() for y in raw["eigen"][(0, src.groups[u])])
        return vecs.t() @ (vals * (vecs @ x))

    def curvature(u: int, x: torch.Tensor) -> torch.Tensor:
        out = group_curvature(u, x)
        if src.own_directions:         # exact along each P̄ g_{u,k}: H_u P̄ g_{u,k} = h_{u,k}
            K = len(src.own_directions[u])
            g = raw["basis"][src.own_directions[u]].double()                      # [K, D]
            h = raw["curv"][u * K: (u + 1) * K].double()
            residual = h - torch.stack([group_curvature(u, P * gk) for gk in g])
            out += residual.t() @ (torch.linalg.pinv(g @ (P * g).t(), hermitian=True) @ (g @ x))
        return out

    for t, batch in enumerate(order):
        force = torch.stack([g_hat(t, u) for u in batch]).mean(0) - torch.stack(
            [g_hat(t, u) for u in src.reference[t]]).mean(0)
        mu = HP.beta1 * mu + (1 - HP.beta1) * (force + torch.stack([curvature(u, delta_) for u in batch]).mean(0)
                                               + damping * delta_ / P)
        n = src.adam_steps[t]
        b = src.lrs[t] / (1 - HP.beta1 ** n) * math.sqrt((1 - HP.beta2 ** n) / bc2_mid)
        delta_ = (1 - src.lrs[t] * HP.weight_decay) * delta_ - b * P * mu
    return delta_


def test_sample_level_replay_is_the_full_space_recursion_over_sequences():
    """Sequences as units (3 batches of 2, domains a, b, a): re-batchings, domain-mixed ones included, replay as
    the recursion in full space; the reference's own batches give δ = 0 exactly."""
    steps, b = 3, 2
    n = steps * b
    groups = ["a", "a", "b", "b", "a", "a"]
    src, raw = unit_sources(n, steps, [(i, i // b) for i in range(n)], [[j * b, j * b + 1] for j in range(steps)],
                            groups)
    sub = build_subspace(src, None, 0.0, 0, 0, probe_sigma=torch.zeros(0, steps, b, dtype=torch.long))
    orders = [[[4, 5], [0, 1], [2, 3]], [[0, 2], [1, 4], [3, 5]], [[5, 3], [1, 0], [2, 4]]]
    S = sub.replay(torch.tensor(orders))
    got = delta(S, src.rows, src.precond, D, src.chunk).double()
    for i, order in enumerate(orders):
        want = unit_recursion(src, raw, order)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    identity = sub.replay(torch.tensor([[[1, 0], [2, 3], [5, 4]]]))      # order within a batch is immaterial
    assert torch.count_nonzero(identity) == 0


def test_multi_epoch_replay_is_the_full_space_recursion_and_exact_on_the_reference():
    """Batches visited twice (T = 3, E = 2): every visit is a knot; the reference order twice gives δ = 0."""
    steps, epochs = 3, 2
    S_ = steps * epochs
    src, raw = unit_sources(steps, S_, [(t % steps, t) for t in range(S_)], [[t % steps] for t in range(S_)],
                            ["a", "b", "a"])
    sub = build_subspace(src, None, 0.0, 0, 0, probe_sigma=torch.zeros(0, S_, dtype=torch.long))
    orders = [[2, 1, 0, 2, 1, 0], [1, 0, 2, 0, 2, 1], [0, 1, 2, 2, 1, 0]]
    S = sub.replay(torch.tensor(orders))
    got = delta(S, src.rows, src.precond, D, src.chunk).double()
    for i, order in enumerate(orders):
        want = unit_recursion(src, raw, [[j] for j in order])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert torch.count_nonzero(sub.replay(torch.tensor([[0, 1, 2, 0, 1, 2]]))) == 0


def test_whole_batch_sample_orders_replay_as_the_batch_orders():
    """When each batch's rows are the means of its sequences' rows, re-ordering whole batches as sample-level
    orders gives the batch-level replay's δ (the estimator over sequences generalizes the one over batches)."""
    steps, b = 3, 2
    n = steps * b
    seq_groups = ["a", "a", "b", "b", "a", "a"]
    seq_src, raw = unit_sources(n, steps, [(i, i // b) for i in range(n)], [[j * b, j * b + 1] for j in range(steps)],
                                seq_groups)
    mean = lambda x: x.reshape(steps, b, D).mean(1)
    basis = torch.cat([mean(raw["pairs"][c]) for c in (0, steps)] + [mean(raw["own"]), mean(raw["after"])]
                      + [raw["eigen"][k][1] for k in seq_src.eigen_keys])
    batch_src = SubspaceSources(**{**seq_src.__dict__, "groups": seq_groups[::b], "rows": lambda cols: basis[:, cols],
                                   "visits": None, "reference": None})
    seq_sub = build_subspace(seq_src, None, 0.0, 0, 0, probe_sigma=torch.zeros(0, steps, b, dtype=torch.long))
    batch_sub = build_subspace(batch_src, None, 0.0, 0, 0)
    for order in ([2, 0, 1], [1, 2, 0], [2, 1, 0]):
        as_seqs = [[j * b + k for k in range(b)] for j in order]
        a = delta(seq_sub.replay(torch.tensor([as_seqs])), seq_src.rows, seq_src.precond, D, 7)[0]
        c = delta(batch_sub.replay(torch.tensor([order])), batch_src.rows, batch_src.precond, D, 7)[0]
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6 * float(c.abs().max()))


def test_own_direction_curvature_replays_as_the_recursion_and_is_exact_along_it():
    """Batches visited twice with each batch's own curvature h_u = H_u P̄ g_u: the replay is the full-space
    recursion with H_u δ = UΛUᵀδ + c_u g_uᵀδ, which returns h_u for δ = P̄ g_u."""
    steps, epochs = 3, 2
    S_ = steps * epochs
    src, raw = unit_sources(steps, S_, [(t % steps, t) for t in range(S_)], [[t % steps] for t in range(S_)],
                            ["a", "b", "a"], own_curvature=True)
    sub = build_subspace(src, None, 0.0, 0, 0, probe_sigma=torch.zeros(0, S_, dtype=torch.long))
    plain = build_subspace(SubspaceSources(**{**src.__dict__, "own_directions": None,
                                              "rows": lambda cols: src.rows(cols)[:-steps]}), None, 0.0, 0, 0,
                           probe_sigma=torch.zeros(0, S_, dtype=torch.long))
    orders = [[2, 1, 0, 2, 1, 0], [1, 0, 2, 0, 2, 1]]
    S = sub.replay(torch.tensor(orders))
    got = delta(S, src.rows, src.precond, D, src.chunk).double()
    for i, order in enumerate(orders):
        want = unit_recursion(src, raw, [[j] for j in order])
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    other = delta(plain.replay(torch.tensor(orders)), lambda cols: src.rows(cols)[:-steps], src.precond, D,
                  src.chunk).double()
    assert float((other - got).abs().max()) > 1e-4 * float(got.abs().max())     # the term changes δ (lr 0.01: ~1e-3)
    assert torch.count_nonzero(sub.replay(torch.tensor([[0, 1, 2, 0, 1, 2]]))) == 0


def test_own_direction_curvature_over_sequences_replays_as_the_recursion():
    """Sequences as units with each one's curvature along its own-step gradient (the sample-level cache's rows): a
    batch's term is the mean of its sequences', as in the full-space recursion; the reference batches give δ = 0."""
    steps, b = 3, 2
    n = steps * b
    visits = [(i, i // b) for i in range(n)]
    src, raw = unit_sources(n, steps, visits, [[j * b, j * b + 1] for j in range(steps)], ["a", "a", "b", "b", "a", "a"],
                            own_curvature=True, directions=[[2 * n + i] for i in range(n)])    # own rows follow pairs
    sub = build_subspace(src, None, 0.0, 0, 0, probe_sigma=torch.zeros(0, steps, b, dtype=torch.long))
    orders = [[[4, 5], [0, 1], [2, 3]], [[0, 2], [1, 4], [3, 5]], [[5, 3], [1, 0], [2, 4]]]
    got = delta(sub.replay(torch.tensor(orders)), src.rows, src.precond, D, src.chunk).double()
    for i, order in enumerate(orders):
        want = unit_recursion(src, raw, order)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert torch.count_nonzero(sub.replay(torch.tensor([[[1, 0], [2, 3], [5, 4]]]))) == 0


def test_several_own_directions_per_batch_replay_as_the_recursion_even_when_two_coincide():
    """Batches visited twice, each with its pair at 0 and its own and after-step gradients at both visits as own
    directions (as fut/epochs.py builds them): the replay is the full-space recursion with the curvature exact on
    their span, and batch 0's own gradient at step 0, the same vector as its pair at 0, is harmless."""
    steps, epochs = 3, 2
    S_ = steps * epochs
    own0 = 2 * steps
    dirs = [[j] + [own0 + t for t in range(j, S_, steps)] + [own0 + S_ + t for t in range(j, S_, steps)]
            for j in range(steps)]
    src, raw = unit_sources(steps, S_, [(t % steps, t) for t in range(S_)], [[t % steps] for t in range(S_)],
                            ["a", "b", "a"], own_curvature=True, directions=dirs)
    basis, K = raw["basis"], len(dirs[0])          # g(θ_0, B_0) twice, and its curvature row twice
    raw["own"][0] = basis[own0] = basis[0]
    raw["curv"][1] = basis[len(basis) - steps * K + 1] = basis[len(basis) - steps * K]
    sub = build_subspace(src, None, 0.0, 0, 0, probe_sigma=torch.zeros(0, S_, dtype=torch.long))
    assert sub.own_curv.shape == (steps, 5, src.rows(slice(0, 1)).shape[0])
    orders = [[2, 1, 0, 2, 1, 0], [1, 0, 2, 0, 2, 1]]
    got = delta(sub.replay(torch.tensor(orders)), src.rows, src.precond, D, src.chunk).double()
    for i, order in enumerate(orders):
        want = unit_recursion(src, raw, [[j] for j in order])
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert torch.count_nonzero(sub.replay(torch.tensor([[0, 1, 2, 0, 1, 2]]))) == 0


def test_damped_replay_is_the_recursion_with_its_restoring_term_and_keeps_the_reference_exact():
    """Batches visited twice with own-direction curvature and damping λ: the replay is the full-space recursion
    with λ P̄⁻¹ δ added to every step's gradient, it shrinks δ against the undamped replay, the identity order
    still gives δ = 0, and λ is stored with the matrices."""
    steps, epochs, lam = 3, 2, 20.0
    S_ = steps * epochs
    src, raw = unit_sources(steps, S_, [(t % steps, t) for t in range(S_)], [[t % steps] for t in range(S_)],
                            ["a", "b", "a"], own_curvature=True)
    none = torch.zeros(0, S_, dtype=torch.long)
    damped = build_subspace(src, None, 0.0, 0, 0, probe_sigma=none, damping=lam)
    plain = build_subspace(src, None, 0.0, 0, 0, probe_sigma=none)
    orders = [[2, 1, 0, 2, 1, 0], [1, 0, 2, 0, 2, 1]]
    got = delta(damped.replay(torch.tensor(orders)), src.rows, src.precond, D, src.chunk).double()
    undamped = delta(plain.replay(torch.tensor(orders)), src.rows, src.precond, D, src.chunk).double()
    for i, order in enumerate(orders):
        want = unit_recursion(src, raw, [[j] for j in order], damping=lam)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        assert float(want.norm()) < float(undamped[i].norm())
    assert torch.count_nonzero(damped.replay(torch.tensor([[0, 1, 2, 0, 1, 2]]))) == 0
    back = type(damped).from_tensors(damped.tensors(), damped.metadata())
    assert back.damping == lam and torch.equal(back.replay(torch.tensor(orders)), damped.replay(torch.tensor(orders)))


def test_galerkin_curvature_replays_as_the_projected_recursion_and_reduces_to_the_eigenspaces():
    """Batches visited twice with own-direction curvature and each group's whole Hessian H_g given through
    B P̄ H_g P̄ Bᵀ (fut/epochs.py's `hessian_grams`): the replay is the full-space recursion that applies H_g to δ and
    projects it on the basis in Adam's metric (α H_g with the curvature scale α); where H_g is its top eigenspace
    alone (in the basis), that is the eigenspace replay; the identity order still gives δ = 0, and the operators are
    stored with the matrices."""
    steps, epochs = 3, 2
    S_ = steps * epochs
    src, raw = unit_sources(steps, S_, [(t % steps, t) for t in range(S_)], [[t % steps] for t in range(S_)],
                            ["a", "b", "a"], own_curvature=True)
    B, P = raw["basis"].double(), src.precond.double()
    gen = torch.Generator().manual_seed(5)
    low_rank = {g: (lambda v, u: u.t() @ (v[:, None] * u))(*(x.double() for x in raw["eigen"][(0, g)])) for g in "ab"}
    noise = {g: (lambda w: 5 * (w + w.t()))(torch.randn(D, D, generator=gen, dtype=torch.float64)) for g in "ab"}
    none, orders = torch.zeros(0, S_, dtype=torch.long), [[2, 1, 0, 2, 1, 0], [1, 0, 2, 0, 2, 1]]

    def replay(hessians: dict | None, scale: float = 1.0) -> tuple:
        grams = None if hessians is None else [(P * B) @ hessians[g] @ (P * B).t() for _, g in src.eigen_keys]
        given = SubspaceSources(**{**src.__dict__, "hessian_grams": grams})
        sub = build_subspace(given if grams is None else scaled_curvature(given, scale), None, 0.0, 0, 0,
                             probe_sigma=none)
        return sub, delta(sub.replay(torch.tensor(orders)), src.rows, src.precond, D, src.chunk).double()

    eigen = replay(None)[1]
    sub, same = replay(low_rank)
    torch.testing.assert_close(same, eigen, rtol=1e-4, atol=1e-5 * float(eigen.abs().max()))
    full = {g: low_rank[g] + noise[g] for g in "ab"}
    sub, got = replay(full)
    for i, order in enumerate(orders):
        want = unit_recursion(src, raw, [[j] for j in order], hessians=full)
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert float((got - eigen).abs().max()) > 1e-3 * float(eigen.abs().max())     # the rest of H_g changes δ
    _, half = replay(full, 0.5)          # multi_epoch.curvature_scale: the recursion with α H_g
    for i, order in enumerate(orders):
        want = unit_recursion(src, raw, [[j] for j in order], hessians={g: 0.5 * full[g] for g in "ab"})
        torch.testing.assert_close(half[i], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert float((half - got).abs().max()) > 1e-3 * float(got.abs().max())
    assert torch.count_nonzero(sub.replay(torch.tensor([[0, 1, 2, 0, 1, 2]]))) == 0
    back = type(sub).from_tensors(sub.tensors(), sub.metadata())
    assert torch.equal(back.hessian_ops, sub.hessian_ops)
    assert torch.equal(back.replay(torch.tensor(orders)), sub.replay(torch.tensor(orders)))
