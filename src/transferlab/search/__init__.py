"""The Optuna search over the recipe's knobs (unfreeze depth, fine-tune and head
learning rates, dropout, weight decay, label smoothing, head width):
`transferlab tune [--apply]`, which runs `main`.

A trial is a cheap, faithful proxy of the pipeline; the study's first trial is
params.yaml's configuration itself (never pruned), so the search can only
improve on it, and the report says when it did not. `--apply` writes the winner
into params.yaml unless that configuration won.

    space.py      the knobs' ranges, params.yaml's point, sampler, pruner
    proxy.py      the share of the images a trial sees and its cached features
    objective.py  one trial (head, then fine-tune) and its MLflow run
    study.py      storage, the study and its parent run, a worker's loop
    report.py     the best model on the test set, registered; verdict, plots, --apply
    command.py    the command: workers, then the report
"""

from transferlab.search.command import main

__all__ = ["main"]
