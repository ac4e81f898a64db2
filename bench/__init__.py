"""Benchmarks: measured from outside the app, against baselines measured in the same run (next issues)."""
