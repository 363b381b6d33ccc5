"""Training a fine-tune, one job a module:

    surgery     which layers train (unfreeze by block, BatchNorm frozen) and the models built from them
    recipe      optimizer, compile (loss, label smoothing), monitored metric, epoch logs; the fine-tune's Recipe
    schedule    the learning rate: warmup, then a decay to zero at the last step
    checkpoint  resumable state, the best epoch
    trainer     build and fit (the stage and the search), progressive resizing, the budget's probe
    precision   the dtype policy: set, or `auto` timed on a CPU with bfloat16 instructions
    guard       a collapsed or diverged fine-tune caught, its last good weights restored
    mirror      whether a horizontal mirror keeps the labels (flip: auto), from the head's predictions
    session     the stage's fine-tune from start to its best epoch: length, checkpoints, guard, metrics

How long a fine-tune trains is the budget's: `transferlab.budget.callback.StepBudget`.
"""
