"""Benchmarks for skyformer-ext."""
