"""Domain order on the tiny run: every ordering of the domains estimated, the truth of the ends reused from
the ground truth (looked up by order; only what it lacks is retrained)."""

from unittest import mock

from fut import protocol
from fut.applications import truth_for
from fut.domain_order import domain_order
from fut.storage import atomic_write_json


def test_domain_order_reuses_the_ground_truth(tiny_truth, tmp_path):
    params, data_dir, ref_dir, cache_dir, gt_dir = tiny_truth
    details, metrics = domain_order(params, data_dir, ref_dir, cache_dir, gt_dir, tmp_path)
    atomic_write_json(tmp_path / "domain_order.json", metrics)
    gt = protocol.dev_truth(gt_dir)
    blocks = {n: r for n, r in gt.items() if n.startswith("domains-")}
    assert metrics["n_orders"] == len(blocks) == 2 and metrics["n_retrained"] == 0
    assert (tmp_path / "orders").is_dir()          # a DVC output, even with nothing retrained
    best = min(blocks, key=lambda n: blocks[n]["eval_ppl"])
    assert metrics["mixed"]["true_best"]["order"] == best
    assert metrics["mixed"]["true_best"]["true_ppl"] == blocks[best]["eval_ppl"]
    for d in ("genesis", "gospels"):
        assert metrics["per_domain"][d]["est_best"]["order"] in blocks
    row = details["rows"][0]
    assert row["sequence"].count("→") == 1 and row["est_ppl_genesis"] > 1


def test_truth_is_reused_by_order_and_only_the_rest_retrained(tmp_path):
    known = {"identity": {"order": [0, 1, 2], "eval_loss": 1.0}, "reversed": {"order": [2, 1, 0], "eval_loss": 1.1},
             "no_domains": {"order": [1, 2, 0], "eval_loss": 1.2}}
    asked = []

    def retrain(params, missing, *args, **kwargs):
        asked.append(dict(missing))
        return {n: {"order": o, "eval_loss": 1.3, "domain_eval_loss": {}} for n, o in missing.items()}

    with mock.patch("fut.applications.retrain_all", retrain):
        truth, retrained = truth_for(None, {"a": [2, 1, 0], "b": [1, 0, 2]}, known, None, None, tmp_path, "verify")
        assert truth["a"] is known["reversed"] and truth["b"]["eval_loss"] == 1.3
        assert retrained == ["b"] and asked == [{"b": [1, 0, 2]}]
        assert truth_for(None, {"a": [0, 1, 2]}, known, None, None, tmp_path, "verify") == ({"a": known["identity"]}, [])
        assert asked[-1] == {}
        # a stored result without the readouts asked for is retrained, not reused
        truth, retrained = truth_for(None, {"c": [1, 2, 0]}, known, None, None, tmp_path, "verify",
                                     needs=("eval_loss", "domain_eval_loss"))
        assert retrained == ["c"] and truth["c"]["eval_loss"] == 1.3
