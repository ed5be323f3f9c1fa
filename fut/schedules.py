"""Orders beyond one permutation of the window's fixed batches: sample-level orders and multi-epoch orders.

A sample-level order assigns the window's T·b sequences to batches anew: T batches of b sequence indices, each
sequence exactly once. Sequence i is the (i mod b)-th sequence of window batch i // b, so the batch order
(j_0, j_1, ...) is the sample-level order whose step t holds the sequences of batch j_t. A multi-epoch order is a
sequence of E·T batch indices in which every batch appears E times (E passes over the window). Both go through
the reference's training code path (fut/training.py `run_window`) and, for the estimate, through fut-subspace's
replay over units (fut/subspace.py): sequences for sample-level orders, batches visited E times for epochs.

In an orders file, a sample-level order is one line of T batches separated by `;`, each b comma-separated
sequence indices; a multi-epoch order is one line of E·T comma-separated batch indices (fut/cli.py).
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from .orders import OrderError, validate_order

SAMPLE_FAMILIES = ("random", "domains", "mixed", "easy_to_hard", "hard_to_easy")
EPOCH_FAMILIES = ("random_reshuffled", "random_repeated", "domains", "easy_to_hard", "hard_to_easy",
                  "reversed_alternating")

Order = list  # list[int] (batch indices, one or several epochs) or list[list[int]] (sample-level batches)


def is_sample_level(order: Sequence) -> bool:
    return len(order) > 0 and isinstance(order[0], (list, tuple))


def validate_sample_order(order: Sequence[Sequence[int]], steps: int, batch_size: int) -> list[list[int]]:
    """`order` as lists of ints, or raise naming the batch and what is allowed: `steps` batches of `batch_size`
    sequence indices in 0..steps·batch_size − 1, every sequence exactly once."""
    n = steps * batch_size
    if len(order) != steps:
        raise OrderError(f"a sample-level order has {len(order)} batches; window.steps = {steps} requires "
                         f"exactly {steps}")
    where: dict[int, int] = {}
    out = []
    for k, batch in enumerate(order):
        batch = list(batch)
        if len(batch) != batch_size:
            raise OrderError(f"batch {k} has {len(batch)} sequences; window.batch_size = {batch_size} requires "
                             f"exactly {batch_size}")
        for i in batch:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise OrderError(f"batch {k}: {i!r} is not a sequence index; allowed: integers 0..{n - 1}")
            if i in where:
                raise OrderError(f"sequence {i} appears twice (batches {where[i]} and {k}); each of the window's "
                                 f"{n} sequences must appear exactly once")
            where[i] = k
        out.append(batch)
    return out


def validate_epoch_order(order: Sequence[int], steps: int, epochs: int | None = None) -> list[int]:
    """`order` as a list of ints, or raise naming what is wrong: E·steps batch indices in 0..steps − 1, every
    batch exactly E times (E = `epochs`, or len(order) / steps when not given)."""
    order = list(order)
    if epochs is None:
        if len(order) == 0 or len(order) % steps:
            raise OrderError(f"order has {len(order)} entries; window.steps = {steps} requires a multiple of "
                             f"{steps} (E epochs: E·{steps} batch indices)")
        epochs = len(order) // steps
    if len(order) != epochs * steps:
        raise OrderError(f"order has {len(order)} entries; {epochs} epochs of window.steps = {steps} require "
                         f"exactly {epochs * steps}")
    for pos, j in enumerate(order):
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < steps:
            raise OrderError(f"order[{pos}] = {j!r} is not a batch index; allowed: integers 0..{steps - 1}")
    for j in range(steps):
        if order.count(j) != epochs:
            raise OrderError(f"order holds batch {j} {order.count(j)} times; {epochs} epochs require every batch "
                             f"0..{steps - 1} exactly {epochs} times")
    return order


def validate_any(order: Sequence, steps: int, batch_size: int) -> Order:
    """A batch order (T indices, repeats allowed: a retrain may feed any batches), a multi-epoch order or a
    sample-level order, validated as its kind."""
    if is_sample_level(order):
        return validate_sample_order(order, steps, batch_size)
    if len(order) > steps:
        return validate_epoch_order(order, steps)
    return validate_order(order, steps, permutation=False)


def parse_line(line: str, steps: int, batch_size: int, permutation: bool = True) -> Order:
    """One line of an orders file: `;`-separated batches of sequence indices (sample-level), or comma-separated
    batch indices (a permutation of 0..T−1 (any T batches unless `permutation`), or E·T entries for E epochs)."""
    try:
        batches = [[int(x) for x in part.split(",")] for part in line.split(";")]
    except ValueError as err:
        raise OrderError(f"{line!r} is not comma-separated integers (batches separated by ';')") from err
    if ";" in line:
        return validate_sample_order(batches, steps, batch_size)
    order = batches[0]
    if len(order) > steps:
        return validate_epoch_order(order, steps)
    return validate_order(order, steps, permutation)


def parse_orders_file(text: str, steps: int, batch_size: int, permutation: bool = True) -> list[Order]:
    """One order per line (see `parse_line`); blank lines and '#' comments are skipped; errors name the line."""
    orders = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            orders.append(parse_line(line, steps, batch_size, permutation))
        except OrderError as err:
            raise OrderError(f"line {lineno}: {err}") from err
    if not orders:
        raise OrderError("the orders file holds no order")
    return orders


def kind_of(order: Order, steps: int) -> tuple[str, int]:
    """("batches", 1), ("sequences", 1) or ("batches", E) for an order of E·T batch indices."""
    if is_sample_level(order):
        return "sequences", 1
    return "batches", max(1, len(order) // steps)


def format_order(order: Order) -> str:
    """The orders-file line of `order` (the inverse of `parse_line`)."""
    if is_sample_level(order):
        return ";".join(",".join(map(str, b)) for b in order)
    return ",".join(map(str, order))


def batch_tensors(order: Order, window: torch.Tensor) -> list[torch.Tensor]:
    """The [b, L] batch of every step of `order` from the window [T, b, L]."""
    if is_sample_level(order):
        flat = window.reshape(-1, window.shape[-1])
        return [flat[torch.tensor(b)] for b in order]
    return [window[j] for j in order]


def as_units(orders: Sequence[Order]) -> torch.Tensor:
    """Orders as fut-subspace's replay reads them: [n, S] batch (unit) indices, or [n, T, b] sequence indices."""
    return torch.tensor([list(o) for o in orders], dtype=torch.long)


