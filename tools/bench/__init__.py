"""Benchmarks: each measures what a section of docs/BENCHMARKS.md reports (the command is next to its figures).
Resumable benchmarks share one harness (``harness``: config key, result cache, shards, locks, bench rows)."""
