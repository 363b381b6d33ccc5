"""The benchmark harness: `python -m bench <name> [args]` (see bench/__main__.py)."""
