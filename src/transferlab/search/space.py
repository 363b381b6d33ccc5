"""What the search explores and how it decides: the space of the recipe's knobs
(params.yaml `tune.space`), params.yaml's own configuration as a point of it (the
study's first trial), the seeded sampler, and the pruner with the Keras callback
that reports to it."""

from __future__ import annotations

import warnings

from transferlab import config
from transferlab.errors import ConfigError, TuneError

# search parameter -> the params.yaml key it stands for (`--apply` writes them there)
PARAM_KEYS = {
    "unfreeze": "finetune.unfreeze",
    "learning_rate": "finetune.learning_rate",
    "weight_decay": "finetune.weight_decay",
    "label_smoothing": "finetune.label_smoothing",
    "head_learning_rate": "head.learning_rate",
    "dropout": "head.dropout",
    "units": "head.units",
}
DEFAULT_ATTR = "params_yaml"  # user attribute of the enqueued trial that is params.yaml itself


def direction(monitor: str) -> str:
    return "minimize" if monitor.endswith("loss") else "maximize"


def with_monitor(params: config.Params, counts) -> config.Params:
    """`params` with tune.monitor `auto` made val_ and the selection metric of
    training classes of `counts` (transferlab.train.selection), as the pipeline selects."""
    import dataclasses

    from transferlab.train import selection

    if params.tune.monitor != "auto":
        return params
    metric = selection.resolve(params.select, params.class_weight, counts).metric
    return dataclasses.replace(params, tune=dataclasses.replace(params.tune, monitor=f"val_{metric}"))


def make_sampler(seed: int, n_trials: int):
    """Seeded multivariate TPE; constant_liar so that concurrent workers do not
    all propose the point a running trial is already trying."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, constant_liar=True,
            n_startup_trials=max(3, min(10, n_trials // 3)),
        )


def make_pruner(name: str, finetune_epochs: int):
    """Pruning on the fine-tune epochs only, each reported after a full proxy
    epoch as step 1..finetune_epochs: the head phase ranks trials poorly (a head
    that learns slowly often fine-tunes best; measured on CIFAR-10) and is cheap.
    Hyperband runs successive halving over those epochs (reduction factor 3)."""
    import optuna

    if finetune_epochs < 1:
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=finetune_epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def unfreeze_range(params: config.Params) -> tuple[int, int]:
    from transferlab import backbones

    n = len(backbones.get(params.backbone.name).blocks)
    low, high = (n if u == "all" else int(u) for u in params.tune.space.unfreeze)
    return low, high


def suggest(trial, params: config.Params) -> dict:
    s = params.tune.space
    return {
        "unfreeze": trial.suggest_int("unfreeze", *unfreeze_range(params)),
        "learning_rate": trial.suggest_float("learning_rate", *s.learning_rate, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *s.weight_decay, log=True),
        "label_smoothing": trial.suggest_float("label_smoothing", *s.label_smoothing),
        "head_learning_rate": trial.suggest_float("head_learning_rate", *s.head_learning_rate, log=True),
        "dropout": trial.suggest_float("dropout", *s.dropout),
        "units": trial.suggest_categorical("units", list(s.units)),
    }


def defaults(params: config.Params) -> dict:
    """params.yaml's configuration as a point of the space: the study's first
    trial. A value outside its range is an error, not a silent clip: the search
    must contain the configuration it is meant to beat."""
    from transferlab import backbones
    from transferlab.train.surgery import n_unfrozen

    f, h, s = params.finetune, params.head, params.tune.space
    point = {"unfreeze": n_unfrozen(backbones.get(params.backbone.name), f.unfreeze),
             "learning_rate": f.learning_rate, "weight_decay": f.weight_decay,
             "label_smoothing": f.label_smoothing, "head_learning_rate": h.learning_rate,
             "dropout": h.dropout, "units": h.units}
    ranges = {"unfreeze": unfreeze_range(params), "learning_rate": s.learning_rate,
              "weight_decay": s.weight_decay, "label_smoothing": s.label_smoothing,
              "head_learning_rate": s.head_learning_rate, "dropout": s.dropout}
    for name, value in point.items():
        inside = value in s.units if name == "units" else ranges[name][0] <= value <= ranges[name][1]
        if not inside:
            held = list(s.units) if name == "units" else list(ranges[name])
            raise ConfigError(
                f"params.yaml: {PARAM_KEYS[name]} is {value}, outside tune.space.{name} {held}: widen "
                f"tune.space.{name} (or change {PARAM_KEYS[name]}) so that the study's first trial is the "
                "configuration it must beat")
    return point


def pruning_callback(trial, monitor: str, step_offset: int = 1, prune: bool = True, last_step: int | None = None):
    """optuna-integration's KerasPruningCallback, reporting epoch e as step
    e + step_offset; a monitored metric missing from the epoch logs is an error
    (the library only warns, which would silently never prune). prune=False
    reports without ever pruning (the params.yaml trial). At `last_step` the
    trial has run its whole proxy: it is reported, never pruned (Hyperband's top
    rung sits there; pruning then would save nothing and discard a finished
    result)."""
    from optuna_integration.keras import KerasPruningCallback

    class GlobalStepPruning(KerasPruningCallback):
        def on_epoch_end(self, epoch, logs=None):
            if monitor not in (logs or {}):
                raise TuneError(
                    f"tune.monitor is {monitor!r}, but the epoch logs hold {sorted(logs or {})}: "
                    "set tune.monitor in params.yaml to one of those"
                )
            if prune and (last_step is None or epoch + step_offset < last_step):
                super().on_epoch_end(epoch + step_offset, logs)
            else:
                trial.report(float(logs[monitor]), step=epoch + step_offset)

    return GlobalStepPruning(trial, monitor)
