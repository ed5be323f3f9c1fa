"""Curriculum design (DESIGN §8): heuristic order proposals, and searches over orders with an estimator as
the fitness, the chosen orders verified by retraining.

Proposals: random permutations, the reference (identity) and reversed orders, easy→hard / hard→easy by each
batch's reference loss, domain schedules (domains as blocks, easiest or hardest domain first) and
interleavings (domains round-robin, each domain's batches easy→hard or hard→easy).

Searches, both seeded with the proposals' estimates and given the same number of estimator calls:
- `genetic`, the paper's choice: a generational GA over permutations (elitism, tournament selection, order
  crossover, swap mutation);
- `assignment`, a model-based search: the additive position model of fut/surrogate.py, loss ≈ c + Σ_t W[σ(t), t],
  refitted to every order it has scored, proposes its exact minimiser (a linear assignment problem) and
  minimisers of noisy copies of W.
Each generation of every search is estimated in one batched call, so the cache is read once per generation.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from . import surrogate
from .applications import estimated_readouts, truth_for
from .config import Params
from .costs import fair_retrain_seconds, measured
from .estimators import EstimationContext
from .groundtruth import Oracle
from .methods import METHODS
from .evaluation import ppl_or_none
from .orders import by_difficulty, domain_groups, round_robin
from .protocol import dev_truth
from .reference import ReferenceRun
from .stats import accuracy, mean_ci
from .storage import read_json

log = logging.getLogger(__name__)

TOURNAMENT = 3     # parents compete in threes: mild selection pressure for populations of a few dozen
MAX_TRIES = 1000   # proposals tried per generation before a search settles for fewer new orders


def proposals(window_domains: Sequence[int], batch_losses: Sequence[float]) -> dict[str, list[int]]:
    """The heuristic curricula (one order each); random orders come from the ground truth."""
    T = len(window_domains)
    out = {"identity": list(range(T)), "reversed": list(reversed(range(T))),
           "easy_to_hard": by_difficulty(batch_losses, hardest_last=True),
           "hard_to_easy": by_difficulty(batch_losses, hardest_last=False)}
    groups = domain_groups(window_domains)
    if len(groups) > 1:      # a window of mixed batches has no domain schedule
        difficulty = {d: float(np.mean([batch_losses[j] for j in js])) for d, js in groups.items()}
        easy_first = sorted(groups, key=lambda d: (difficulty[d], d))
        out["domains_easy_to_hard"] = [j for d in easy_first for j in groups[d]]
        out["domains_hard_to_easy"] = [j for d in reversed(easy_first) for j in groups[d]]
        for name, hardest_last in (("interleaved_easy_to_hard", True), ("interleaved_hard_to_easy", False)):
            queues = [sorted(js, key=lambda j: (batch_losses[j], j), reverse=not hardest_last)
                      for _, js in sorted(groups.items())]
            out[name] = round_robin(queues)
    return out


def _key(score: float) -> float:
    """Sort key of an estimate: a diverged one (inf/NaN) ranks last."""
    return score if np.isfinite(score) else np.inf


def order_crossover(a: Sequence[int], b: Sequence[int], rng: random.Random) -> list[int]:
    """A slice of parent a kept in place; the other positions take the remaining batches in b's order."""
    T = len(a)
    i, j = sorted(rng.sample(range(T + 1), 2))
    kept = set(a[i:j])
    rest = iter(x for x in b if x not in kept)
    return [a[p] if i <= p < j else next(rest) for p in range(T)]


def swap(order: Sequence[int], rng: random.Random) -> list[int]:
    order = list(order)
    i, j = rng.sample(range(len(order)), 2)
    order[i], order[j] = order[j], order[i]
    return order


