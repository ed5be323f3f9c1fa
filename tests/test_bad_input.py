"""Bad inputs (checks/bad_inputs.py, the README's table): each is refused before any work with its message,
and the refused call leaves its output folder as it was."""
import pytest

from checks.bad_inputs import BAD_INPUTS, check_bad_input


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda b: b.name)
def test_bad_input_is_refused_before_any_work(bad, tiny_run, tmp_path):
    result = check_bad_input(bad, tiny_run, tmp_path)
    assert result.message and bad.message in result.message, result.message or "not refused"
    assert result.changed == [], f"the refused call changed {result.changed}"
    assert result.refused
