"""Fault scenarios (checks/faults.py) against the uninterrupted tiny run: stages killed with SIGKILL in a real
subprocess and rerun, corrupted artefacts, NaN/inf in training, the cache and an estimate; and a second run of
every stage compared with the first, bit for bit."""
import pytest
import torch

from checks.faults import FAULTS, Kill
from checks.runs import folder_differences, full_run, run_differences, run_stage
from fut.storage import atomic_write_json, save_tensors


@pytest.mark.parametrize("scenario", [pytest.param(s, marks=pytest.mark.slow) if isinstance(s, Kill) else s
                                      for s in FAULTS], ids=lambda s: s.name)
def test_fault_scenario(scenario, tiny_run, tmp_path):
    result = scenario.run(tiny_run, tmp_path)
    assert result.passed, result.detail

@pytest.mark.slow

def test_a_second_run_of_every_stage_is_bit_identical(tiny_run, tmp_path):
    run_stage(tiny_run, "estimate")
    second = full_run(tiny_run.params, tmp_path)
    assert run_differences(tiny_run, second) == []


def test_comparison_sees_a_changed_value_but_not_a_timing(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, value, seconds in ((a, 1.0, 0.1), (b, 1.0, 0.2)):
        save_tensors(folder / "x.safetensors", {"w": torch.full((3,), value)}, {"t": 0, "build": {"seconds": seconds}})
        atomic_write_json(folder / "m.json", {"loss": value, "seconds": seconds, "files_reused": 1})
    assert folder_differences(a, b) == []
    save_tensors(b / "x.safetensors", {"w": torch.tensor([1.0, 1.0, 1.0 + 2 ** -20])}, {"t": 0, "build": {}})
    atomic_write_json(b / "m.json", {"loss": 1.0 + 2 ** -40})
    (b / ".x.safetensors.abc.tmp").write_bytes(b"left by a kill")
    assert folder_differences(a, b) == [
        ".x.safetensors.abc.tmp: only in " + str(b), "m.json: values differ",
        "x.safetensors: tensors differ (dtype, shape or sha256)"]
