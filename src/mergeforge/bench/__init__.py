"""Benchmark harness: model pools, task pools, evaluation, runner, sweeps, reports.
Filled by later work."""
