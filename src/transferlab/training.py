"""What the head, the fine-tune and the search share when they train: the
optimizer, the compile recipe and the metric they watch."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import keras

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
# Keras history names -> our metric names (train_, val_, test_ prefixes everywhere).
_KERAS_NAMES = {"loss": "train_loss", "accuracy": "train_accuracy", "learning_rate": "learning_rate"}


def make_optimizer(name: str, learning_rate, weight_decay: float | None = None):
    """`learning_rate` may be a float or a keras LearningRateSchedule."""
    decay = {"weight_decay": weight_decay} if weight_decay else {}
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, **decay)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay or 1e-4)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, **decay)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, **decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: {list(OPTIMIZERS)}")


def compile_model(model: keras.Model, optimizer: str, learning_rate, weight_decay: float | None = None) -> None:
    """Sparse categorical cross-entropy on softmax outputs, accuracy reported."""
    model.compile(optimizer=make_optimizer(optimizer, learning_rate, weight_decay),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def monitor(has_val: bool, metric: str = "accuracy") -> str:
    """The metric early stopping, checkpoints and pruning watch: on the validation
    split when there is one, else on the training batches."""
    return f"val_{metric}" if has_val else metric


def mode(metric: str) -> str:
    """Whether `metric` improves upwards ("max") or downwards ("min")."""
    return "min" if metric.endswith("loss") else "max"


def metric_name(keras_name: str) -> str:
    return _KERAS_NAMES.get(keras_name, keras_name)


def write_history(path: Path, hist: dict) -> None:
    """Keras' per-epoch history as a CSV that `dvc plots` reads (train_*/val_* names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(hist)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", *[metric_name(n) for n in names]])
        for i in range(len(hist[names[0]])):
            writer.writerow([i + 1, *[f"{float(hist[n][i]):.6g}" for n in names]])


def verbosity() -> int:
    """Keras' fit verbosity: a progress bar in a terminal (1), one line per epoch
    when stdout is a file or a pipe (2: `dvc repro > log` stays readable)."""
    return 1 if sys.stdout.isatty() else 2


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's learning rate at the end of each epoch to the epoch's
    logs, so that the history, the CSV and MLflow hold the schedule. Put it before
    the callbacks that read the logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
