"""Metrics, the per-class report and the confusion matrix (scikit-learn +
matplotlib). `evaluate_model` is the one evaluation: the evaluate stage and the
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


def _pyplot():
    """matplotlib's pyplot on the Agg backend: files, never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """`fig` laid out, written to `path` (its folder made) and closed."""
    plt = _pyplot()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_png(cm: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    plt = _pyplot()

    size = max(5.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(cm, display_labels=classes).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45, values_format="d"
    )
    ax.set_title(title)
    return _save(fig, path)


def confident_mistakes(y_true: np.ndarray, probs: np.ndarray, n: int = 16) -> np.ndarray:
    """The rows of the `n` wrong predictions made with the highest probability,
    most confident first."""
    wrong = np.flatnonzero(probs.argmax(axis=1) != y_true)
    return wrong[np.argsort(-probs[wrong].max(axis=1), kind="stable")][:n]


def mistakes_png(x: np.ndarray, y_true: np.ndarray, probs: np.ndarray, classes: list[str], path: Path,
                 n: int = 16) -> Path:
    """A gallery of the test set's most confident mistakes: each image with its
    true class, the predicted class and the probability given to it."""
    plt = _pyplot()

    rows = confident_mistakes(y_true, probs, n)
    cols, lines = 4, max(1, -(-len(rows) // 4))
    fig, axes = plt.subplots(lines, cols, figsize=(2.4 * cols, 2.7 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        predicted = int(probs[row].argmax())
        ax.imshow(np.asarray(x[row]))
        ax.set_title(f"true {classes[int(y_true[row])]}\npredicted {classes[predicted]} ({probs[row, predicted]:.2f})",
                     fontsize=8)
    if not len(rows):
        axes.flat[0].text(0.5, 0.5, "no mistakes on test", ha="center", va="center")
    fig.suptitle("most confident mistakes on test")
    return _save(fig, path)


def recall_png(per_class: dict, classes: list[str], path: Path) -> Path:
    """Each class's recall on test as a bar, the mean (balanced accuracy) as a line."""
    plt = _pyplot()

    recall = [float(per_class[c]["recall"]) for c in classes]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(classes) + 2), 3.6))
    ax.bar(range(len(classes)), recall, color="tab:blue")
    ax.axhline(float(np.mean(recall)), color="tab:red", lw=1, label=f"mean {np.mean(recall):.3f}")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall on test")
    ax.legend(loc="lower right")
    return _save(fig, path)


def summarize(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Test accuracy, balanced accuracy, macro-F1 and loss, the per-class report
    and the confusion matrix."""
    from sklearn.metrics import log_loss

    from transferlab.train.selection import scores

    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    return {
        **{f"test_{name}": round(value, 5) for name, value in scores(y_true, y_pred).items()},
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


# --------------------------------------------------------------------------- calibration


def softmax_views(views: list[np.ndarray], temperature: float = 1.0) -> np.ndarray:
    """The mean over views (image, mirror image) of softmax(logits / T)."""
    out = np.zeros_like(views[0], dtype=np.float64)
    for z in views:
        z = np.asarray(z, np.float64) / temperature
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        out += e / e.sum(axis=1, keepdims=True)
    return out / len(views)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)).mean())


def fit_temperature(views: list[np.ndarray], y: np.ndarray) -> float:
    """The one scalar T > 0 that minimises the NLL of softmax(logits / T) on
    (validation) logits; searched on log T in [1/20, 20]."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: nll(softmax_views(views, float(np.exp(log_t))), y),
                             bounds=(-np.log(20.0), np.log(20.0)), method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x))


def _confidence_bins(probs: np.ndarray, y: np.ndarray, bins: int) -> list[tuple[float, float, float]]:
    """Per non-empty equal-width bin of top-1 confidence: (share of samples,
    accuracy, mean confidence)."""
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return [(float(m.mean()), float(correct[m].mean()), float(conf[m].mean()))
            for m in (which == b for b in range(bins)) if m.any()]


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over `bins` equal-width
    confidence bins weighted by their share of samples (Guo et al., 2017)."""
    return float(sum(share * abs(acc - conf) for share, acc, conf in _confidence_bins(probs, y, bins)))


def reliability_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 15) -> Path:
    """Accuracy against confidence per bin, one line per {label: (probs, y)}, with the diagonal."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for label, (probs, y) in curves.items():
        points = _confidence_bins(probs, y, bins)
        ece = expected_calibration_error(probs, y, bins)
        ax.plot([c for _, _, c in points], [a for _, a, _ in points], marker="o", label=f"{label} (ECE {ece:.3f})")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"reliability diagram, {bins} bins")
    ax.legend(loc="upper left")
    return _save(fig, path)


