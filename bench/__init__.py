"""Benchmark runner: ``python -m bench --help``."""
