"""Benchmark evaluation of loop plans: tasks, scoring, the results store, statistics, sweeps and the plan search."""
