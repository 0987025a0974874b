"""Reproducible benchmarks (each writes results.json, results.md and PNG figures)."""
