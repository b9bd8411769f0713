"""Benchmarks: each runs as `python -m benchmarks.<name>` and has a `--smoke` mode (seconds) that
tests/test_benchmarks_smoke.py runs. Figures go to benchmarks/RESULTS.md."""
