"""The time budget: `plans` sizes the fine-tune to a wall-time budget (pure
arithmetic, no TensorFlow); `callback.StepBudget` applies it while the
fine-tune trains. This package imports only `plans`, so that what reads a
duration or the input size the budget picks does not load Keras."""

from transferlab.budget.plans import (BudgetError, Plan, Probe, cut, describe, evaluate_reserve, finetune_seconds,
                                     input_size, parse, plan, replan, small_steps)

__all__ = ["BudgetError", "Plan", "Probe", "cut", "describe", "evaluate_reserve", "finetune_seconds",
           "input_size", "parse", "plan", "replan", "small_steps"]
