"""Does a horizontal mirror keep the labels of this data set?

CIFAR-10's classes look the same in a mirror, so random flips double its
training images and test-time flips average two views. On handwritten symbols
or text a mirror changes the class (or makes an image no class has), and
training on flips teaches the model to confuse them. `finetune.augment.flip:
auto` and `evaluate.tta: auto` decide from the data: the head, trained on plain
images, classifies the validation images and their mirror images (the features
stage extracts pooled features of both: seconds). If its accuracy drops on the
mirrored ones, by more than MIN_DROP and beyond chance (a sign test on the
images the mirror changed), a mirror does not keep the labels, and both flips
stay off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CHECK_IMAGES = 2000  # at most this many validation images are mirrored (evenly spaced)
MIN_DROP = 0.02  # the accuracy a mirror may cost before it counts as changing labels


def sample(n: int) -> np.ndarray:
    """The validation rows the check mirrors: all of them, or CHECK_IMAGES
    evenly spaced (the split's order is seeded and stratified)."""
    if n <= CHECK_IMAGES:
        return np.arange(n)
    return np.linspace(0, n - 1, CHECK_IMAGES).round().astype(int)


@dataclass(frozen=True)
class MirrorCheck:
    images: int
    accuracy: float  # the head's on the plain images
    mirrored_accuracy: float  # on their mirror images
    lost: int  # right plain, wrong mirrored
    gained: int  # wrong plain, right mirrored

    @property
    def keeps_labels(self) -> bool:
        net = self.lost - self.gained
        return not (net > MIN_DROP * self.images and net > 2 * math.sqrt(self.lost + self.gained))

    def describe(self) -> str:
        verdict = "keeps the labels" if self.keeps_labels else "changes the labels"
        return (f"a mirror {verdict}: the head's validation accuracy {self.accuracy:.4f} on {self.images} "
                f"images, {self.mirrored_accuracy:.4f} on their mirror images")

    def record(self) -> dict:
        """The evidence, as metrics/head.json keeps it (mirror_*)."""
        return {"mirror_keeps_labels": int(self.keeps_labels), "mirror_check_images": self.images,
                "mirror_val_accuracy": round(self.accuracy, 5),
                "mirror_val_accuracy_mirrored": round(self.mirrored_accuracy, 5)}


def check(y: np.ndarray, plain_pred: np.ndarray, mirrored_pred: np.ndarray) -> MirrorCheck:
    """The check from the labels and the head's predictions on the plain and the
    mirrored images (the same rows, in order)."""
    right, right_mirrored = plain_pred == y, mirrored_pred == y
    return MirrorCheck(images=len(y), accuracy=float(right.mean()), mirrored_accuracy=float(right_mirrored.mean()),
                       lost=int((right & ~right_mirrored).sum()), gained=int((~right & right_mirrored).sum()))


def resolve(setting: bool | str, head_metrics: dict, what: str) -> tuple[bool, str]:
    """Whether to flip, and why, for `setting` (true, false or "auto") of
    `what` (the params key, for the log): auto follows the head's check in
    `head_metrics` (metrics/head.json); without one (no validation images), a
    mirror is taken to keep the labels."""
    if setting != "auto":
        return bool(setting), f"{what}: {str(setting).lower()}"
    keeps = head_metrics.get("mirror_keeps_labels")
    if keeps is None:
        return True, f"{what}: auto -> flips (no validation images to check a mirror on)"
    evidence = (f"the head's validation accuracy {head_metrics['mirror_val_accuracy']:.4f} plain, "
                f"{head_metrics['mirror_val_accuracy_mirrored']:.4f} mirrored")
    if keeps:
        return True, f"{what}: auto -> flips (a mirror keeps the labels: {evidence})"
    return False, f"{what}: auto -> no flips (a mirror changes the labels: {evidence})"
