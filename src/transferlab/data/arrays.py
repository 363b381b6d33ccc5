"""Decoded images as arrays: the `Dataset` a source yields, seeded splits, `Rows`
(a split that is not copied) and `release` (memory-mapped rows read or written
once leave resident memory)."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)  # files behind memory-mapped arrays
    # groups of identical files under two classes or in both splits (data.folders.find_duplicates)
    duplicates: list[dict] = field(default_factory=list)
    untested: list[str] = field(default_factory=list)  # classes with no test image
    content_digest: str = ""  # of the decoded files' bytes, split by split, in row order ("": not computed)

    def close(self) -> None:
        """Remove the decoded images' scratch files (once written to data/prepared)."""
        for path in self.scratch:
            path.unlink(missing_ok=True)
        self.scratch = []


def stratified_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Seeded split, stratified when every class has at least two members."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    n_held = int(round(len(y) * fraction))
    stratify = y if counts[counts > 0].min() >= 2 and n_held >= len(counts[counts > 0]) else None
    return train_test_split(x, y, test_size=fraction, random_state=seed, stratify=stratify)


def split_rows(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`stratified_split` of the row numbers: (kept rows, held-out rows), each sorted."""
    kept, held, _, _ = stratified_split(np.arange(len(y)), y, fraction, seed)
    return np.sort(kept), np.sort(held)


class Rows:
    """Some rows of an array or memory map, read only when indexed (a split of
    a data set that is not copied)."""

    def __init__(self, x: np.ndarray, rows: np.ndarray):
        self.base = x.base if isinstance(x, Rows) else x
        self.rows = x.rows[rows] if isinstance(x, Rows) else np.asarray(rows)
        self.shape = (len(self.rows), *self.base.shape[1:])
        self.dtype = self.base.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.base[self.rows[index]]

    def __array__(self, dtype=None, copy=None):
        out = self.base[self.rows]
        return out if dtype is None else out.astype(dtype)


def release(x: np.ndarray, start: int, stop: int) -> None:
    """Drop rows [start, stop) of a memory map from this process's resident
    memory (the data stays in the file and the page cache; written rows are
    flushed first), so reading or writing a large array from start to end keeps
    the peak RSS flat. Anything else (an array, a view) is left alone."""
    mm = x.base if isinstance(x, np.memmap) else None  # a view's base is its parent array, not a mapping
    if not isinstance(mm, mmap.mmap) or stop <= start:
        return
    row = int(np.prod(x.shape[1:])) * x.itemsize
    lead = x.offset % mmap.ALLOCATIONGRANULARITY  # where the array starts inside the mapping
    first = lead + start * row
    first -= first % mmap.PAGESIZE
    last = min(lead + stop * row, len(mm))
    if last > first:
        if x.mode != "r":
            mm.flush(first, last - first)  # written rows to the file first
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)
