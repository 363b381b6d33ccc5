"""Metrics, the per-class report and the confusion matrix (scikit-learn +
matplotlib). `test_model` is the one evaluation: the evaluate stage and the
search's best trial both go through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    return classification_report(
        y_true, y_pred, labels=list(range(len(classes))), target_names=classes,
        output_dict=True, zero_division=0,
    )


def confusion_png(cm: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(5.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(cm, display_labels=classes).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45, values_format="d"
    )
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Test accuracy and loss, the per-class report and the confusion matrix."""
    from sklearn.metrics import accuracy_score, log_loss

    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    return {
        "test_accuracy": round(float(accuracy_score(y_true, y_pred)), 5),
        "test_loss": round(float(log_loss(y_true, np.clip(probs, 1e-7, 1.0), labels=labels)), 5),
        "per_class": per_class_report(y_true, y_pred, classes),
        "confusion": confusion(y_true, y_pred, len(classes)),
    }


def write_confusion_csv(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path) -> Path:
    """One row per sample, class names: what `dvc plots` confusion templates read."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[t], classes[p]) for t, p in zip(y_true, y_pred))
    return path


def test_model(model, x: np.ndarray, y: np.ndarray, classes: list[str], batch_size: int, tta: str,
               desc: str = "evaluate test") -> dict:
    """The model on the test split under test-time augmentation `tta`: the
    summary (test accuracy and loss, per-class report, confusion matrix), the
    single-view accuracy, the probabilities, and the model to log and register
    (with the same test-time augmentation inside)."""
    import time

    from transferlab import tta as tta_

    start = time.perf_counter()
    probs, single = tta_.predict_tta(model, x, batch_size, tta, desc=desc)
    seconds = time.perf_counter() - start
    result = summarize(y, probs, classes)
    result.update(
        test_accuracy_single_view=round(float((single.argmax(axis=1) == y).mean()), 5),
        probs=probs, seconds=seconds, model=tta_.with_tta(model, tta),
    )
    return result
