"""How models are picked, and how much each class weighs, on imbalanced data
(params keys `select` and `class_weight`).

One selection metric decides everywhere a model is chosen: the head's early
stopping and best epoch, the fine-tune's (and whether any of its epochs beat the
head), the champion rule, and the search's objective (`tune.monitor: auto`).

- `accuracy`: the share of images right. On CIFAR-10 (balanced) this is the rule.
- `balanced_accuracy`: the mean of the classes' recalls, so a rare class counts
  as much as a common one.
- `macro_f1`: the mean of the classes' F1 scores (precision and recall).
- `auto`: `balanced_accuracy` when the largest training class has at least
  `IMBALANCED` times the images of the smallest, else `accuracy`.

`class_weight: auto` weighs each class's loss by n / (K * n_class) (scikit-learn's
"balanced") when the training classes are imbalanced by that same rule; `balanced`
always, `none` never.

Keras computes balanced accuracy and macro-F1 per epoch with `ConfusionScore`,
a confusion matrix summed over the batches, so they are exact on the whole split.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import keras
import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
IMBALANCED = 2.0  # largest / smallest training class from which auto treats a data set as imbalanced


@dataclass(frozen=True)
class Selection:
    """What the head, the fine-tune, the evaluate stage and the search select by."""

    metric: str  # one of METRICS
    class_weight: dict[int, float] | None  # class index -> loss weight; None: every class 1
    ratio: float  # largest / smallest training class (inf: a class has no training image)
    reason: str

    def record(self) -> dict:
        """For metrics/*.json (MLflow: the metric as a tag, the numbers as metrics)."""
        out = {"select_metric": self.metric, "class_weighted": int(self.class_weight is not None)}
        if np.isfinite(self.ratio):  # not where a class has no training image
            out["class_imbalance"] = round(self.ratio, 3)
        return out


def resolve(select: str, class_weight: str, counts) -> Selection:
    """The selection metric and class weights for training classes of `counts`
    (images per class, in class order: the prepared manifest's counts.train)."""
    n = np.asarray(list(counts.values()) if isinstance(counts, dict) else counts, dtype=np.float64)
    ratio = float(n.max() / n.min()) if n.min() > 0 else float("inf")
    imbalanced = ratio >= IMBALANCED
    metric = ("balanced_accuracy" if imbalanced else "accuracy") if select == "auto" else select
    weigh = class_weight == "balanced" or (class_weight == "auto" and imbalanced)
    weights = None
    if weigh:  # scikit-learn's "balanced": n / (K * n_c); a class with no image gets none
        weights = {i: float(n.sum() / (len(n) * c)) if c else 0.0 for i, c in enumerate(n)}
    reason = (f"the largest training class has {ratio:.1f}x the images of the smallest "
              f"({'imbalanced' if imbalanced else 'balanced'}: the rule is {IMBALANCED:g}x): "
              f"models are selected by {metric}"
              f"{' (select: auto)' if select == 'auto' else ''}, "
              f"{'class-weighted' if weights else 'every class weighing 1'}"
              f"{' (class_weight: auto)' if class_weight == 'auto' else ''}")
    return Selection(metric, weights, ratio, reason)


def score(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """`metric` of predicted against true labels (integer class indices)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    if len(y_true) == 0:
        return float("nan")
    if metric == "accuracy":
        return float(accuracy_score(y_true, y_pred))
    if metric == "balanced_accuracy":  # the mean recall of the classes present in y_true
        with warnings.catch_warnings():  # a class predicted and absent from y_true: not counted, as meant
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            return float(balanced_accuracy_score(y_true, y_pred))
    if metric == "macro_f1":  # over the classes present in either
        return float(f1_score(y_true, y_pred, average="macro", zero_division=0))
    raise ValueError(f"unknown selection metric {metric!r}; valid: {list(METRICS)}")


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Every selection metric, by name."""
    return {m: score(m, y_true, y_pred) for m in METRICS}


def keras_metrics(metric: str, n_classes: int) -> list:
    """The metrics to compile a model with so that its epoch logs hold `metric`
    (accuracy always)."""
    return ["accuracy"] + ([] if metric == "accuracy" else [ConfusionScore(n_classes, metric)])


@keras.saving.register_keras_serializable("transferlab")
class ConfusionScore(keras.metrics.Metric):
    """Balanced accuracy or macro-F1 of integer labels against probabilities,
    from a confusion matrix summed over the batches (as `score` computes them)."""

    def __init__(self, n_classes: int, metric: str = "balanced_accuracy", name: str | None = None, **kwargs):
        if metric not in ("balanced_accuracy", "macro_f1"):
            raise ValueError(f"ConfusionScore computes balanced_accuracy or macro_f1, not {metric!r}")
        super().__init__(name=name or metric, **kwargs)
        self.n_classes, self.metric = int(n_classes), metric
        self.matrix = self.add_variable(shape=(self.n_classes, self.n_classes), initializer="zeros",
                                        dtype="float32", name="confusion")

    def update_state(self, y_true, y_pred, sample_weight=None):
        ops = keras.ops
        true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        pred = ops.cast(ops.argmax(ops.reshape(y_pred, (-1, self.n_classes)), axis=-1), "int32")
        cells = ops.one_hot(true * self.n_classes + pred, self.n_classes * self.n_classes, dtype="float32")
        self.matrix.assign_add(ops.reshape(ops.sum(cells, axis=0), (self.n_classes, self.n_classes)))

    def result(self):
        ops = keras.ops
        m = self.matrix
        right = ops.diagonal(m)
        actual, predicted = ops.sum(m, axis=1), ops.sum(m, axis=0)
        if self.metric == "balanced_accuracy":  # classes with no true image do not count (as scikit-learn)
            present = ops.cast(actual > 0, "float32")
            recall = right / ops.maximum(actual, 1.0)
            return ops.sum(recall * present) / ops.maximum(ops.sum(present), 1.0)
        f1 = 2.0 * right / ops.maximum(actual + predicted, 1.0)
        seen = ops.cast(actual + predicted > 0, "float32")
        return ops.sum(f1 * seen) / ops.maximum(ops.sum(seen), 1.0)

    def reset_state(self):
        self.matrix.assign(keras.ops.zeros_like(self.matrix))

    def get_config(self):
        return {"n_classes": self.n_classes, "metric": self.metric, "name": self.name, "dtype": self.dtype}
