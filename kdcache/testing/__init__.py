"""Builders for small real models used by the tests, benchmarks and the offline demo."""
