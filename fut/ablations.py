"""The ablation table, on the dev orders (every choice is made there; the test orders are the final table's, and
reach this table only as the final scoring's per-order pairs that validate the error indicator).
Answered by one cache without retraining: projection size k (prefixes of the stored projection) for the methods
that read it, fut-subspace's readout (the calibrated quadratic against evaluating its parameters) and its pair
checkpoints (its matrices rebuilt from pairs at every s-th checkpoint of this cache, which holds them all), and
the curvature and Adam-state grid (the estimate stage's dev block). Knobs that change the reference run (batch
size, T, lr, warm start) need one whole run per value: `python -m fut sweep` (fut/sweep.py) writes them to
reports/sweeps/, tabulated here."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from . import estimators, protocol
from .config import Params
from .estimators import EstimationContext
from .orders import FAMILIES, family
from .reference import ReferenceRun
from .stats import accuracy, rank_correlation
from .storage import read_json
from .subspace import build_subspace
from .sweep import collect

log = logging.getLogger(__name__)

SUMMARY = ("spearman", "kendall", "r2_order_effect", "bias_ppl", "absdiff_ppl", "rel_err", "n_non_finite", "n")
K_VALUES = (16, 64, 256, 1024, 4096)
# When fut-subspace's own indicators say not to trust a run: its skill score predicted from them (errors
# predicted as `scale` × error_indicator_ppl, the scale set on the default run's dev orders) is below
# FLAG_SKILL, the bar the sweep's failing points are defined by; or Adam's preconditioner moves more than 10%
# during the window (the replay freezes it; set before looking at any run's accuracy); or an estimate diverged.
FLAG_SKILL, FLAG_DRIFT = 0.5, 0.10
INDICATORS = ("error_indicator_ppl", "knot_disagreement", "precond_drift")


def ablations(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, projection_dir: Path, gt_dir: Path,
              estimates_file: Path, sweeps_dir: Path) -> dict:
    e = params.estimate
    dev = protocol.dev_truth(gt_dir)
    named = protocol.scored({n: r["order"] for n, r in dev.items()})
    names, orders = list(named), list(named.values())
    true_loss = np.array([dev[n]["eval_loss"] for n in names])
    strata = [FAMILIES.index(family(n)) for n in names]
    run = ReferenceRun(params, data_dir, ref_dir)
    ctx = EstimationContext(run, cache_dir, projection_dir)

    def scored(loss: torch.Tensor, seconds: float) -> dict:
        rnd = [i for i, n in enumerate(names) if family(n) == "random"]
        acc = accuracy(loss.double().numpy(), true_loss, ctx.naive_loss, e.bootstrap, 0, strata)
        acc_r = accuracy(loss.double().numpy()[rnd], true_loss[rnd], ctx.naive_loss, e.bootstrap, 0)
        return {"all": {k: acc[k] for k in SUMMARY}, "random": {k: acc_r[k] for k in SUMMARY},
                "seconds_per_order": seconds / len(orders)}

    table = {"orders": "dev", "n_orders": len(orders)}
    projected = [m for m in ("tracin", "fut:projected") if m in e.methods]
    ks = sorted({k for k in K_VALUES if k <= params.projection.k} | {params.projection.k})
    table["projection_k"] = {m: {str(k): scored(*_loss(estimators.estimate(ctx, orders, m, k=k))) for k in ks}
                             for m in projected}

    # The estimate stage scored every configured method on the dev orders: its block, not recomputed; seconds per
    # order as it measured them (on the test orders).
    scores = read_json(estimates_file)
    dev_block = scores["dev"]["families"]
    table["methods"] = {m: {fam: {k: block[m][k] for k in SUMMARY} for fam, block in dev_block.items() if m in block}
                        for m in e.methods}

    if "fut-subspace" in e.methods:
        table["subspace_readout"] = {
            readout: {fam: table["methods"][m][fam] for fam in ("all", "random") if fam in table["methods"][m]}
            | {"seconds_per_order": scores["methods"][m]["seconds_per_order"]}
            for readout, m in (("quadratic", "fut-subspace"), ("exact", "fut-subspace:exact")) if m in e.methods}
        table["subspace_pair_stride"] = {}
        for stride in (run.T // 2,):
            if stride < 1 or stride % params.cache.checkpoint_stride:
                continue
            src = ctx.cache.subspace_sources(stride)
            sub = build_subspace(src, None, ctx.naive_loss, 0, 0)
            S = sub.replay(torch.tensor(orders))
            delta = estimators.subspace_delta(S, src.rows, src.precond, src.dim, src.chunk)
            loss = torch.tensor([ctx.eval_loss(ctx.theta_T + d.to(ctx.device)) for d in delta])
            table["subspace_pair_stride"][str(stride)] = {**scored(loss, 0.0), "pair_checkpoints": src.pair_checkpoints}

    if params.cache.checkpoint_stride == 1:       # the paper's literal secant reads pairs at every checkpoint
        table["secant_raw"] = estimators.secant_raw_gain(ctx)

    sweep, stale = collect(params, sweeps_dir)
    table["error_proxy"] = error_proxy(scores, sweeps_dir, stale)
    if stale:
        log.warning("sweep points computed with other params, left out (rerun: python -m fut sweep --only %s)",
                    " ".join(stale))
    table["sweep_stale_points"] = stale
    for knob, entry in sweep.items():
        table[knob] = {"param": entry["param"], "values": {value: _sweep_row(r) for value, r in entry["values"].items()}}
    return table


def _loss(est) -> tuple[torch.Tensor, float]:
    return est.eval_loss, est.seconds


def _sweep_row(r: dict) -> dict:
    keep = ("window_steps", "batch_size", "lr", "warmstart", "orders_scored", "true_ppl_std", "random_ppl_std",
            "retrain_seconds_per_order", "cache_seconds", "eval_ppl_end")
    return {**{k: r.get(k) for k in keep}, "methods": r["methods"]}


def flagged(trust: list[dict], naive_ppl: float, scale: float) -> dict:
    """A run's verdict from fut-subspace's own indicators (FLAG_* above) and the values it is based on: the skill
    score 1 − Σ err² / Σ effect² with err = scale × indicator and the effect as estimated. A run with a diverged
    estimate is flagged whatever its other orders say."""
    finite = [t for t in trust if t["est_ppl"] is not None and t["error_indicator_ppl"] is not None]
    effect = sum((t["est_ppl"] - naive_ppl) ** 2 for t in finite) or 1e-30
    predicted = 1 - scale ** 2 * sum(t["error_indicator_ppl"] ** 2 for t in finite) / effect
    drift = float(np.median([t["precond_drift"] for t in trust])) if trust else 0.0
    diverged = len(trust) - len(finite)
    return {"predicted_r2": predicted, "precond_drift": drift, "diverged": diverged,
            "knot_disagreement": float(np.median([t["knot_disagreement"] for t in trust])) if trust else 0.0,
            "flagged": predicted < FLAG_SKILL or drift > FLAG_DRIFT or diverged > 0}


def error_proxy(estimates: dict, sweeps_dir: Path, stale: list[str]) -> dict:
    """fut-subspace's error indicators against its true absolute error, over the default run's test orders and every
    current sweep point's orders together (Spearman per indicator), and per sweep point: flagged by the indicators,
    and failing (R² of the order effect below 0.5 on the point's orders)."""
    block = estimates.get("error_indicator") or {}
    pairs = [dict(p, run="default") for p in block.get("test_pairs", [])]
    scale = block.get("scale", 1.0)
    points = {}
    for path in sorted(Path(sweeps_dir).glob("*.json")):
        r = read_json(path)
        trust = r.get("trust") or []
        if not trust or r["point"] in stale:
            continue
        pairs += [dict(p, run=r["point"]) for p in trust]
        r2 = r["methods"][r["default_method"]]["families"]["all"]["r2_order_effect"]
        points[r["point"]] = {**flagged(trust, float(np.exp(r["naive_eval_loss"])), scale), "r2_order_effect": r2,
                              "failing": r2 is None or r2 < 0.5}
    pairs = [p for p in pairs if p["abs_error_ppl"] is not None]     # a diverged estimate has no error to rank
    err = [p["abs_error_ppl"] for p in pairs]
    default = flagged(block.get("test_pairs", []), float(np.exp(estimates["naive_eval_loss"])), scale)
    return {"method": block.get("method"), "scale": scale, "n_orders": len(pairs), "n_runs": 1 + len(points),
            "default_run": default,
            "spearman_with_true_error": {k: rank_correlation([p[k] for p in pairs], err) for k in INDICATORS},
            "test_only": (block.get("spearman") or {}).get("test"),
            "points": points, "flagged": sorted(p for p, v in points.items() if v["flagged"]),
            "failing": sorted(p for p, v in points.items() if v["failing"])}
