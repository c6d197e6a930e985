"""Benchmarks: analytic sizes (flops), timed measurements (harness), the reference comparison and sweeps."""
