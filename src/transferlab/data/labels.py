"""Labels from a CSV file -> a `Dataset`: one row per image, a path column and a
label column, and optionally a split column.

    path,label,split
    images/0001.jpg,scratch,train
    /data/more/0002.png,dent,test

- path: relative to the CSV file's folder, or absolute (column `path`, `file`,
  `filename`, `image` or `filepath`);
- label: any text; the classes are the labels of the training rows, sorted
  (column `label`, `class`, `category` or `target`);
- split (optional): `train` or `test`; `val`/`valid`/`validation` rows train too
  (the validation split is carved from train by data.val_fraction). Without the
  column, the test split is drawn by data.test_fraction with the seed.

The checks of an image folder apply (`folders.decode_items`): a missing or
undecodable file is skipped and listed, a class none of whose images decodes
is an error, few images, no test images and identical files are named.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from transferlab.data.arrays import Dataset
from transferlab.data.folders import decode_items
from transferlab.errors import DataError

PATH_COLUMNS = ("path", "file", "filename", "image", "filepath")
LABEL_COLUMNS = ("label", "class", "category", "target")
SPLITS = {"train": "train", "test": "test", "val": "train", "valid": "train", "validation": "train"}


def load_csv(path: Path, image_size: int, test_fraction: float, seed: int, scratch_dir: Path) -> tuple[Dataset, str]:
    """The images a CSV file lists, and a digest of what was read: the CSV's
    bytes and every decoded image's."""
    rows = _read(path)
    train = [(file, label) for file, label, split in rows if split == "train"]
    test = [(file, label) for file, label, split in rows if split == "test"]
    classes = sorted({label for _, label in train})
    if not classes:
        raise DataError(f"{path}: no training rows. List images with a label (and a split of train or test)")
    extra = sorted({label for _, label in test} - set(classes))
    if extra:
        raise DataError(f"{path}: labels {extra} are in test rows but in no train row; add training images "
                        "for them or remove their test rows")
    index = {name: i for i, name in enumerate(classes)}
    has_split = any(split != "train" for _, _, split in rows)
    ds = decode_items(path.parent, classes, [(f, index[label]) for f, label in train],
                      [(f, index[label]) for f, label in test] if has_split else None,
                      image_size, test_fraction, seed, scratch_dir)
    digest = hashlib.sha256(path.read_bytes() + ds.content_digest.encode()).hexdigest()
    return ds, f"sha256:{digest}"


def _read(path: Path) -> list[tuple[Path, str, str]]:
    """(image path, label, split) per row; errors name the line and the fix."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = {name.strip().lower(): name for name in reader.fieldnames or []}
        path_col = next((header[c] for c in PATH_COLUMNS if c in header), None)
        label_col = next((header[c] for c in LABEL_COLUMNS if c in header), None)
        if path_col is None or label_col is None:
            raise DataError(
                f"{path}: expected a header with a path column ({', '.join(PATH_COLUMNS)}) and a label column "
                f"({', '.join(LABEL_COLUMNS)}), and optionally split; found: {reader.fieldnames}"
            )
        split_col = header.get("split")
        rows = []
        for line, row in enumerate(reader, start=2):
            file, label = (row.get(path_col) or "").strip(), (row.get(label_col) or "").strip()
            split = (row.get(split_col) or "train").strip().lower() if split_col else "train"
            if not file or not label:
                raise DataError(f"{path}, line {line}: a row needs both a path and a label; received {row}")
            if split not in SPLITS:
                raise DataError(f"{path}, line {line}: split {split!r} is not one of {sorted(SPLITS)}")
            image = Path(file).expanduser()
            rows.append((image if image.is_absolute() else path.parent / image, label, SPLITS[split]))
    return rows
