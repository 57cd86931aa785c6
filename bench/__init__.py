"""Benchmarks: each script prints target vs measured and writes JSON to bench/results/."""
