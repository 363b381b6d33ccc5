"""The Optuna search: `transferlab tune` runs `main`."""

from transferlab.search.objective import main

__all__ = ["main"]
