"""Memorization and generalization (DESIGN §8): what placing one batch earlier or later does to the loss on
that batch, and on held-out text similar or dissimilar to it.

M[i, j] is the loss on window batch B_i at the end of the window when B_i is trained at position j and the
other batches keep the relative order of a fixed base order. The grid is a subset of batches (spread over the
domains) × positions (spread over the window, both ends included). The default estimator fills the whole
grid; retraining, and the paper's estimators judged against it, take the grid's batches at a few of its
positions (both ends included), so every batch has a true placement effect.

Generalization: at the same cells, the loss on held-out (eval) text of B_i's domain versus the other domains,
and on the eval sequences most versus least similar to B_i's text. Similarity is the cosine of TF-IDF vectors
of BPE token counts: a model-free measure of shared vocabulary (a step on B_i raises the probability of B_i's
tokens and contexts, so text using the same tokens should feel it most), with IDF discounting the tokens every
text uses (spaces, punctuation, end of text). The placement effect of a readout is its value with B_i last
minus with B_i first: negative when seeing B_i late helps that text.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .applications import APPLICATION_READOUTS, estimated_readouts
from .config import ConfigError, Params
from .costs import measured
from .data import Prepared
from .estimators import EstimationContext
from .evaluation import finite_or_none
from .groundtruth import retrain_all
from .orders import domain_groups
from .protocol import dev_truth
from .reference import ReferenceRun
from .stats import mean_ci, rank_correlation

GROUPS = ("batch", "similar", "same_domain", "other_domains", "dissimilar")


def spread(n_total: int, n: int | None) -> list[int]:
    """`n` of 0..n_total-1 evenly spaced with both ends (all of them for None)."""
    if n is None or n >= n_total:
        return list(range(n_total))
    return sorted({int(round(x)) for x in np.linspace(0, n_total - 1, n)})


def pick_batches(window_domains: Sequence[int], n: int | None) -> list[int]:
    """`n` window batches spread as evenly as possible over the domains, and within each domain over its
    batches (all of them for None)."""
    T = len(window_domains)
    if n is None or n >= T:
        return list(range(T))
    groups = list(domain_groups(window_domains).values())
    counts = [n // len(groups) + (g < n % len(groups)) for g in range(len(groups))]
    picked = []
    for members, c in zip(groups, counts):
        c = min(c, len(members))
        picked += [members[int((k + 0.5) * len(members) / c)] for k in range(c)]
    return sorted(picked)


def placement_order(base: Sequence[int], i: int, j: int) -> list[int]:
    """B_i at position j; the other batches in the relative order of `base`."""
    others = [x for x in base if x != i]
    return others[:j] + [i] + others[j:]


def tfidf_similarity(batches: torch.Tensor, seqs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cosine similarity [n, N] of the TF-IDF token-count vectors of each batch (its sequences pooled) and
    each sequence; document frequencies over all of them."""
    docs = [b.reshape(-1) for b in batches] + list(seqs)
    counts = torch.zeros(len(docs), vocab_size)
    for k, doc in enumerate(docs):
        counts[k].index_add_(0, doc, torch.ones(len(doc)))
    df = (counts > 0).sum(0)
    x = counts * (torch.log((1 + len(docs)) / (1 + df)) + 1)
    x = x / x.norm(dim=1, keepdim=True)
    return x[: len(batches)] @ x[len(batches):].t()


def readout_sets(prepared: Prepared, batches: Sequence[int],
                 similar_fraction: float) -> dict[int, dict[str, torch.Tensor]]:
    """For each batch i, the indices into the mixed eval set of each generalization group (domain groups only
    for domain-pure batches)."""
    starts, s = {}, 0
    for d in prepared.domains:
        starts[d] = (s, s + len(prepared.eval_sets[d]))
        s += len(prepared.eval_sets[d])
    N = s
    sim = tfidf_similarity(prepared.window[list(batches)], prepared.eval_mixed, prepared.vocab_size)
    k = max(1, math.ceil(similar_fraction * N))
    out = {}
    for row, i in enumerate(batches):
        ranked = sim[row].argsort(descending=True)
        sets = {"similar": ranked[:k].sort().values, "dissimilar": ranked[-k:].sort().values}
        d = prepared.window_domains[i]
        if d >= 0:
            lo, hi = starts[prepared.domains[d]]
            sets["same_domain"] = torch.arange(lo, hi)
            sets["other_domains"] = torch.cat([torch.arange(0, lo), torch.arange(hi, N)])
        out[i] = sets
    return out