def sequence_batches(steps: int, batch_size: int) -> list[list[int]]:
    """The reference's sample-level order: window batch j holds sequences j·b .. j·b + b − 1."""
    return [list(range(j * batch_size, (j + 1) * batch_size)) for j in range(steps)]


# --- the seeded order sets of the ground truth ------------------------------------------------------------

def _chunks(seqs: list[int], size: int) -> list[list[int]]:
    return [seqs[k: k + size] for k in range(0, len(seqs), size)]


def sample_order_set(steps: int, batch_size: int, window_domains: Sequence[int], sequence_losses: Sequence[float],
                     counts: dict[str, int], seed: int, prefix: str = "") -> dict[str, list[list[int]]]:
    """Named sample-level orders by family (`counts`: how many of each):
    `random`  every sequence to a random batch (random re-batchings: batches mix domains by chance);
    `domains` domain-pure batches (each domain's sequences shuffled, then chunked), the domains as blocks in a
              random order (family domain_blocks);
    `mixed`   domain-mixed batches: every batch takes its sequences round-robin from every domain (structured);
    `easy_to_hard` / `hard_to_easy`: sequences sorted by the reference model's loss at the window start (with
              seeded jitter), then chunked: batches of similar difficulty, easiest (hardest) first (structured).
    Domain families need domain-pure window batches (window.batches: domain)."""
    rng = random.Random(seed)
    n = steps * batch_size
    domain_of = [window_domains[i // batch_size] for i in range(n)]
    by_domain: dict[int, list[int]] = {}
    for i, d in enumerate(domain_of):
        by_domain.setdefault(d, []).append(i)
    spread = (max(sequence_losses) - min(sequence_losses)) / n if n > 1 else 1.0

    def random_rebatch() -> list[list[int]]:
        return _chunks(rng.sample(range(n), n), batch_size)

    def domain_pure() -> list[list[int]]:
        doms = list(by_domain)
        rng.shuffle(doms)
        return [b for d in doms for b in _chunks(rng.sample(by_domain[d], len(by_domain[d])), batch_size)]

    def domain_mixed() -> list[list[int]]:
        queues = [rng.sample(by_domain[d], len(by_domain[d])) for d in by_domain]
        rng.shuffle(queues)
        flat, k = [], 0
        while any(queues):
            if queues[k % len(queues)]:
                flat.append(queues[k % len(queues)].pop())
            k += 1
        return _chunks(flat, batch_size)

    def by_difficulty(hardest_last: bool) -> list[list[int]]:
        noisy = [x + rng.gauss(0.0, 2 * spread) for x in sequence_losses]
        ranked = sorted(range(n), key=lambda i: (noisy[i], i), reverse=not hardest_last)
        return _chunks(ranked, batch_size)

    draw = {"random": random_rebatch, "domains": domain_pure, "mixed": domain_mixed,
            "easy_to_hard": lambda: by_difficulty(True), "hard_to_easy": lambda: by_difficulty(False)}
    if min(window_domains) < 0:
        counts = {k: v for k, v in counts.items() if k not in ("domains", "mixed")}
    return _draw_named(draw, counts, "sample-level", prefix)


def _draw_named(draw: dict, counts: dict[str, int], kind_of_orders: str, prefix: str) -> dict[str, list]:
    """`counts[kind]` orders drawn by `draw[kind]`, named PREFIX + KIND-NNN (`random_x` named `random-x`, so its
    family is random)."""
    out = {}
    for kind, k in counts.items():
        if kind not in draw:
            raise OrderError(f"{kind_of_orders} order family {kind!r}; allowed: {', '.join(draw)}")
        for i in range(k):
            out[f"{prefix}{kind.replace('random_', 'random-')}-{i:03d}"] = draw[kind]()
    return out


def epoch_order_set(steps: int, epochs: int, window_domains: Sequence[int], batch_losses: Sequence[float],
                    counts: dict[str, int], seed: int, prefix: str = "") -> dict[str, list[int]]:
    """Named E-epoch batch orders by family (`counts`: how many of each):
    `random_reshuffled` a new random permutation every epoch; `random_repeated` one random permutation every
    epoch (both family random); `domains` domain blocks in a random domain order, shuffled within, redrawn every
    epoch (family domain_blocks); `easy_to_hard` / `hard_to_easy` by the reference loss with seeded jitter, the
    same every epoch; `reversed_alternating` the window's order, then reversed, alternately (structured)."""
    rng = random.Random(seed)
    by_domain: dict[int, list[int]] = {}
    for j, d in enumerate(window_domains):
        by_domain.setdefault(d, []).append(j)
    spread = (max(batch_losses) - min(batch_losses)) / steps if steps > 1 else 1.0

    def perm() -> list[int]:
        return rng.sample(range(steps), steps)

    def blocks() -> list[int]:
        doms = list(by_domain)
        rng.shuffle(doms)
        return [j for d in doms for j in rng.sample(by_domain[d], len(by_domain[d]))]

    def by_difficulty(hardest_last: bool) -> list[int]:
        noisy = [x + rng.gauss(0.0, 2 * spread) for x in batch_losses]
        return sorted(range(steps), key=lambda j: (noisy[j], j), reverse=not hardest_last)

    def same(one: list[int]) -> list[int]:
        return one * epochs

    draw = {"random_reshuffled": lambda: [j for _ in range(epochs) for j in perm()],
            "random_repeated": lambda: same(perm()),
            "domains": lambda: [j for _ in range(epochs) for j in blocks()],
            "easy_to_hard": lambda: same(by_difficulty(True)), "hard_to_easy": lambda: same(by_difficulty(False)),
            "reversed_alternating": lambda: [j for e in range(epochs)
                                             for j in (range(steps) if e % 2 == 0 else reversed(range(steps)))]}
    if min(window_domains) < 0 or len(by_domain) < 2:
        counts = {k: v for k, v in counts.items() if k != "domains"}
    return _draw_named(draw, counts, "multi-epoch", prefix)
