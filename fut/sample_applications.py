"""The applications over sample-level orders (DESIGN §8): which sequences to batch together and in which order
(heuristic curricula and a search with fut-subspace as the fitness, verified by retraining), and memorization of
one sequence by the step it is trained at (estimated with the exact readout on that sequence, against
retraining)."""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import Params
from .evaluation import ppl
from .groundtruth import retrain_all
from .schedules import as_units, sequence_batches
from .sequence_cache import SequenceCache
from .stats import rank_correlation
from .subspace import Subspace

log = logging.getLogger(__name__)


def _chunks(seqs: Sequence[int], size: int) -> list[list[int]]:
    return [list(seqs[k: k + size]) for k in range(0, len(seqs), size)]


def proposals(steps: int, batch_size: int, window_domains: Sequence[int],
              losses: Sequence[float]) -> dict[str, list[list[int]]]:
    """Heuristic sample-level curricula. Across batches: the batches' order by difficulty; within: what a batch
    holds (sequences of similar difficulty, or one of every difficulty stratum; one domain, or all of them)."""
    n = steps * batch_size
    ranked = sorted(range(n), key=lambda i: (losses[i], i))
    strata = [[ranked[k + steps * s] for s in range(batch_size)] for k in range(steps)]   # batch k: ranks k, k+T..
    out = {"reference": sequence_batches(steps, batch_size),
           "similar_easy_to_hard": _chunks(ranked, batch_size),
           "similar_hard_to_easy": _chunks(ranked[::-1], batch_size),
           "stratified": strata}
    domain_of = [window_domains[i // batch_size] for i in range(n)]
    if min(window_domains) >= 0 and len(set(window_domains)) > 1:
        by_domain = {d: sorted((i for i in range(n) if domain_of[i] == d), key=lambda i: (losses[i], i))
                     for d in sorted(set(domain_of))}
        flat, queues = [], [list(q) for q in by_domain.values()]
        while any(queues):
            for q in queues:
                if q:
                    flat.append(q.pop(0))
        out["mixed_domains_easy_to_hard"] = _chunks(flat, batch_size)
        easy_first = sorted(by_domain, key=lambda d: np.mean([losses[i] for i in by_domain[d]]))
        out["domain_blocks_easy_to_hard"] = _chunks([i for d in easy_first for i in by_domain[d]], batch_size)
    return out


def mutate(order: list[list[int]], rng: random.Random) -> list[list[int]]:
    """Swap two sequences between two batches (what a batch holds) or swap two batches (when it is trained)."""
    new = [list(b) for b in order]
    a, c = rng.sample(range(len(new)), 2)
    if rng.random() < 0.5:
        i, j = rng.randrange(len(new[a])), rng.randrange(len(new[c]))
        new[a][i], new[c][j] = new[c][j], new[a][i]
    else:
        new[a], new[c] = new[c], new[a]
    return new


def search(score, seeds: dict[str, list[list[int]]], population: int, generations: int, elite: int,
           seed: int) -> tuple[list[list[int]], list[float]]:
    """A (μ + λ) evolutionary search: each generation mutates the `elite` best orders so far into `population`
    new ones (one to four mutations each), scored in one batched call. Returns the best order and the best
    estimate after each generation."""
    rng = random.Random(seed)
    pool = dict(zip((_key(o) for o in seeds.values()), score(list(seeds.values()))))
    best_curve = [min(pool.values())]
    for _ in range(generations):
        parents = sorted(pool, key=pool.get)[:elite]
        children = []
        for k in range(population):
            child = [list(b) for b in parents[k % len(parents)]]
            for _ in range(rng.randint(1, 4)):
                child = mutate(child, rng)
            if _key(child) not in pool:
                children.append(child)
        if children:
            pool.update(zip((_key(o) for o in children), score(children)))
        best_curve.append(min(pool.values()))
    best = min(pool, key=pool.get)
    return [list(b) for b in best], best_curve


def _key(order: Sequence[Sequence[int]]) -> tuple:
    """Orders that differ only within a batch train the same: one key (each batch's sequences sorted)."""
    return tuple(tuple(sorted(b)) for b in order)


def curriculum(params: Params, sub: Subspace, naive_loss: float, steps: int, batch_size: int,
               window_domains: Sequence[int], losses: Sequence[float], random_truth: Sequence[float],
               data_dir: Path, ref_dir: Path, out_dir: Path) -> dict:
    """The proposals and the search's best, estimated and verified by retraining, against the dev random
    re-batchings' true PPL (`random_truth`, eval losses)."""
    c = params.curriculum

    def score(orders: list) -> list[float]:
        return sub.quadratic(sub.replay(as_units(orders)), naive_loss).tolist()

    props = proposals(steps, batch_size, window_domains, losses)
    t0 = time.perf_counter()
    best, curve = search(score, props, c.population, c.generations, c.elite, c.seed)
    seconds = time.perf_counter() - t0
    candidates = {**props, "search_best": best}
    est = dict(zip(candidates, score(list(candidates.values()))))
    truth = retrain_all(params, candidates, data_dir, ref_dir, out_dir, (), 0, "sample-level curriculum")
    rows = {name: {"est_ppl": ppl(est[name]), "true_ppl": ppl(truth[name]["eval_loss"])} for name in candidates}
    random_ppl = [ppl(x) for x in random_truth]
    return {"strategies": rows, "search_seconds": seconds, "estimates_made": c.population * c.generations,
            "search_best_curve_ppl": [ppl(x) for x in curve],
            "random_true_ppl_mean": float(np.mean(random_ppl)), "random_true_ppl_min": float(np.min(random_ppl)),
            "spearman_est_true": rank_correlation([r["est_ppl"] for r in rows.values()],
                                                  [r["true_ppl"] for r in rows.values()])}


def placement(steps: int, batch_size: int, seq: int, step: int) -> list[list[int]]:
    """The reference's batches with sequence `seq` moved into the batch trained at `step` (swapped with the
    sequence in the same slot there)."""
    order = sequence_batches(steps, batch_size)
    home, slot = divmod(seq, batch_size)
    order[home][slot], order[step][slot] = order[step][slot], order[home][slot]
    return order


def memorization(params: Params, sub: Subspace, cache: SequenceCache, data_dir: Path, ref_dir: Path,
                 out_dir: Path) -> dict:
    """For a few window sequences (one per domain where the window has domains), its final loss when trained at
    each of `memorization.positions` steps: fut-subspace with the exact readout on the sequence itself at every
    position, and the truth by retraining at `memorization.true_positions` of them."""
    run, m = cache.run, params.memorization
    T, b = run.T, run.batch_size
    domains = run.prepared.window_domains
    firsts = {}
    for j, d in enumerate(domains):
        firsts.setdefault(d, j * b)
    seqs = list(firsts.values())[:4]
    positions = sorted({round(x) for x in np.linspace(0, T - 1, m.positions or T)})
    verify = sorted({positions[round(x)] for x in np.linspace(0, len(positions) - 1, m.true_positions)})
    orders = {f"seq{i}-step{p}": placement(T, b, i, p) for i in seqs for p in positions}
    S = sub.replay(as_units(list(orders.values())))
    deltas = cache.deltas(S)
    theta_T = run.theta(T)
    flat = run.prepared.window.reshape(T * b, -1)
    est = {name: run.loss_on(theta_T + deltas[k].to(run.device), flat[int(name.split("-")[0][3:])][None])
           for k, name in enumerate(orders)}
    to_verify = {f"seq{i}-step{p}": orders[f"seq{i}-step{p}"] for i in seqs for p in verify}
    truth = retrain_all(params, to_verify, data_dir, ref_dir, out_dir, ("window_sequences",), 0,
                        "sample-level memorization")
    rows = []
    for name in orders:
        i, p = int(name.split("-")[0][3:]), int(name.split("step")[1])
        true = truth[name]["window_sequence_losses"][i] if name in truth else None
        rows.append({"sequence": i, "domain": run.prepared.domains[domains[i // b]] if domains[i // b] >= 0 else None,
                     "step": p, "est_loss": est[name], "true_loss": true})
    have = [r for r in rows if r["true_loss"] is not None]
    effect = lambda key, i: ([r[key] for r in have if r["sequence"] == i][-1]
                             - [r[key] for r in have if r["sequence"] == i][0])
    return {"rows": rows, "positions": positions, "true_positions": verify,
            "spearman": rank_correlation([r["est_loss"] for r in have], [r["true_loss"] for r in have]),
            "mae": float(np.mean([abs(r["est_loss"] - r["true_loss"]) for r in have])),
            "effect_last_minus_first": {str(i): {"est": effect("est_loss", i), "true": effect("true_loss", i)}
                                        for i in seqs}}
