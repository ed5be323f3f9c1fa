"""Sample-level and multi-epoch orders (fut/schedules.py): validation that names what is wrong, the orders-file
format, the seeded order sets of each family, and the batches a retrain is fed."""
import pytest
import torch

from fut.orders import OrderError, family
from fut.schedules import (as_units, batch_tensors, epoch_order_set, format_order, kind_of, parse_orders_file,
                           sample_order_set, sequence_batches, validate_epoch_order, validate_sample_order)

T, B = 4, 2          # 4 batches of 2 sequences: sequences 0..7
DOMAINS = [0, 1, 0, 1]


@pytest.mark.parametrize("order, needle", [
    ([[0, 1], [2, 3], [4, 5]], "has 3 batches; window.steps = 4 requires exactly 4"),
    ([[0, 1], [2, 3], [4, 5], [6]], "batch 3 has 1 sequences; window.batch_size = 2 requires exactly 2"),
    ([[0, 1], [2, 3], [4, 5], [6, 8]], "batch 3: 8 is not a sequence index; allowed: integers 0..7"),
    ([[0, 1], [2, 3], [4, 1], [6, 7]], "sequence 1 appears twice (batches 0 and 2)"),
])
def test_invalid_sample_orders_are_refused_naming_the_batch(order, needle):
    with pytest.raises(OrderError) as err:
        validate_sample_order(order, T, B)
    assert needle in str(err.value)


@pytest.mark.parametrize("order, needle", [
    ([0, 1, 2, 3, 0, 1, 2], "requires a multiple of 4"),
    ([0, 1, 2, 3, 0, 1, 2, 2], "holds batch 2 3 times; 2 epochs require every batch 0..3 exactly 2 times"),
    ([0, 1, 2, 3, 0, 1, 2, 4], "order[7] = 4 is not a batch index; allowed: integers 0..3"),
])
def test_invalid_epoch_orders_are_refused(order, needle):
    with pytest.raises(OrderError) as err:
        validate_epoch_order(order, T)
    assert needle in str(err.value)


def test_orders_file_reads_every_kind_and_names_the_bad_line():
    text = "# batch, two epochs, sample-level\n3,2,1,0\n0,1,2,3,3,2,1,0\n7,6;5,4;3,2;1,0\n"
    orders = parse_orders_file(text, T, B)
    assert orders == [[3, 2, 1, 0], [0, 1, 2, 3, 3, 2, 1, 0], [[7, 6], [5, 4], [3, 2], [1, 0]]]
    assert [kind_of(o, T) for o in orders] == [("batches", 1), ("batches", 2), ("sequences", 1)]
    assert parse_orders_file("\n".join(format_order(o) for o in orders), T, B) == orders
    with pytest.raises(OrderError, match="line 3: sequence 6 appears twice"):
        parse_orders_file("0,1,2,3\n\n7,6;5,4;3,2;1,6\n", T, B)
    with pytest.raises(OrderError, match="line 2: batch 1 has 3 sequences"):
        parse_orders_file("0,1,2,3\n0,1;2,3,4;5;6,7\n", T, B)
    with pytest.raises(OrderError, match="line 1: order repeats batch 0"):
        parse_orders_file("0,0,1,2\n", T, B)
    with pytest.raises(OrderError, match="line 1: 'a,b' is not comma-separated integers"):
        parse_orders_file("a,b\n", T, B)
    with pytest.raises(OrderError, match="holds no order"):
        parse_orders_file("# nothing\n", T, B)


def test_batch_tensors_feed_the_window_as_the_order_says():
    window = torch.arange(T * B * 3).reshape(T, B, 3)
    assert all(torch.equal(a, b) for a, b in zip(batch_tensors(sequence_batches(T, B), window), window))
    got = batch_tensors([[7, 0], [1, 6], [2, 5], [3, 4]], window)
    flat = window.reshape(-1, 3)
    assert torch.equal(got[0], flat[[7, 0]]) and torch.equal(got[3], flat[[3, 4]])
    assert [int(b[0, 0]) for b in batch_tensors([1, 0, 3, 2, 1, 0, 3, 2], window)] == [6, 0, 18, 12, 6, 0, 18, 12]


def test_sample_order_sets_are_valid_seeded_and_shaped_by_family():
    losses = [float(i) for i in range(T * B)]
    counts = {"random": 3, "domains": 2, "mixed": 2, "easy_to_hard": 1, "hard_to_easy": 1}
    a = sample_order_set(T, B, DOMAINS, losses, counts, seed=3)
    assert a == sample_order_set(T, B, DOMAINS, losses, counts, seed=3)
    assert a != sample_order_set(T, B, DOMAINS, losses, counts, seed=4)
    for name, order in a.items():
        validate_sample_order(order, T, B)
    domain_of = lambda i: DOMAINS[i // B]
    for k in range(2):
        assert all(len({domain_of(i) for i in batch}) == 1 for batch in a[f"domains-{k:03d}"])   # domain-pure
        assert all(len({domain_of(i) for i in batch}) == 2 for batch in a[f"mixed-{k:03d}"])     # one of each
    assert [family(n) for n in ("random-000", "domains-001", "mixed-000", "test-easy_to_hard-000")] == [
        "random", "domain_blocks", "structured", "structured"]
    assert as_units(list(a.values())).shape == (len(a), T, B)


def test_epoch_order_sets_hold_every_batch_once_per_epoch():
    counts = {"random_reshuffled": 2, "random_repeated": 2, "domains": 2, "easy_to_hard": 1,
              "reversed_alternating": 1}
    orders = epoch_order_set(T, 3, DOMAINS, [0.4, 0.1, 0.3, 0.2], counts, seed=0, prefix="test-")
    for name, order in orders.items():
        validate_epoch_order(order, T, 3)
        assert all(sorted(order[e * T:(e + 1) * T]) == list(range(T)) for e in range(3))
        assert family(name) == {"random": "random", "domains": "domain_blocks"}.get(name.split("-")[1], "structured")
    rep = orders["test-random-repeated-000"]
    assert rep[:T] == rep[T:2 * T] == rep[2 * T:]
    assert orders["test-reversed_alternating-000"] == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3]
    easy = orders["test-easy_to_hard-000"]
    assert easy[:T] == easy[T:2 * T] == easy[2 * T:]
