"""The validation protocol (fut/protocol.py): the test orders' retrained results are read by `final_scoring`
and by nothing else, so no choice can be tuned on them; the dev and test order sets are disjoint."""
import builtins
import inspect
from pathlib import Path

import pytest

from fut import protocol
from fut.reference import ReferenceRun
from fut.stages import estimate
from fut.storage import read_json


def test_dev_and_test_orders_are_disjoint_and_seeded_apart(tiny):
    params, data_dir, ref_dir, _ = tiny
    run = ReferenceRun(params, data_dir, ref_dir)
    summary = read_json(Path(ref_dir) / "summary.json")
    splits = protocol.split_orders(params, run.prepared.window_domains, len(run.prepared.domains),
                                   summary["batch_losses_start"])
    dev, test = ({tuple(o) for o in splits[s].values()} for s in (protocol.DEV, protocol.TEST))
    assert test and not dev & test
    assert set(splits[protocol.DEV]).isdisjoint(splits[protocol.TEST])


@pytest.mark.slow
def test_only_final_scoring_reads_the_test_results(tiny_truth, monkeypatch):
    """Every file opened under the test split's folder during the estimate stage (which makes the dev block,
    times, calibrates the error indicator and writes the final table) is opened from inside final_scoring."""
    params, data_dir, ref_dir, cache_dir, gt_dir = tiny_truth
    test_dir = protocol.split_dir(gt_dir, protocol.TEST).resolve()
    real_open, readers = builtins.open, []

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file).resolve().is_relative_to(test_dir):
            readers.append([f.function for f in inspect.stack()])
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    _, metrics = estimate.run(params, data_dir, ref_dir, cache_dir, cache_dir.parent / "projection", gt_dir)
    assert readers, "the final table was scored without reading the test results"
    assert all("final_scoring" in stack for stack in readers)
    assert metrics["test"]["n_orders"] == len(read_json(test_dir / "results.json"))
    # The trajectory figure replays the dev trajectory orders with estimate.trajectory_methods and no other.
    assert len(metrics["trajectory_orders"]) == params.groundtruth.trajectories
    along = {m for m, x in metrics["methods"].items() if "param_error" in x}
    assert along == set(params.estimate.trajectory_methods) & set(params.estimate.methods) and along
