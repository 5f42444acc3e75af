"""Benchmarks: ratios measured side by side in one run; each prints a table and writes JSON."""
