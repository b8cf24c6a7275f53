"""Benchmarks: each bench_*.py runs as `python -m tests.benchmarks.bench_X` and prints its
figures. They are not part of the test suite (timed assertions do not belong there);
`make bench` runs them all, one after another so they do not compete for the cores."""
