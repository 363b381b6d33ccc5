"""An image-folder tree -> a `Dataset`: train/<class>/... and test/<class>/...,
or one folder of classes split by a seeded ratio.

Any PIL mode becomes 8-bit RGB at the configured size. Images are decoded in
parallel straight into memory-mapped files (a few in memory at a time, never
the data set); files that do not decode are skipped and listed, files that are
not images are listed as ignored.
"""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from transferlab.data.arrays import Dataset, Rows, split_rows
from transferlab.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
FEW_IMAGES = 10  # a class with fewer training images than this gets a warning


def load_image_folder(root: Path, image_size: int, test_fraction: float, seed: int,
                      scratch_dir: Path | None = None) -> Dataset:
    """The images of a folder, decoded into memory-mapped files under
    `scratch_dir` (default: a temporary folder; `Dataset.close` removes them)."""
    if scratch_dir is None:
        scratch_dir = Path(tempfile.mkdtemp(prefix="transferlab-decoded-"))
    root = _descend_single_wrapper(root)
    ignored: list[str] = []
    skipped: list[dict] = []
    has_split = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if has_split else root
    classes = [p.name for p in _class_dirs(train_root)]
    if not classes:
        raise DataError(
            f"{train_root}: no class folders found. Expected train/<class>/<image> and "
            "test/<class>/<image>, or <class>/<image> to be split by data.test_fraction."
        )
    if has_split:
        test_classes = [p.name for p in _class_dirs(root / "test")]
        extra = sorted(set(test_classes) - set(classes))
        if extra:
            raise DataError(
                f"{root / 'test'}: classes {extra} are in the test split but not in "
                f"{root / 'train'}; add training images for them or remove them from test/"
            )
    train_items = _gather(train_root, classes, ignored)
    counts = {c: 0 for c in classes}
    for _, label in train_items:
        counts[classes[label]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DataError(
            f"{train_root}: class folder(s) {empty} hold no images. Add images or remove "
            "the folder(s); an empty class would add an output unit that can never be learned."
        )
    scratch = [_scratch(scratch_dir, "train")]
    x_train, y_train = _decode_all(train_items, image_size, "decode train", skipped, root, scratch[0])
    if has_split:
        test_items = _gather(root / "test", classes, ignored)
        scratch.append(_scratch(scratch_dir, "test"))
        x_test, y_test = _decode_all(test_items, image_size, "decode test", skipped, root, scratch[1])
    else:
        x_test, y_test = x_train, y_train  # the rows split off below, without copying them
        train_rows, test_rows = split_rows(y_train, test_fraction, seed)
        y_train, y_test = y_train[train_rows], y_test[test_rows]
        x_train, x_test = Rows(x_train, train_rows), Rows(x_test, test_rows)
    decoded = np.bincount(y_train, minlength=len(classes))
    lost = [classes[i] for i, n in enumerate(decoded) if n == 0]
    if lost:
        raise DataError(
            f"{train_root}: no image of class(es) {lost} could be decoded; see the skipped "
            "files in the manifest and replace them"
        )
    for name, n in zip(classes, decoded):
        if n < FEW_IMAGES:
            log.warning("class %r has only %d training images; results for it will be noisy", name, n)
    if skipped:
        log.warning("skipped %d file(s) that could not be decoded; listed in the manifest", len(skipped))
    return Dataset(x_train, y_train, x_test, y_test, classes, skipped, ignored, scratch)


def decode_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(img)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit and 32-bit gray are scaled, not clipped)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0 if arr.max() <= 1.0 else arr, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Composite on white rather than dropping alpha, so transparent areas
        # do not turn into whatever colour the hidden pixels had.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def image_files(folder: Path, ignored: list[str] | None = None) -> list[Path]:
    """The image files under `folder`, walked recursively in sorted order; hidden
    files and folders are skipped, symbolic links to folders not followed. Files
    that are not images are appended to `ignored`."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                if ignored is not None:
                    ignored.append(str(path))
                continue
            files.append(path)
    return files


def _descend_single_wrapper(root: Path) -> Path:
    """An archive often wraps everything in one top folder; a classifier needs at
    least two classes, so a lone folder is a wrapper: look inside it."""
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name in ("train", "test"):
            return root
        root = entries[0]


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _gather(split_dir: Path, classes: list[str], ignored: list[str]) -> list[tuple[Path, int]]:
    items = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        items += [(p, label) for p in image_files(class_dir, ignored)]
    return items


def _decode_all(
    items: list[tuple[Path, int]], size: int, desc: str, skipped: list[dict], root: Path, scratch: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode `items` into a file of rows at `scratch` as they come (a few images
    in memory at a time, never the data set), and return it as a read-only
    memory map with the labels of the images that decoded."""
    def work(item: tuple[Path, int]):
        path, label = item
        try:
            return decode_image(path, size), label, None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return None, label, f"{type(exc).__name__}: {exc}"

    ys = []
    with open(scratch, "wb") as fh, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(work, items, chunksize=64)  # in order, a bounded number ahead
        for (path, _), (arr, label, error) in tqdm(
            zip(items, results), total=len(items), desc=desc, unit="img", mininterval=2, disable=None
        ):
            if error is not None:
                skipped.append({"file": str(path.relative_to(root)), "reason": error})
                continue
            fh.write(arr.tobytes())
            ys.append(label)
    if not ys:
        scratch.unlink(missing_ok=True)
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int64)
    return np.memmap(scratch, dtype=np.uint8, mode="r", shape=(len(ys), size, size, 3)), np.asarray(ys, np.int64)


def _scratch(folder: Path, name: str) -> Path:
    """A file for decoded rows under `folder`, named by this process; files that
    a killed process left there are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.u8"):
        pid = stale.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    return folder / f"{os.getpid()}-{name}.u8"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
