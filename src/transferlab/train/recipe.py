"""What the head, the fine-tune and the search share when they train: the
optimizer, the compile recipe (loss, label smoothing), the metric they watch,
the epoch logs, and the fine-tune's `Recipe`."""

from __future__ import annotations

import csv
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import keras

from transferlab.tracking import metric_name
from transferlab.train.selection import keras_metrics

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


@dataclass(frozen=True)
class Recipe:
    """How a fine-tune trains: what `trainer.build` and `trainer.fit` read. The
    finetune stage fills it from params.yaml (`from_params`); a search trial
    replaces what it tries (`dataclasses.replace`)."""

    unfreeze: int | str  # blocks from the top, or "all"
    batch_size: int  # one step's, over every replica
    seed: int
    optimizer: str
    learning_rate: float  # the peak of the schedule
    weight_decay: float
    schedule: str  # cosine | linear | plateau
    warmup_epochs: float
    label_smoothing: float
    ema: float  # momentum of a moving average of the weights; 0: off
    train_bn: bool
    train_depthwise: bool
    flip: bool  # cached mode: a randomly flipped copy per sample and epoch
    augment: dict  # full mode: the keywords of surgery.augmentation
    select: str = "accuracy"  # the validation metric that picks the best epoch (train.selection)
    class_weight: dict | None = None  # class index -> loss weight (train.selection); None: every class 1
    backprop: float = 1.0  # the share of each batch a step trains on, the highest losses (train.selective)

    @classmethod
    def from_params(cls, f, *, seed: int, batch_size: int, selection=None, flip: bool | None = None) -> "Recipe":
        """From params.yaml's finetune section (`f`, a config.FinetuneConfig),
        each key read by name (so a stage's params check sees every key it reads);
        `selection`: a train.selection.Selection (None: accuracy, unweighted);
        `flip`: finetune.augment.flip resolved (train.mirror; needed where it is auto)."""
        a = f.augment
        if flip is None:
            if a.flip == "auto":
                raise ValueError("finetune.augment.flip is auto: pass the flip train.mirror.resolve chose")
            flip = a.flip
        chosen = {} if selection is None else {"select": selection.metric, "class_weight": selection.class_weight}
        return cls(unfreeze=f.unfreeze, batch_size=batch_size, seed=seed, optimizer=f.optimizer,
                   learning_rate=f.learning_rate, weight_decay=f.weight_decay, schedule=f.schedule,
                   warmup_epochs=f.warmup_epochs, label_smoothing=f.label_smoothing, ema=f.ema,
                   train_bn=f.train_bn, train_depthwise=f.train_depthwise, flip=flip, backprop=f.backprop,
                   augment={**{field.name: getattr(a, field.name) for field in dataclasses.fields(a)}, "flip": flip},
                   **chosen)


def make_optimizer(name: str, learning_rate, weight_decay: float | None = None, ema: float = 0.0,
                   ema_every: int | None = None):
    """`learning_rate` may be a float or a keras LearningRateSchedule. `ema` > 0:
    the optimizer keeps an exponential moving average of the weights with that
    momentum (Keras' `use_ema`) and writes it into them every `ema_every` steps
    and at the end of `fit` (`finalize_variable_values`). `weight_decay` None:
    none, except Keras' default 1e-4 for adamw; 0: none for every optimizer."""
    options = {"weight_decay": weight_decay} if weight_decay else {}
    if ema:
        options.update(use_ema=True, ema_momentum=ema, ema_overwrite_frequency=ema_every)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, **options)
    if name == "adamw":
        options["weight_decay"] = 1e-4 if weight_decay is None else weight_decay
        return keras.optimizers.AdamW(learning_rate, **options)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, **options)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, **options)
    raise ValueError(f"unknown optimizer {name!r}; valid: {list(OPTIMIZERS)}")


def compile_model(model: keras.Model, optimizer, learning_rate, weight_decay: float | None = None,
                  label_smoothing: float = 0.0, select: str = "accuracy") -> None:
    """Cross-entropy on softmax outputs against integer labels (smoothed by
    `label_smoothing`), accuracy reported, and the selection metric `select`
    (train.selection) where it is another. `optimizer`: a name (made here with
    `learning_rate` and `weight_decay`) or an optimizer to go on with, state and
    step counter included."""
    loss = SmoothedSparseCrossentropy(label_smoothing) if label_smoothing else "sparse_categorical_crossentropy"
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, learning_rate, weight_decay)
    model.compile(optimizer=optimizer, loss=loss,
                  metrics=keras_metrics(select, int(model.output_shape[-1])))


@keras.saving.register_keras_serializable("transferlab")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy with label smoothing for integer labels (Keras'
    sparse loss has no smoothing): the target is (1 - s) on the true class plus
    s / K on every class."""

    def __init__(self, label_smoothing: float = 0.1, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        ops = keras.ops
        n = ops.shape(y_pred)[-1]
        target = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), n)
        return keras.losses.categorical_crossentropy(target, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def monitor(has_val: bool, metric: str = "accuracy") -> str:
    """The metric early stopping, checkpoints and pruning watch: on the validation
    split when there is one, else on the training batches."""
    return f"val_{metric}" if has_val else metric


def mode(metric: str) -> str:
    """Whether `metric` improves upwards ("max") or downwards ("min")."""
    return "min" if metric.endswith("loss") else "max"


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
