import pytest

from fut.orders import OrderError, domain_block_orders, groundtruth_orders, validate_order


@pytest.mark.parametrize("order, needle", [
    ([0, 1, 2], "has 3 entries; window.steps = 4"),
    ([0, 1, 2, 4], "order[3] = 4 is not a batch index; allowed: integers 0..3"),
    ([0, 1, -1, 2], "order[2] = -1"),
    ([0, 1, 1, 2], "repeats batch 1"),
    ([0, 1, 2, 3.0], "order[3] = 3.0"),
])
def test_invalid_orders_are_refused_clearly(order, needle):
    with pytest.raises(OrderError) as err:
        validate_order(order, 4)
    assert needle in str(err.value)


def test_repeats_allowed_for_multi_epoch_orders():
    assert validate_order([0, 0, 1, 1], 4, permutation=False) == [0, 0, 1, 1]


def test_domain_blocks_cover_every_domain_ordering():
    window_domains = [j % 3 for j in range(9)]
    orders = domain_block_orders(window_domains, 3)
    assert len(orders) == 6
    for name, order in orders.items():
        assert sorted(order) == list(range(9))
        domains = [window_domains[j] for j in order]
        assert [domains[i] for i in (0, 3, 6)] == [int(x) for x in name.split("-")[1:]]
        assert all(domains[i] == domains[i - i % 3] for i in range(9))


def test_groundtruth_orders_are_seeded_permutations():
    losses = [5.0, 3.0, 4.0, 6.0, 1.0, 2.0]
    a = groundtruth_orders(6, 20, 1, ["reversed", "domain_blocks", "easy_to_hard", "hard_to_easy"],
                           [j % 2 for j in range(6)], 2, losses)
    b = groundtruth_orders(6, 20, 1, ["reversed", "domain_blocks", "easy_to_hard", "hard_to_easy"],
                           [j % 2 for j in range(6)], 2, losses)
    assert a == b
    assert len([n for n in a if n.startswith("random-")]) == 20 and len(a) == 1 + 20 + 1 + 2 + 2
    assert all(sorted(o) == list(range(6)) for o in a.values())
    assert a["identity"] == list(range(6)) and a["reversed"] == list(range(5, -1, -1))
    assert a["easy_to_hard"] == [4, 5, 1, 2, 0, 3] and a["hard_to_easy"] == [3, 0, 2, 1, 5, 4]
    other = groundtruth_orders(6, 20, 2, [], [0] * 6, 1, losses)
    assert [other[f"random-{i:03d}"] for i in range(20)] != [a[f"random-{i:03d}"] for i in range(20)]