class Genetic:
    """Generational GA: the `elite` best survive, the rest of the population are children of tournament-
    selected parents (order crossover, then a swap with probability `mutation`). A child already scored by
    this search is mutated again, so every call proposes new orders."""
    name = "genetic"

    def __init__(self, scored: dict[tuple, float], size: int, elite: int, mutation: float, seed: int):
        self.size, self.elite, self.mutation = size, elite, mutation
        self.rng = random.Random(seed)
        self.seen = set(scored)
        self.population = sorted(scored.items(), key=lambda x: _key(x[1]))[:size]

    def _parent(self) -> tuple:
        contenders = self.rng.sample(self.population, min(TOURNAMENT, len(self.population)))
        return min(contenders, key=lambda x: _key(x[1]))[0]

    def ask(self) -> list[list[int]]:
        children: list[list[int]] = []
        for _ in range(MAX_TRIES):          # bounded: a short window has few permutations left to try
            if len(children) == self.size - self.elite:
                break
            child = order_crossover(self._parent(), self._parent(), self.rng)
            if self.rng.random() < self.mutation or tuple(child) in self.seen:
                child = swap(child, self.rng)
            if tuple(child) not in self.seen:
                self.seen.add(tuple(child))
                children.append(child)
        return children

    def tell(self, orders: list[list[int]], scores: Sequence[float]) -> None:
        survivors = self.population[: self.elite] + [(tuple(o), s) for o, s in zip(orders, scores)]
        self.population = sorted(survivors, key=lambda x: _key(x[1]))


class Assignment:
    """Model-based search: the minimiser of the fitted position model, then minimisers of W plus Gaussian noise
    of growing scale (relative to W's spread) until the call has its quota of new orders."""
    name = "assignment"

    def __init__(self, scored: dict[tuple, float], size: int, elite: int, seed: int):
        self.quota = size - elite          # the GA's children per generation: the same budget
        self.rng = np.random.default_rng(seed)
        self.scored = dict(scored)

    def ask(self) -> list[list[int]]:
        model = surrogate.fit(list(self.scored), list(self.scored.values()))
        spread = model.W.std() or 1.0
        out, level = [], 0.0
        for _ in range(MAX_TRIES):
            if len(out) == self.quota:
                break
            order = model.minimiser(level * spread * self.rng.standard_normal(model.W.shape))
            if tuple(order) not in self.scored and order not in out:
                out.append(order)
            level += 0.25
        return out

    def tell(self, orders: list[list[int]], scores: Sequence[float]) -> None:
        self.scored.update((tuple(o), s) for o, s in zip(orders, scores))


def run_searches(score, seeds: dict[tuple, float], names: Sequence[str], population: int, generations: int,
                 elite: int, mutation: float, seed: int, progress: bool = True) -> list[dict]:
    """Advance every search one generation at a time, estimating all their new orders in one call per
    generation; returns one row per (search, scored order), the seeds as generation 0 of each search."""
    searches = [Genetic(seeds, population, elite, mutation, seed) if n == "genetic"
                else Assignment(seeds, population, elite, seed) for n in names]
    memo = dict(seeds)
    rows = [{"search": s.name, "generation": 0, "order": list(o), "est_loss": x} for s in searches
            for o, x in seeds.items()]
    for g in tqdm(range(1, generations + 1), desc="search", disable=not progress):
        asks = {s.name: s.ask() for s in searches}
        new = list(dict.fromkeys(tuple(o) for orders in asks.values() for o in orders if tuple(o) not in memo))
        if new:
            memo.update(zip(new, score([list(o) for o in new])))
        for s in searches:
            scores = [memo[tuple(o)] for o in asks[s.name]]
            s.tell(asks[s.name], scores)
            rows += [{"search": s.name, "generation": g, "order": o, "est_loss": x}
                     for o, x in zip(asks[s.name], scores)]
    return rows


