"""Benchmarks (`cotrec bench ...`): figures written to JSON, kept apart from the tests."""
