"""Training a fine-tune, one job a module:

    surgery     which layers train (unfreeze by block, BatchNorm frozen) and the models built from them
    recipe      optimizer, compile (loss, label smoothing), monitored metric, epoch logs; the fine-tune's Recipe
    schedule    the learning rate: warmup, then a decay to zero at the last step
    checkpoint  resumable state, the best epoch
    trainer     build and fit (the stage and the search), progressive resizing, the budget's probe

How long a fine-tune trains is the budget's: `transferlab.budget.callback.StepBudget`.
"""
