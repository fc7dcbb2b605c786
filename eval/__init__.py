"""Benchmarks, tiny-model builders and integrations (installed as ``tokenprune.eval``)."""
