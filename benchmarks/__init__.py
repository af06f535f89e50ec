"""Throughput, latency and memory benchmarks."""
