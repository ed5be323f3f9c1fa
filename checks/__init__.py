"""Checks of fut that are not part of it: the tiny params and text every check runs on, and the reliability
scenarios (faults, bad inputs, a rerun compared bit for bit). Not installed: the tests and benchmarks import it
with the repository root on sys.path; `python -m checks.reliability` runs the scenarios."""
