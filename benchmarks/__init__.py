"""Performance harness: `python -m benchmarks.run [--only NAME] [--quick]` (see README.md)."""
