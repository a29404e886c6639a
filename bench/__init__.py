"""Benchmarks: offline engine throughput, kernel timings, serving load."""
