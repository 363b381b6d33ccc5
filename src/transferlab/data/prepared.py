"""data/prepared/: the arrays, class names and manifest the prepare stage writes
(atomically, val carved from train by a seeded split) and every later stage
reads back memory-mapped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferlab.data.arrays import Dataset, Rows, release, split_rows
from transferlab.errors import DataError
from transferlab.files import atomic_dir

SPLITS = ("train", "val", "test")


def write_prepared(ds: Dataset, out_dir: Path, val_fraction: float, seed: int, manifest: dict) -> dict:
    """Carve val from train (seeded) and write arrays + classes + manifest atomically."""
    if val_fraction > 0:
        train_rows, val_rows = split_rows(ds.y_train, val_fraction, seed)
    else:
        train_rows, val_rows = np.arange(len(ds.y_train)), np.arange(0)
    splits = {"train": (Rows(ds.x_train, train_rows), ds.y_train[train_rows]),
              "val": (Rows(ds.x_train, val_rows), ds.y_train[val_rows]),
              "test": (ds.x_test, ds.y_test)}
    manifest = dict(manifest)
    manifest.update(
        classes=ds.classes,
        counts={name: _counts(y, ds.classes) for name, (_, y) in splits.items()},
        totals={name: int(len(y)) for name, (_, y) in splits.items()},
        image_shape=list(ds.x_train.shape[1:]),
        skipped=ds.skipped,
        num_skipped=len(ds.skipped),
        ignored=ds.ignored[:1000],
        num_ignored=len(ds.ignored),
        duplicates=ds.duplicates[:1000],
        num_duplicates=len(ds.duplicates),
        classes_without_test_images=ds.untested,
    )
    with atomic_dir(out_dir) as tmp:
        for name, (x, y) in splits.items():
            _write_npy(tmp / f"x_{name}.npy", x)
            np.save(tmp / f"y_{name}.npy", y.astype(np.int64))
        (tmp / "classes.json").write_text(json.dumps(ds.classes, indent=1) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _counts(y: np.ndarray, classes: list[str]) -> dict[str, int]:
    n = np.bincount(y, minlength=len(classes))
    return {c: int(k) for c, k in zip(classes, n)}


def _write_npy(path: Path, x, chunk_bytes: int = 64 << 20) -> None:
    """`x` (an array, a memory map or `Rows` of one) into a .npy file, a chunk at
    a time: the file is written with plain writes and the source memory map's
    pages are released as they are read, so neither side grows the resident memory."""
    base, rows = (x.base, x.rows) if isinstance(x, Rows) else (x, None)
    n = len(base) if rows is None else len(rows)
    shape = (n, *base.shape[1:])
    step = max(1, chunk_bytes // max(1, int(np.prod(shape[1:])) * base.dtype.itemsize))
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": np.lib.format.dtype_to_descr(base.dtype), "fortran_order": False, "shape": shape})
        for start in range(0, n, step):
            if rows is None:
                block = base[start:start + step]
                lo, hi = start, start + len(block)
            else:
                index = rows[start:start + step]
                block = base[index]
                lo, hi = int(index.min()), int(index.max()) + 1
            fh.write(np.ascontiguousarray(block).tobytes())
            release(base, lo, hi)


@dataclass
class Prepared:
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    classes: list[str]
    manifest: dict


def load_prepared(out_dir: str | Path, mmap: bool = True) -> Prepared:
    out_dir = Path(out_dir)
    if not (out_dir / "manifest.json").exists():
        raise DataError(f"{out_dir}: no prepared data here; run `dvc repro prepare` first")
    mode = "r" if mmap else None
    x = {s: np.load(out_dir / f"x_{s}.npy", mmap_mode=mode) for s in SPLITS}
    y = {s: np.load(out_dir / f"y_{s}.npy") for s in SPLITS}
    classes = json.loads((out_dir / "classes.json").read_text())
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return Prepared(x, y, classes, manifest)
