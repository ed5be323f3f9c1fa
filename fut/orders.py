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


def parse_orders_file(text: str, steps: int, permutation: bool = True) -> list[list[int]]:
    """One order per line, comma-separated batch indices; blank lines and '#' comments are skipped."""
    orders = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            order = [int(x) for x in line.split(",")]
        except ValueError as err:
            raise OrderError(f"line {lineno}: {line!r} is not comma-separated integers") from err
        try:
            orders.append(validate_order(order, steps, permutation))
        except OrderError as err:
            raise OrderError(f"line {lineno}: {err}") from err
    if not orders:
        raise OrderError("the orders file holds no order")
    return orders


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
