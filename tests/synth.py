"""Tiny synthetic data sets the tests make themselves (no download, no ../shared)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["circle", "square", "stripes"]


def class_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Three visually distinct patterns, with noise, so a head can learn them."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.float64)
    yy, xx = np.mgrid[:size, :size]
    if label == 0:
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
        img[mask] += [180, 40, 40]
    elif label == 1:
        a, b = size // 4, 3 * size // 4
        img[a:b, a:b] += [40, 180, 40]
    else:
        img[(xx // 4) % 2 == 0] += [40, 40, 180]
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: int = 8, test_per_class: int = 4, seed: int = 0,
                      split: bool = True, size: int = 32, ext: str = ".png") -> Path:
    rng = np.random.default_rng(seed)
    for split_name, n in ([("train", per_class), ("test", test_per_class)] if split else [("", per_class)]):
        for label, name in enumerate(CLASSES):
            d = root / split_name / name if split_name else root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(class_image(label, rng, size)).save(d / f"{i:04d}{ext}")
    return root


def cifar10_batch_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    """One batch in the canonical CIFAR-10 format: rows of 3x32x32, channel first."""
    data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    buf = io.BytesIO()
    pickle.dump({b"data": data, b"labels": [int(v) for v in y]}, buf, protocol=2)
    return buf.getvalue()


def make_cifar10_archive(path: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """A canonical-format CIFAR-10 python archive in miniature."""
    rng = np.random.default_rng(seed)

    def batch(n):
        y = rng.integers(0, len(CLASSES), n)
        x = np.stack([class_image(int(label), rng) for label in y])
        return cifar10_batch_bytes(x, y)

    members = {f"cifar-10-batches-py/data_batch_{i}": batch(n_train // 2) for i in (1, 2)}
    members["cifar-10-batches-py/test_batch"] = batch(n_test)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps(
        {b"label_names": [c.encode() for c in CLASSES]}, protocol=2
    )
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path
