"""The cache's top Hessian eigenspaces from fut's own Lanczos against a maintained library's, on accuracy and cost.

Per domain curvature batch (fut.cache.curvature_batches) at checkpoint 0, the top-r eigenpairs (largest |λ|) three
ways:
  fut-lanczos     fut.curvature.lanczos_top_eigen on run.loss.hvp (double backward), exactly as the cache builder
                  computes them (same seed, `cache.curvature_iterations` iterations);
  hessian-eigsh   curvlinops' HessianLinearOperator (forward-over-reverse HVPs) through `.to_scipy()` into scipy's
                  ARPACK (`eigsh(k=r, which="LM", ncv=cache.curvature_iterations)`, from the same start vector),
                  capped at --maxiter restarts: what converged is reported and used;
  kfac-eigsh      curvlinops' KFACLinearOperator (Monte-Carlo Fisher, Linear layers only: zero on the norms; the tied
                  embedding as the output layer sees it) with the same eigsh: the cheap one.
Each is counted in matrix-vector products and seconds, compared with fut-lanczos by subspace overlap, and judged by
what fut-subspace does with it: its matrices are built from the cache's basis with these eigenspaces in place of
the cached ones (fut.subspace.build_subspace), the dev orders replayed (Subspace.replay) and read out exactly
(the eval loss at θ_T + δ), and the estimates scored against the dev ground truth per family. A fourth row, `none`,
replays without curvature: what the eigenspaces add.

curvlinops' forward-mode AD has no rule for SiLU's backward, so its model uses SiLU written as x·sigmoid(x) (the
same function; HVPs agree with fut's to float32 rounding). The model is the reference's Llama with θ_0 loaded,
forward(x) -> logits[:, :-1] as (tokens, vocab), labels x[:, 1:], CrossEntropyLoss: fut's loss.

  python benchmarks/curvature_library.py            # on data/ (prepared, reference, cache, groundtruth/dev)
  python benchmarks/curvature_library.py --tiny     # the tests' tiny pipeline, built in a temporary folder

Needs curvlinops-for-pytorch (not in requirements.txt: only this benchmark imports it; its HessianLinearOperator
and KFACLinearOperator import without backpack's torchvision). Prints a table and writes
benchmarks/results/curvature_library.json (curvature_library_tiny.json with --tiny).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # this checkout's fut and checks/, not installed ones

from curvlinops import HessianLinearOperator, KFACLinearOperator  # noqa: E402

from benchmarks.options import pipeline_paths  # noqa: E402
from fut import config, protocol  # noqa: E402
from fut.cache import BASIS_FLOATS, UpdateCache, curvature_batches  # noqa: E402
from fut.curvature import lanczos_top_eigen  # noqa: E402
from fut.device import autocast  # noqa: E402
from fut.estimators import EstimationContext  # noqa: E402
from fut.model import build_model  # noqa: E402
from fut.reference import ReferenceRun  # noqa: E402
from fut.storage import atomic_write_json, versions  # noqa: E402
from fut.subspace import basis_layout, build_subspace, delta  # noqa: E402

METHODS = ("fut-lanczos", "hessian-eigsh", "kfac-eigsh")


@dataclasses.dataclass
class Eigenspace:
    values: torch.Tensor     # [r'] by |λ|, descending (r' < r where ARPACK did not converge on all)
    vectors: torch.Tensor    # [r', d] in fut's flat layout
    matvecs: int
    seconds: float


class SiLU(torch.nn.Module):
    """x·sigmoid(x): torch's silu has no forward-mode derivative of its backward, which curvlinops' HVP needs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class NextTokenLogits(torch.nn.Module):
    """The Llama as curvlinops sees a model: tokens [b, L] -> next-token logits [b·(L−1), V]."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=x).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1])


class Counted(LinearOperator):
    """A scipy operator that counts the vectors it is applied to."""

    def __init__(self, op: LinearOperator):
        super().__init__(op.dtype, op.shape)
        self.op, self.count = op, 0

    def _matvec(self, x):
        self.count += 1
        return self.op.matvec(x)

    def _matmat(self, X):
        self.count += X.shape[1]
        return self.op.matmat(X)


class Library:
    """The reference model at θ_0 for curvlinops, and the map between its parameter order and fut's layout."""

    def __init__(self, run: ReferenceRun):
        self.run = run
        p = run.params
        model = build_model(p.model, run.prepared.vocab_size, p.data.seq_len, run.prepared.eos_id)
        theta = run.layout.unflatten(run.theta(0).cpu())
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(theta[name])
        for layer in model.model.layers:
            layer.mlp.act_fn = SiLU()
        self.module = NextTokenLogits(model).to(run.device).eval()
        named = dict(model.named_parameters())          # the tied embedding once
        self.names = {id(q): n for n, q in named.items()}
        self.params = list(named.values())
        linear = []
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                linear += [q for q in mod.parameters() if all(q is not o for o in linear)]
        self.linear = linear
        offsets, pos = {}, 0
        for n, s in zip(run.layout.names, run.layout.shapes):
            offsets[n] = (pos, s.numel())
            pos += s.numel()
        self.offsets = offsets

    def to_layout(self, params: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """Rows over `params` (curvlinops' order) [k, n] -> fut's flat layout [k, d], zero elsewhere."""
        out = torch.zeros(rows.shape[0], self.run.layout.dim)
        pos = 0
        for q in params:
            a, size = self.offsets[self.names[id(q)]]
            out[:, a: a + size] = rows[:, pos: pos + size]
            pos += size
        return out

    def from_layout(self, params: list[torch.Tensor], vec: torch.Tensor) -> torch.Tensor:
        parts = [vec[a: a + size] for a, size in (self.offsets[self.names[id(q)]] for q in params)]
        return torch.cat(parts)


def start_vector(run: ReferenceRun) -> torch.Tensor:
    """The Lanczos start vector of checkpoint 0, as the cache builder draws it."""
    gen = torch.Generator().manual_seed(run.params.cache.seed + 0)
    return torch.randn(run.layout.dim, generator=gen)


def fut_lanczos(run: ReferenceRun, batch: torch.Tensor, rank: int, iterations: int) -> Eigenspace:
    theta, count = run.theta(0), [0]

    def hvp(x: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        with autocast(run.params.train, run.device):
            return run.loss.hvp(theta, batch, x[None])[0]

    t0 = time.perf_counter()
    vals, vecs = lanczos_top_eigen(hvp, run.layout.dim, rank, iterations, seed=run.params.cache.seed + 0,
                                   device=run.device)
    return Eigenspace(vals, vecs, count[0], time.perf_counter() - t0)


def arpack(lib: Library, op, params: list[torch.Tensor], rank: int, ncv: int, maxiter: int, tol: float,
           t0: float) -> Eigenspace:
    """Top-`rank` eigenpairs (largest |λ|) of a curvlinops operator over `params` by scipy's eigsh; where ARPACK
    stops at `maxiter` restarts, the pairs that converged."""
    counted = Counted(op.to_scipy())
    v0 = lib.from_layout(params, start_vector(lib.run)).double().numpy()
    try:
        with autocast(lib.run.params.train, lib.run.device):
            vals, vecs = eigsh(counted, k=rank, which="LM", ncv=ncv, maxiter=maxiter, tol=tol, v0=v0)
    except ArpackNoConvergence as err:
        vals, vecs = err.eigenvalues, err.eigenvectors
    order = np.argsort(-np.abs(vals))
    rows = torch.from_numpy(np.ascontiguousarray(vecs[:, order].T)).float()
    return Eigenspace(torch.from_numpy(vals[order].copy()).float(), lib.to_layout(params, rows), counted.count,
                      time.perf_counter() - t0)


def hessian_eigsh(lib: Library, batch: torch.Tensor, rank: int, ncv: int, maxiter: int, tol: float) -> Eigenspace:
    t0 = time.perf_counter()
    op = HessianLinearOperator(lib.module, torch.nn.CrossEntropyLoss(), lib.params,
                               [(batch, batch[:, 1:].reshape(-1))], check_deterministic=False)
    return arpack(lib, op, lib.params, rank, ncv, maxiter, tol, t0)


def kfac_eigsh(lib: Library, batch: torch.Tensor, rank: int, ncv: int, maxiter: int, tol: float,
               mc_samples: int) -> Eigenspace:
    """K-FAC's Kronecker factors (one forward and `mc_samples` backward passes) are computed at the first product
    and counted in its seconds."""
    t0 = time.perf_counter()
    op = KFACLinearOperator(lib.module, torch.nn.CrossEntropyLoss(), lib.linear, [(batch, batch[:, 1:].reshape(-1))],
                            check_deterministic=False, seed=lib.run.params.cache.seed, mc_samples=mc_samples)
    return arpack(lib, op, lib.linear, rank, ncv, maxiter, tol, t0)


def residuals(run: ReferenceRun, batch: torch.Tensor, vectors: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """‖H u − ρ u‖ / |ρ| for each row u, ρ = uᵀHu and H the batch's exact Hessian (fut's HVP): how far each vector
    is from an eigenvector of H (ARPACK's convergence test, with the Rayleigh quotient in place of its value)."""
    out = []
    for i in range(0, len(vectors), chunk):
        U = vectors[i: i + chunk].to(run.device)
        with autocast(run.params.train, run.device):
            HU = run.loss.hvp(run.theta(0), batch, U)
        rho = (HU * U).sum(1)
        out.append(((HU - rho[:, None] * U).norm(dim=1) / rho.abs()).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def overlap(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """‖U_a U_bᵀ‖²_F / rank(a): the share of a's eigenspace that b's spans (1: the same space; None: a is empty)."""
    return float(((a.double() @ b.double().t()) ** 2).sum() / a.shape[0]) if len(a) else None


def mean_or_none(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def summary(by_group: dict[str, Eigenspace], lanczos: dict[str, Eigenspace], residual: dict[str, torch.Tensor],
            tol: float) -> dict:
    """One method's cost and eigenpair accuracy, summed over the domains and per domain."""
    res = torch.cat(list(residual.values()))
    return {"matvecs": sum(s.matvecs for s in by_group.values()), "seconds": sum(s.seconds for s in by_group.values()),
            "eigenpairs": len(res), "pairs_within_tol": int((res <= tol).sum()),
            "median_residual": float(res.median()) if len(res) else None,
            "overlap_with_fut_lanczos": mean_or_none([overlap(s.vectors, lanczos[g].vectors)
                                                      for g, s in by_group.items()]),
            "groups": {g: {"matvecs": s.matvecs, "seconds": s.seconds, "eigenpairs": len(s.values),
                           "top_eigenvalues": s.values[:4].tolist(),
                           "smallest_kept_eigenvalue": float(s.values[-1]) if len(s.values) else None,
                           "residuals": residual[g].tolist(),
                           "overlap_with_fut_lanczos": overlap(s.vectors, lanczos[g].vectors)}
                       for g, s in by_group.items()}}


def replay_losses(ctx: EstimationContext, store: UpdateCache, spaces: dict[str, Eigenspace],
                  orders: list[list[int]]) -> tuple[list[float], dict]:
    """fut-subspace with `spaces` (group -> eigenspace at checkpoint 0; rank 0: no curvature) in place of the cached
    eigenspaces: its matrices, the orders' replays, and their exact readouts."""
    src = store.subspace_sources()
    T = ctx.T
    own_rows = basis_layout(T, len(src.pair_checkpoints), [])["size"]     # pairs, own and after-step gradients
    groups = sorted(spaces)
    vecs = [spaces[g].vectors for g in groups]
    n_rows = own_rows + sum(len(v) for v in vecs)

    def rows(cols: slice) -> torch.Tensor:
        return torch.cat([store.basis_rows(src.pair_checkpoints, cols)[:own_rows], *(v[:, cols] for v in vecs)])

    src = dataclasses.replace(src, eigen_keys=[(0, g) for g in groups], eigen_values=[spaces[g].values for g in groups],
                              rows=rows, chunk=max(1, BASIS_FLOATS // n_rows))
    t0 = time.perf_counter()
    sub = build_subspace(src, None, ctx.naive_loss, 0, 0)
    built = time.perf_counter() - t0
    S = sub.replay(torch.tensor(orders))
    deltas = delta(S, src.rows, src.precond, src.dim, src.chunk)
    losses = [ctx.eval_loss(ctx.theta_T + d.to(ctx.device)) for d in deltas]
    return losses, {"basis_vectors": n_rows, "subspace_seconds": built,
                    "replay_and_readout_seconds_per_order": (time.perf_counter() - t0 - built) / len(orders),
                    "gram": sub.gram}


def compare(params: config.Params, data_dir: Path, ref_dir: Path, cache_dir: Path, gt_dir: Path, maxiter: int,
            tol: float, mc_samples: int) -> dict:
    run = ReferenceRun(params, data_dir, ref_dir)
    c = params.cache
    rank, ncv = c.curvature_rank, c.curvature_iterations
    batches = {g: b.to(run.device) for g, b in curvature_batches(run.prepared, c.curvature_batch, ["domain"]).items()}
    lib = Library(run)
    spaces: dict[str, dict[str, Eigenspace]] = {m: {} for m in METHODS}
    for g, batch in batches.items():
        spaces["fut-lanczos"][g] = fut_lanczos(run, batch, rank, c.curvature_iterations)
        spaces["hessian-eigsh"][g] = hessian_eigsh(lib, batch, rank, ncv, maxiter, tol)
        spaces["kfac-eigsh"][g] = kfac_eigsh(lib, batch, rank, ncv, maxiter, tol, mc_samples)
        print(f"{g}: " + ", ".join(f"{m} {s[g].matvecs} products {s[g].seconds:.1f} s ({len(s[g].values)} pairs)"
                                   for m, s in spaces.items()), flush=True)
    rows = {m: summary(by_group, spaces["fut-lanczos"],
                       {g: residuals(run, batches[g], s.vectors) for g, s in by_group.items()}, tol)
            for m, by_group in spaces.items()}
    store = UpdateCache(run, cache_dir)
    rows["fut-lanczos"]["equals_cache"] = all(
        torch.equal(s.values, store.eigen(0, g)[0]) and torch.equal(s.vectors, store.eigen(0, g)[1])
        for g, s in spaces["fut-lanczos"].items())

    # What fut-subspace makes of each: the dev orders replayed and read out exactly, scored per family.
    dev = protocol.dev_truth(gt_dir)
    named = protocol.scored({n: r["order"] for n, r in dev.items()})
    ctx = EstimationContext(run, cache_dir)
    spaces["none"] = dict.fromkeys(batches, Eigenspace(torch.zeros(0), torch.zeros(0, run.layout.dim), 0, 0.0))
    rows["none"] = {}
    estimates = {}
    for m, by_group in spaces.items():
        losses, info = replay_losses(ctx, store, by_group, list(named.values()))
        estimates[m] = dict(zip(named, losses))
        gram = info.pop("gram")
        rows[m].update(info)
        if m == "fut-lanczos":
            rows[m]["matrices_equal_cache"] = bool(torch.allclose(gram, ctx.subspace.gram, rtol=1e-6, atol=0))
        print(f"{m}: replayed and read out {len(named)} dev orders", flush=True)
    block = protocol.score_block(estimates, {n: dev[n]["eval_loss"] for n in named}, ctx.naive_loss,
                                 params.estimate.bootstrap, 0)["families"]
    keep = ("spearman", "r2_order_effect", "r2_order_effect_ci", "bias_ppl", "absdiff_ppl", "n")
    for m in rows:
        rows[m]["dev"] = {f: {k: block[f][m][k] for k in keep} for f in block if m in block[f]}
    return {"rank": rank, "lanczos_iterations": c.curvature_iterations,
            "arpack": {"ncv": ncv, "maxiter": maxiter, "tol": tol, "which": "LM"},
            "kfac": {"fisher_type": "mc", "mc_samples": mc_samples, "kfac_approx": "expand"},
            "curvature_batch": list(next(iter(batches.values())).shape), "groups": sorted(batches),
            "dev_orders": len(named), "naive_eval_loss": ctx.naive_loss, "n_params": run.layout.dim,
            "threads": torch.get_num_threads(), "device": str(run.device), "methods": rows, "estimates": estimates,
            "versions": versions()}


def tiny_pipeline(folder: Path) -> tuple[config.Params, dict[str, Path]]:
    """The tests' tiny params (checks/tiny.py) and their pipeline up to the cache and the dev ground truth."""
    from checks.tiny import tiny_params, write_tiny_text
    from fut.stages import cache, groundtruth, prepare, reference

    params = config.from_dict(tiny_params(write_tiny_text(folder / "text")))
    dirs = {k: folder / k for k in ("prepared", "reference", "cache", "groundtruth")}
    prepare.run(params, dirs["prepared"])
    reference.run(params, dirs["prepared"], dirs["reference"])
    groundtruth.run(params, dirs["prepared"], dirs["reference"], dirs["groundtruth"])
    cache.run(params, dirs["prepared"], dirs["reference"], dirs["cache"])
    return params, dirs


def table(r: dict) -> str:
    fmt = lambda x, w=7: "-".rjust(w) if x is None else f"{x:{w}.3f}"
    lines = [f"rank {r['rank']} per domain ({len(r['groups'])} domains, curvature batch {r['curvature_batch']}); "
             f"Lanczos {r['lanczos_iterations']} iterations; ARPACK ncv {r['arpack']['ncv']}, at most "
             f"{r['arpack']['maxiter']} restarts, tol {r['arpack']['tol']:g}; {r['dev_orders']} dev orders",
             f"(pairs: eigenpairs kept; ≤tol: of them, with ‖Hu − ρu‖/|ρ| ≤ tol under the exact Hessian; overlap: share "
             "of the eigenspace fut-lanczos's spans)",
             f"{'method':14s} {'matvecs':>8s} {'seconds':>8s} {'pairs':>6s} {'≤tol':>5s} {'overlap':>7s} {'rand R²':>7s} "
             f"{'rand ρ':>7s} {'bias PPL':>8s} {'all R²':>7s} {'all ρ':>7s}"]
    for m, a in r["methods"].items():
        rand, pooled = a["dev"].get("random", {}), a["dev"]["all"]
        lines.append(f"{m:14s} {a.get('matvecs', 0):8d} {a.get('seconds', 0.0):8.1f} {a.get('eigenpairs', 0):6d} "
                     f"{a.get('pairs_within_tol', 0):5d} "
                     f"{fmt(a.get('overlap_with_fut_lanczos'))} {fmt(rand.get('r2_order_effect'))} "
                     f"{fmt(rand.get('spearman'))} {fmt(rand.get('bias_ppl'), 8)} {fmt(pooled['r2_order_effect'])} "
                     f"{fmt(pooled['spearman'])}")
    lines.append(f"fut-lanczos equals the cached eigenspaces: {r['methods']['fut-lanczos']['equals_cache']}; its "
                 f"matrices equal the cached subspace's: {r['methods']['fut-lanczos']['matrices_equal_cache']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny params on a temporary tiny pipeline")
    pipeline_paths(ap, "--cache", "--groundtruth")
    ap.add_argument("--maxiter", type=int, default=None,
                    help="ARPACK restarts at most (default 4, about twice Lanczos's products; 10 with --tiny)")
    ap.add_argument("--tol", type=float, default=1e-2,
                    help="ARPACK's convergence test ‖Hu − λu‖ ≤ tol·|λ| (also what the residual column counts)")
    ap.add_argument("--mc-samples", type=int, default=1, help="K-FAC's Monte-Carlo labels per token")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/curvature_library.json "
                                                           "(curvature_library_tiny.json with --tiny)")
    args = ap.parse_args()
    out = args.out or ROOT / f"benchmarks/results/curvature_library{'_tiny' if args.tiny else ''}.json"
    maxiter = args.maxiter or (10 if args.tiny else 4)
    if args.tiny:
        with tempfile.TemporaryDirectory(prefix="fut-curvature-library-") as tmp:
            params, dirs = tiny_pipeline(Path(tmp))
            result = compare(params, dirs["prepared"], dirs["reference"], dirs["cache"], dirs["groundtruth"], maxiter,
                             args.tol, args.mc_samples)
    else:
        result = compare(config.load(args.params), args.data, args.reference, args.cache, args.groundtruth, maxiter,
                         args.tol, args.mc_samples)
    result["mode"] = "tiny" if args.tiny else "real"
    atomic_write_json(out, result)
    print(table(result))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
