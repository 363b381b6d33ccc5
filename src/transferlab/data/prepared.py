"""data/prepared/: the arrays, class names and manifest the prepare stage writes
(atomically, val carved from train by a seeded split) and every later stage
reads back memory-mapped."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferlab.data.arrays import Dataset, Rows, release, split_rows
from transferlab.errors import DataError
from transferlab.files import atomic_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def write_prepared(ds: Dataset, out_dir: Path, val_fraction: float, seed: int, manifest: dict,
                   val_min_per_class: int = 0) -> dict:
    """Carve val from train (seeded, stratified, at least `val_min_per_class` of
    a class where it keeps as many: `val_floor`) and write arrays + classes +
    manifest atomically."""
    if val_fraction > 0:
        train_rows, val_rows = split_rows(ds.y_train, val_fraction, seed)
        train_rows, val_rows = val_floor(ds.y_train, train_rows, val_rows, val_min_per_class, seed)
    else:
        train_rows, val_rows = np.arange(len(ds.y_train)), np.arange(0)
    val_counts = np.bincount(ds.y_train[val_rows], minlength=len(ds.classes))
    # a class with fewer than two validation images cannot be told apart from luck by any selection
    unvalidated = [c for c, k in zip(ds.classes, val_counts) if k < 2] if val_fraction > 0 else []
    if unvalidated:
        log.warning("prepare: %d class(es) have fewer than 2 validation images, too few to validate: %s; "
                    "add images of them, or raise data.val_fraction", len(unvalidated), ", ".join(unvalidated[:20]))
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
        classes_too_small_to_validate=unvalidated,
    )
    with atomic_dir(out_dir) as tmp:
        for name, (x, y) in splits.items():
            _write_npy(tmp / f"x_{name}.npy", x)
            np.save(tmp / f"y_{name}.npy", y.astype(np.int64))
        (tmp / "classes.json").write_text(json.dumps(ds.classes, indent=1) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def val_floor(y: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray, floor: int,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Move seeded rows of a class from train to val until val holds `floor` of
    it, or half of the class (it keeps at least as many to train on). A
    proportional split leaves a rare class a handful of validation images, and
    early stopping and the best epoch would then be chosen on those."""
    rng = np.random.default_rng(seed)
    train_rows, moved = np.asarray(train_rows), []
    for c in np.unique(y):
        in_train = train_rows[y[train_rows] == c]
        have = int(np.sum(y[val_rows] == c))
        want = min(floor, (len(in_train) + have) // 2)
        if want > have:
            moved.append(rng.choice(in_train, want - have, replace=False))
    if not moved:
        return train_rows, val_rows
    moved = np.concatenate(moved)
    return np.setdiff1d(train_rows, moved), np.sort(np.concatenate([val_rows, moved]))


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
