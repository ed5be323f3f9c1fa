"""`python -m checks.reliability`: every fault and bad-input scenario on tiny params, and a rerun compared.

  python -m checks.reliability [--params params.yaml] [--out reports/metrics/reliability.json] [--work DIR]

Runs every stage twice (the second run must match the first bit for bit), then each scenario of
checks/faults.py and checks/bad_inputs.py, and writes their counts and outcomes (reports/metrics/reliability.json);
tests/test_faults.py and tests/test_bad_input.py parametrize over the same tables.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from fut import config
from fut.storage import atomic_write_json

from .bad_inputs import BAD_INPUTS, check_bad_input
from .faults import FAULTS
from .runs import full_run, run_differences
from .tiny import tiny_params, write_tiny_text


def run_all(params_file: Path, work: Path, log=print) -> dict:
    """Every scenario on tiny params in `work`; the counts and outcomes reliability.json records."""
    work = Path(work)
    params = config.from_dict(tiny_params(write_tiny_text(work / "text"), params_file))
    log("baseline run (every stage, uninterrupted)")
    first = full_run(params, work / "first")
    log("second run, for determinism")
    second = full_run(params, work / "second")
    rerun_diffs = run_differences(first, second)
    faults = []
    for i, scenario in enumerate(FAULTS):
        faults.append(scenario.run(first, work / "faults" / f"{i:02d}"))
        log(f"{'pass' if faults[-1].passed else 'FAIL'}  {faults[-1].name}: {faults[-1].detail}")
    bad = []
    for i, scenario in enumerate(BAD_INPUTS):
        bad.append(check_bad_input(scenario, first, work / "bad" / f"{i:02d}"))
        log(f"{'refused' if bad[-1].refused else 'NOT REFUSED'}  {bad[-1].name}: {bad[-1].message}")
    return {
        "fault_scenarios_tested": len(faults), "fault_scenarios_passed": sum(f.passed for f in faults),
        "bad_inputs_tested": len(bad), "bad_inputs_refused": sum(b.refused for b in bad),
        "deterministic_rerun": not rerun_diffs, "rerun_differences": rerun_diffs,
        "fault_scenarios": [{"name": f.name, "passed": f.passed, "detail": f.detail.replace(str(work), "<work>")}
                            for f in faults],
        "bad_inputs": [{"input": b.name, "refused": b.refused, "message": b.message.replace(str(work), "<work>"),
                        "changed": b.changed} for b in bad],
        "device": first.metrics["reference"]["device"], "projector": first.metrics["cache"]["projector"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checks.reliability", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default=Path("params.yaml"), type=Path,
                        help="the defaults the tiny params shrink (default: %(default)s)")
    parser.add_argument("--out", default=Path("reports/metrics/reliability.json"), type=Path,
                        help="where the counts and outcomes are written (default: %(default)s)")
    parser.add_argument("--work", default=None, type=Path,
                        help="scratch folder, kept (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fut-reliability-") as tmp:
        result = run_all(args.params, args.work or Path(tmp))
    atomic_write_json(args.out, result)
    print(f"{args.out}: {result['fault_scenarios_passed']}/{result['fault_scenarios_tested']} fault scenarios passed, "
          f"{result['bad_inputs_refused']}/{result['bad_inputs_tested']} bad inputs refused, deterministic rerun: "
          f"{result['deterministic_rerun']}")
    ok = (result["fault_scenarios_passed"] == result["fault_scenarios_tested"]
          and result["bad_inputs_refused"] == result["bad_inputs_tested"] and result["deterministic_rerun"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