def evaluate_model(model, x: np.ndarray, y: np.ndarray, classes: list[str], batch_size: int, tta: str,
               x_val: np.ndarray | None = None, y_val: np.ndarray | None = None, calibrate: bool = True,
               desc: str = "evaluate test") -> dict:
    """The classifier on the test split under test-time augmentation `tta`
    (flip, none, or auto: flip where it lowers the validation NLL), with
    temperature scaling fitted on the validation split (`calibrate`, when there is
    one) and kept only where it lowers the validation NLL. Returns the summary
    (test accuracy and loss, per-class report, confusion matrix), the calibration
    figures (temperature, test ECE before and after), the single-view accuracy,
    the test-time augmentation used (`tta`), the probabilities and the model to
    log and register (test-time augmentation and temperature inside)."""
    import time

    from transferlab import tta as tta_

    logits = tta_.logits_model(model)
    has_val = y_val is not None and len(y_val) > 0
    chosen, choice, val_views = ("flip" if tta == "auto" else tta), {}, None
    if has_val and (calibrate or tta == "auto"):
        val_views = tta_.logit_views(logits, x_val, batch_size, chosen, "on val")
    if tta == "auto" and has_val:
        def val_nll(views):
            return nll(softmax_views(views, fit_temperature(views, y_val) if calibrate else 1.0), y_val)

        single, flipped = val_nll(val_views[:1]), val_nll(val_views)
        chosen = "flip" if flipped < single else "none"
        val_views = val_views if chosen == "flip" else val_views[:1]
        choice = {"val_nll_single_view": round(single, 5), "val_nll_flip": round(flipped, 5)}
    start = time.perf_counter()
    views = tta_.logit_views(logits, x, batch_size, chosen, desc)
    seconds = time.perf_counter() - start
    temperature, calibration = 1.0, {}
    if calibrate and has_val and (softmax_views(val_views).argmax(axis=1) == y_val).all():
        # every validation image right: the NLL falls as T -> 0, a temperature fitted on it means nothing
        before = nll(softmax_views(val_views), y_val)
        calibration = {"val_nll_before_calibration": round(before, 5), "val_nll": round(before, 5)}
    elif calibrate and has_val:
        fitted = fit_temperature(val_views, y_val)
        before, after = nll(softmax_views(val_views), y_val), nll(softmax_views(val_views, fitted), y_val)
        if after < before:
            temperature = fitted
        calibration = {"val_nll_before_calibration": round(before, 5), "val_nll": round(min(before, after), 5)}
    raw = softmax_views(views)
    probs = softmax_views(views, temperature)
    result = summarize(y, probs, classes)
    result.update(
        calibration, **choice,
        tta=chosen,
        temperature=round(temperature, 5),
        test_ece=round(expected_calibration_error(probs, y), 5),
        test_ece_before_calibration=round(expected_calibration_error(raw, y), 5),
        test_accuracy_before_calibration=round(float((raw.argmax(axis=1) == y).mean()), 5),
        test_accuracy_single_view=round(float((views[0].argmax(axis=1) == y).mean()), 5),
        probs=probs.astype(np.float32), raw_probs=raw, seconds=seconds,
        model=tta_.with_tta(model, chosen, temperature),
    )
    return result


# --------------------------------------------------------------------------- baseline

BASELINE_IMAGES = 5000  # training images the baseline fits on at most (seeded, stratified)
BASELINE_SIZE = 32  # pixels per side at most: larger images are shrunk first


def _pixels(x: np.ndarray, size: int, chunk: int = 512) -> np.ndarray:
    """uint8 images -> flattened pixels in [0, 1], shrunk to `size` per side if
    larger; a chunk of images at a time, so large images never sit in memory together."""
    from PIL import Image

    side = min(size, x.shape[1])
    out = np.empty((len(x), side * side * x.shape[3]), np.float32)
    for start in range(0, len(x), chunk):
        block = np.asarray(x[start:start + chunk])
        if x.shape[1] > size:
            block = np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
                              for img in block])
        out[start:start + len(block)] = block.reshape(len(block), -1) / 255.0
    return out


def pixel_baseline(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                   seed: int, class_weight: dict[int, float] | None = None) -> dict:
    """The trivial model beside ours: scikit-learn's logistic regression on the raw
    pixels (at most BASELINE_IMAGES training images, at most BASELINE_SIZE px a
    side), with the fine-tune's `class_weight` (class index -> loss weight; None:
    every class 1), so that on imbalanced classes it is not a majority vote.
    Transfer paid off when the model beats it by a wide margin."""
    import time
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from transferlab.data import Rows

    start = time.perf_counter()
    rows = np.arange(len(y_train))
    if len(rows) > BASELINE_IMAGES:
        counts = np.bincount(y_train)
        stratify = y_train if counts[counts > 0].min() >= 2 else None
        rows = np.sort(train_test_split(rows, train_size=BASELINE_IMAGES, random_state=seed, stratify=stratify)[0])
    clf = LogisticRegression(max_iter=200, class_weight=class_weight)
    with warnings.catch_warnings():  # 200 iterations are enough for a baseline
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(_pixels(Rows(x_train, rows), BASELINE_SIZE), y_train[rows])
    from transferlab.train.selection import scores

    predicted = clf.predict(_pixels(x_test, BASELINE_SIZE))
    return {**{f"baseline_test_{name}": round(value, 5) for name, value in scores(y_test, predicted).items()},
            "baseline_train_images": int(len(rows)),
            "baseline_seconds": round(time.perf_counter() - start, 2)}
