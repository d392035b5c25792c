"""Benchmark drivers (run as modules: python -m benchmarks.NAME)."""
