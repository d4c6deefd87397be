"""The kernel benchmarks: run.py is the entry point, registry.py holds the cases (docs/benchmarks.md)."""