def compare(est: np.ndarray, true: np.ndarray) -> dict:
    """MSE, mean absolute error and Spearman of paired estimates and truths; null where an estimate diverged."""
    est, true = np.asarray(est, dtype=float), np.asarray(true, dtype=float)
    n_bad = int(np.sum(~np.isfinite(est)))
    if n_bad:
        return {"mse": None, "mae": None, "spearman": None, "n": int(len(true)), "n_non_finite": n_bad}
    return {"mse": float(np.mean((est - true) ** 2)), "mae": float(np.mean(np.abs(est - true))),
            "spearman": rank_correlation(est, true), "n": int(len(true)), "n_non_finite": 0}


def memorization(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, gt_dir: Path,
                 out_dir: Path) -> tuple[dict, dict]:
    """Estimated and true memorization grids, and the generalization placement effects."""
    mc, default = params.memorization, params.estimate.default
    truth_gt = dev_truth(gt_dir)
    if mc.base_order not in truth_gt:
        raise ConfigError(f"params: memorization.base_order = {mc.base_order!r} is not a ground-truth order; "
                         f"expected one of {', '.join(sorted(truth_gt))}")
    base = truth_gt[mc.base_order]["order"]
    ctx = EstimationContext(ReferenceRun(params, data_dir, ref_dir), cache_dir)
    prepared, T = ctx.prepared, params.window.steps
    batches = pick_batches(prepared.window_domains, mc.batches)
    positions = spread(T, mc.positions)
    true_positions = [positions[k] for k in spread(len(positions), mc.true_positions)]
    grid = [(i, j) for i in batches for j in positions]
    true_cells = [(i, j) for i in batches for j in true_positions]
    sets = readout_sets(prepared, batches, mc.similar_fraction)
    eval_mixed = prepared.eval_mixed

    def estimate_cells(method: str, cells: list[tuple[int, int]]) -> tuple[dict, dict]:
        """Readouts {(i, j): {group: loss}} (diverged ones left out) and the cost."""
        # The other domains' loss follows from the mixed eval loss and the own domain's (sequences of equal
        # length: the mixed loss is their size-weighted mean), which saves the largest forward pass.
        per_order = {k: {"batch": prepared.window[i],
                         **{g: eval_mixed[idx] for g, idx in sets[i].items() if g != "other_domains"}}
                     for k, (i, _) in enumerate(cells)}
        with measured() as cost:
            out = estimated_readouts(ctx, [placement_order(base, i, j) for i, j in cells], method, per_order=per_order)
            if "same_domain" in out:
                N, own = len(eval_mixed), np.array([len(sets[i]["same_domain"]) for i, _ in cells])
                out["other_domains"] = (N * out["eval_loss"] - own * out["same_domain"]) / (N - own)
        readouts = {cell: {g: float(out[g][k]) for g in GROUPS if g in out and np.isfinite(out[g][k])}
                    for k, cell in enumerate(cells)}
        return readouts, {**cost.as_dict(), "n_orders": len(cells), "seconds_per_order": cost.seconds / len(cells)}

    # The default fills the grid; the paper's methods are judged where the truth is.
    estimates, costs = {}, {}
    for method in dict.fromkeys([default, *mc.methods]):
        estimates[method], costs[method] = estimate_cells(method, grid if method == default else true_cells)
    # `naive`: order does not matter, every position reads the reference θ_T
    estimates["naive"] = {(i, j): {"batch": ctx.loss_on(ctx.theta_T, prepared.window[i])} for i, j in true_cells}

    name = lambda i, j: f"b{i:03d}-p{j:03d}"
    with measured() as truth_cost:
        results = retrain_all(params, {name(i, j): placement_order(base, i, j) for i, j in true_cells}, data_dir,
                              ref_dir, Path(out_dir) / "orders", APPLICATION_READOUTS, 0, "memorization")
    truth = {}
    for i, j in true_cells:
        r = results[name(i, j)]
        seq = torch.tensor(r["eval_sequence_losses"])
        truth[(i, j)] = {"batch": r["batch_losses"][i], **{g: float(seq[idx].mean()) for g, idx in sets[i].items()}}

    rows = np.array([i for i, _ in true_cells])
    centre = lambda x: x - np.array([x[rows == r].mean() for r in rows])
    true_m = np.array([truth[c]["batch"] for c in true_cells])

    def effects(readouts: dict) -> dict[tuple[int, str], float]:
        """Per batch and group: the readout with B_i last minus with B_i first (NaN where diverged)."""
        first, last = true_positions[0], true_positions[-1]
        return {(i, g): readouts[(i, last)].get(g, np.nan) - readouts[(i, first)].get(g, np.nan)
                for i in batches for g in GROUPS if g in truth[(i, first)]}

    true_effects = effects(truth)
    held_out = [k for k in true_effects if k[1] != "batch"]      # generalization: held-out text only
    scores, general, effect_rows = {}, {}, []
    for method, readouts in estimates.items():
        est_m = np.array([readouts[c].get("batch", np.nan) for c in true_cells])
        scores[method] = compare(est_m, true_m)
        # Centred within each batch over its positions: the placement effect alone, without the batch's
        # difficulty (which even `naive`, blind to order, ranks perfectly).
        scores[method]["spearman_placement"] = (rank_correlation(centre(est_m), centre(true_m))
                                                if scores[method]["n_non_finite"] == 0 else None)
        scores[method]["cost"] = costs.get(method)
        if method == "naive":
            continue
        est_effects = effects(readouts)
        general[method] = {
            **compare(np.array([est_effects[k] for k in held_out]), np.array([true_effects[k] for k in held_out])),
            "mean_effect": {g: finite_or_none(np.mean([est_effects[(i, gg)] for i, gg in true_effects if gg == g]))
                            for g in GROUPS if any(gg == g for _, gg in true_effects)}}
        effect_rows += [{"source": method, "batch": i, "group": g, "effect": finite_or_none(v)}
                        for (i, g), v in est_effects.items()]
    effect_rows += [{"source": "truth", "batch": i, "group": g, "effect": v} for (i, g), v in true_effects.items()]
    true_mean = {}
    for g in GROUPS:
        vals = [v for (_, gg), v in true_effects.items() if gg == g]
        if vals:
            ci = mean_ci(vals, params.estimate.bootstrap, 0)
            true_mean[g] = {"mean": float(np.mean(vals)), "ci": list(ci)}

    mean_of = lambda key: float(np.mean([r.get(key, r["seconds"]) for r in results.values()]))
    metrics = {
        "default_method": default, "base_order": mc.base_order,
        "grid": {"batches": batches, "positions": positions, "true_positions": true_positions,
                 "cells": len(grid), "true_cells": len(true_cells)},
        "estimators": scores,
        "generalization": {"estimators": general, "true_mean_effect": true_mean, "groups": list(true_mean),
                           "similar_fraction": mc.similar_fraction},
        "costs": {"truth": {**truth_cost.as_dict(), "n_orders": len(true_cells),
                            "worker_peak_mb": max(r["peak_mb"] for r in results.values()),
                            "retrain_seconds_per_order": mean_of("seconds"),
                            "retrain_cpu_seconds_per_order": mean_of("cpu_seconds")}},
    }
    domain = lambda i: prepared.domains[prepared.window_domains[i]] if prepared.window_domains[i] >= 0 else "mixed"
    cells = [{"source": source, "batch": i, "domain": domain(i), "position": j, "loss": r.get("batch")}
             for source, readouts in {"truth": truth, **estimates}.items() for (i, j), r in readouts.items()]
    return {"cells": cells, "effects": effect_rows}, metrics