def top_orders(rows: list[dict], search: str, k: int) -> list[tuple[list[int], float]]:
    """The k distinct orders this search scored best (seeds included), best first."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r["search"] == search:
            best[tuple(r["order"])] = r["est_loss"]
    ranked = sorted(best.items(), key=lambda x: _key(x[1]))[:k]
    return [(list(o), x) for o, x in ranked]


def curriculum(params: Params, data_dir: Path, ref_dir: Path, cache_dir: Path, gt_dir: Path,
               out_dir: Path) -> tuple[dict, dict]:
    """Proposals estimated, searched from, the best candidates retrained; the strategy table and costs."""
    c, method = params.curriculum, params.estimate.default
    n_boot = params.estimate.bootstrap
    truth_gt = dev_truth(gt_dir)
    run = ReferenceRun(params, data_dir, ref_dir)
    ctx = EstimationContext(run, cache_dir)
    heuristics = proposals(ctx.prepared.window_domains, read_json(Path(ref_dir) / "summary.json")["batch_losses_start"])
    randoms = {n: r["order"] for n, r in truth_gt.items() if n.startswith("random-")}
    seeds = {**randoms, **heuristics}

    def score(orders):
        return estimated_readouts(ctx, orders, method)["eval_loss"]

    with measured() as estimation:
        est_of = dict(zip((tuple(o) for o in seeds.values()), score(list(seeds.values()))))
    with measured() as searching:
        rows = run_searches(score, dict(est_of), c.searches, c.population, c.generations, c.elite, c.mutation,
                            c.seed)
    est_of.update((tuple(r["order"]), r["est_loss"]) for r in rows)
    n_searched = len({tuple(r["order"]) for r in rows if r["generation"] > 0})

    # Finalists: each search's best `finalists` by the fast readout, ranked again by evaluating their estimated
    # parameters (the exact readout) when the method has one; the best `verify_top` of each are retrained.
    exact = f"{method}:exact" if f"{method}:exact" in METHODS else method
    with measured() as ranking:
        finalists = {s: [o for o, _ in top_orders(rows, s, c.finalists)] for s in c.searches}
        pool = list(dict.fromkeys(tuple(o) for f in finalists.values() for o in f))
        exact_of = dict(zip(pool, estimated_readouts(ctx, [list(o) for o in pool], exact)["eval_loss"]))
    candidates = {f"{s}-{rank}": list(order) for s in c.searches
                  for rank, order in enumerate(sorted(map(tuple, finalists[s]), key=lambda o: _key(exact_of[o]))
                                               [: c.verify_top])}
    est_of.update(exact_of)
    named = {**seeds, **candidates}
    with measured() as verifying:
        truth, retrained = truth_for(params, named, truth_gt, data_dir, ref_dir, Path(out_dir) / "orders", "verify")
    worker_peak = max([truth[n]["peak_mb"] for n in retrained], default=None)
    fresh = [truth[n] for n in retrained]
    # A retrain as a user gets it (the window and the final eval loss), timed in this process like the search.
    retrain_s = fair_retrain_seconds(Oracle(run).eval_loss, list(randoms.values())[:3] or list(heuristics.values())[:3],
                                     run.device)["median"]

    # Strategies: the random family, every heuristic, each search's best, and the search's choice overall.
    families = {"random": list(randoms), **{n: [n] for n in heuristics}, **{s: [f"{s}-0"] for s in c.searches}}
    if not randoms:          # groundtruth.n_random = 0: no random baseline to compare with
        del families["random"]
    chosen = min(c.searches, key=lambda s: _key(est_of[tuple(candidates[f"{s}-0"])]))
    families["estimator_search"] = [f"{chosen}-0"]
    strategies = {}
    for name, members in families.items():
        true_ppls = [truth[m]["eval_ppl"] for m in members]
        est_ppls = [ppl_or_none(est_of[tuple(named[m])]) for m in members]
        lo, hi = mean_ci(true_ppls, n_boot, c.seed)
        searched = name in c.searches or name == "estimator_search"
        # A searched order cost the proposals' estimates and the search; a heuristic costs nothing to choose.
        choose = (estimation.seconds + searching.seconds + ranking.seconds) if searched else 0.0
        verify = sum(truth[m]["seconds"] for m in members)
        peaks = [worker_peak] + ([estimation.peak_mb, searching.peak_mb, ranking.peak_mb] if searched else [])
        strategies[name] = {
            "true_ppl": float(np.mean(true_ppls)), "ci_low": lo, "ci_high": hi,
            "est_ppl": None if None in est_ppls else float(np.mean(est_ppls)),
            "n_orders": len(members), "seconds": choose + verify, "choose_seconds": choose, "verify_seconds": verify,
            "peak_mb": max([p for p in peaks if p is not None], default=None),
            "retrained_here": any(m in retrained for m in members),
            "order": named[members[0]] if len(members) == 1 else None,
        }
    strategies["estimator_search"]["search"] = chosen

    # How far the chosen order beats the mean random order, resampling the random orders.
    chosen_ppl = strategies["estimator_search"]["true_ppl"]
    gain, gain_ci = None, None
    if randoms:
        random_ppl = [truth[m]["eval_ppl"] for m in randoms]
        lo, hi = mean_ci(random_ppl, n_boot, c.seed)
        gain, gain_ci = float(np.mean(random_ppl)) - chosen_ppl, [lo - chosen_ppl, hi - chosen_ppl]

    # Rank agreement over every distinct verified order (a candidate may be a proposal again).
    verified = {}
    for n, o in named.items():
        verified.setdefault(tuple(o), n)
    kind = lambda n: "search" if n in candidates else ("random" if n in randoms else "proposal")
    table = [{"name": n, "kind": kind(n), "order": list(o), "est_loss": float(est_of[o]),
              "true_loss": truth[n]["eval_loss"]} for o, n in verified.items()]
    agreement = accuracy(np.array([r["est_loss"] for r in table]), np.array([r["true_loss"] for r in table]),
                         ctx.naive_loss, n_boot, c.seed)
    found = [r for r in table if r["kind"] == "search"]
    cand_agreement = accuracy(np.array([r["est_loss"] for r in found]), np.array([r["true_loss"] for r in found]),
                              ctx.naive_loss, n_boot, c.seed) if len(found) >= 2 else {}
    metrics = {
        "method": method, **strategies,
        "rank_agreement": {k: agreement[k] for k in ("spearman", "spearman_ci", "kendall", "kendall_ci",
                                                     "r2_order_effect", "n", "n_non_finite")},
        "rank_agreement_search_candidates": {k: cand_agreement.get(k) for k in ("spearman", "kendall", "n")},
        "gain_vs_random_ppl": gain, "gain_vs_random_ci": gain_ci,
        "costs": {
            "estimation": {**estimation.as_dict(), "n_orders": len(seeds),
                           "seconds_per_order": estimation.seconds / len(seeds)},
            "search": {**searching.as_dict(), "n_orders": n_searched, "generations": c.generations,
                       "seconds_per_order": searching.seconds / max(n_searched, 1)},
            "finalists": {**ranking.as_dict(), "n_orders": len(pool), "method": exact},
            "verification": {**verifying.as_dict(), "worker_peak_mb": worker_peak, "n_retrained": len(retrained),
                             "workers": params.parallel.workers,
                             "retrain_seconds_per_order": np.mean([r["seconds"] for r in fresh]) if fresh else None},
            "fair_retrain_seconds": retrain_s,
            # Exploring and ranking finalists against retraining every order scored, in wall seconds of this
            # process (a fair retrain: the window and the final eval loss).
            "search_vs_retraining_all": (searching.seconds + ranking.seconds) / (max(n_searched, 1) * retrain_s),
        },
    }
    log.info("curriculum: %s chose an order of true PPL %.2f, %s PPL better than the mean random order", chosen,
             chosen_ppl, gain)
    return {"rows": rows, "verified": table}, metrics
