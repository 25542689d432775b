"""Benchmarks of the platform (`python -m benchmarks.throughput`); see docs/benchmarks.md."""
