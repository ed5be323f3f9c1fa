"""Batch orders: validation, and the seeded set the ground truth and the estimators are judged on."""
from __future__ import annotations

import itertools
import random
from typing import Sequence


class OrderError(ValueError):
    """An order is not a valid sequence of window batch indices."""


def validate_order(order: Sequence[int], steps: int, permutation: bool = True) -> list[int]:
    """Return `order` as a list of ints, or raise naming what is wrong and what is allowed."""
    order = list(order)
    if len(order) != steps:
        raise OrderError(f"order has {len(order)} entries; window.steps = {steps} requires exactly {steps}")
    for pos, j in enumerate(order):
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < steps:
            raise OrderError(f"order[{pos}] = {j!r} is not a batch index; allowed: integers 0..{steps - 1}")
    if permutation and len(set(order)) != steps:
        seen, dup = set(), None
        for j in order:
            if j in seen:
                dup = j
                break
            seen.add(j)
        raise OrderError(f"order repeats batch {dup}; a permutation of 0..{steps - 1} is required "
                         "(each batch exactly once)")
    return order


def domain_block_orders(window_domains: Sequence[int], n_domains: int, max_orders: int = 24,
                        seed: int = 0) -> dict[str, list[int]]:
    """Orders that train one domain's batches as a block, for every ordering of the domains
    (a seeded sample of `max_orders` orderings when there are more)."""
    perms = list(itertools.permutations(range(n_domains)))
    if len(perms) > max_orders:
        perms = random.Random(seed).sample(perms, max_orders)
    by_domain = {d: [j for j, dj in enumerate(window_domains) if dj == d] for d in range(n_domains)}
    return {"domains-" + "-".join(map(str, p)): [j for d in p for j in by_domain[d]] for p in perms}


def by_difficulty(batch_losses: Sequence[float], hardest_last: bool) -> list[int]:
    """Easy→hard (hardest_last) or hard→easy by the reference model's loss on each batch."""
    return sorted(range(len(batch_losses)), key=lambda j: (batch_losses[j], j), reverse=not hardest_last)


def groundtruth_orders(steps: int, n_random: int, seed: int, structured: Sequence[str],
                       window_domains: Sequence[int], n_domains: int,
                       batch_losses: Sequence[float]) -> dict[str, list[int]]:
    """The named orders whose truth is retrained: identity, seeded random permutations, structured ones."""
    orders = {"identity": list(range(steps))}
    rng = random.Random(seed)
    for i in range(n_random):
        orders[f"random-{i:03d}"] = rng.sample(range(steps), steps)
    if "reversed" in structured:
        orders["reversed"] = list(reversed(range(steps)))
    if "domain_blocks" in structured and min(window_domains) >= 0 and n_domains > 1:
        orders.update(domain_block_orders(window_domains, n_domains, seed=seed))
    if "easy_to_hard" in structured:
        orders["easy_to_hard"] = by_difficulty(batch_losses, hardest_last=True)
    if "hard_to_easy" in structured:
        orders["hard_to_easy"] = by_difficulty(batch_losses, hardest_last=False)
    return orders


def family(name: str) -> str:
    """The family an order's name belongs to: `random`, `domain_blocks` or `structured` (reversed, easy→hard,
    hard→easy, interleavings); `identity` is the reference itself and is never scored."""
    base = name.removeprefix("test-")
    if base == "identity":
        return "identity"
    if base.startswith("random"):
        return "random"
    if base.startswith("domains"):
        return "domain_blocks"
    return "structured"


FAMILIES = ("random", "domain_blocks", "structured")


def test_orders(steps: int, cfg, window_domains: Sequence[int], batch_losses: Sequence[float],
                exclude: Sequence[Sequence[int]]) -> dict[str, list[int]]:
    """The test set (`cfg`: params groundtruth.test): random permutations from its own seed, and structured
    orders the dev set does not hold: domain blocks in a random domain order with each block shuffled, easy→hard
    and hard→easy by reference loss with seeded jitter, and round-robin domain interleavings with a random
    domain rotation and each domain's batches shuffled. No test order equals one of `exclude` (the dev orders) or
    another test order: a draw that does is drawn again."""
    rng = random.Random(cfg.seed)
    seen = {tuple(o) for o in exclude}
    by_domain: dict[int, list[int]] = {}
    for j, d in enumerate(window_domains):
        by_domain.setdefault(d, []).append(j)
    spread = (max(batch_losses) - min(batch_losses)) / len(batch_losses) if len(batch_losses) > 1 else 1.0

    def blocks() -> list[int]:
        order = list(by_domain)
        rng.shuffle(order)
        return [j for d in order for j in rng.sample(by_domain[d], len(by_domain[d]))]

    def jittered(hardest_last: bool) -> list[int]:
        noisy = [x + rng.gauss(0.0, 2 * spread) for x in batch_losses]
        return by_difficulty(noisy, hardest_last)

    def interleaved() -> list[int]:
        order = list(by_domain)
        rng.shuffle(order)
        return round_robin([rng.sample(by_domain[d], len(by_domain[d])) for d in order])

    kinds = [("random", cfg.n_random, lambda: rng.sample(range(steps), steps))]
    if min(window_domains) >= 0 and len(by_domain) > 1:
        kinds += [("domains", cfg.domain_blocks, blocks), ("interleaved", cfg.interleaved, interleaved)]
    kinds += [("easy_to_hard", cfg.difficulty, lambda: jittered(True)),
              ("hard_to_easy", cfg.difficulty, lambda: jittered(False))]
    out = {}
    for kind, n, draw in kinds:
        for i in range(n):
            for _ in range(1000):
                order = draw()
                if tuple(order) not in seen:
                    break
            else:
                raise OrderError(f"groundtruth.test: could not draw a test order of kind {kind!r} that differs from "
                                 f"every dev order and the other test orders (window.steps = {steps} is too short "
                                 f"for {n} of them); lower groundtruth.test.{'n_random' if kind == 'random' else kind}")
            seen.add(tuple(order))
            out[f"test-{kind}-{i:03d}"] = order
    return out


def round_robin(queues: list[list[int]]) -> list[int]:
    queues, out = [list(q) for q in queues], []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def domain_groups(window_domains: Sequence[int]) -> dict[int, list[int]]:
    """Window batch indices by domain index (-1: batches mixed from every domain)."""
    out: dict[int, list[int]] = {}
    for j, d in enumerate(window_domains):
        out.setdefault(d, []).append(j)
    return out
