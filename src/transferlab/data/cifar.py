"""The canonical CIFAR-10 python batches (data_batch_1..5, test_batch,
batches.meta) -> a `Dataset`.

The batches are pickles: they are read only after the archive's checksum passes
(`transferlab.data.sources`), and then only through an unpickler that admits
numpy arrays and plain containers, so a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.data.arrays import Dataset
from transferlab.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
NATIVE_SIZE = 32


def find_cifar10_root(root: Path) -> Path | None:
    hits = sorted(root.rglob("data_batch_1"))
    return hits[0].parent if hits else None


def load_cifar10(root: Path, image_size: int = NATIVE_SIZE) -> Dataset:
    """Read the canonical python batches, resized to `image_size` when it is not 32."""
    meta_path = root / "batches.meta"
    if not meta_path.exists():
        raise DataError(f"{meta_path}: missing; a canonical CIFAR-10 folder has batches.meta")
    meta = _load_batch(meta_path)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[b"label_names"]]

    def read(names: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for path in names:
            batch = _load_batch(path)
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            xs.append(data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    train_files = sorted(root.glob("data_batch_*"))
    test_file = root / "test_batch"
    if not test_file.exists():
        raise DataError(f"{test_file}: missing from the CIFAR-10 folder {root}")
    x_train, y_train = read(train_files)
    x_test, y_test = read([test_file])
    return Dataset(_resize(x_train, image_size), y_train, _resize(x_test, image_size), y_test, classes)


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[1:3] == (size, size):
        return x
    out = np.empty((len(x), size, size, 3), np.uint8)
    for i, img in enumerate(x):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    return out


def _load_batch(path: Path) -> dict:
    with open(path, "rb") as fh:
        try:
            return _ArrayUnpickler(fh, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                IndexError) as exc:
            raise DataError(f"{path}: not a valid CIFAR-10 batch: {exc}") from exc


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10 batches contain: numpy arrays and plain containers."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Protocol 2 writes Python 3 bytes as _codecs.encode(str, "latin1"). Any other
    codec name would make Python import a codec module, so it is refused."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode(..., {encoding!r}) in a data file")
    return text.encode("latin1")
