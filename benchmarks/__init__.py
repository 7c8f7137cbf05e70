"""Benchmarks of the gateway against the floor of its stack: ``python -m benchmarks``."""
