"""An image-folder tree -> a `Dataset`: train/<class>/... and test/<class>/...,
or one folder of classes split by a seeded ratio.

Any PIL mode becomes 8-bit RGB at the configured size, turned upright by its
EXIF orientation (as a phone's photo is shown). Images are decoded in parallel
straight into memory-mapped files (a few in memory at a time, never the data
set); files that do not decode are skipped and listed, files that are not
images are listed as ignored. What a model would learn wrongly from is named:
identical files under two classes or in both splits (`Dataset.duplicates`), a
class with no test images (`Dataset.untested`); a class folder that links to
another class's folder is refused.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from transferlab.data.arrays import Dataset, Rows, split_rows
from transferlab.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
FEW_IMAGES = 10  # a class with fewer training images than this gets a warning
AUTO_MAX_SIZE = 224  # data.image_size: auto stores images at their median shorter side, at most this
AUTO_SAMPLE = 500  # images whose headers auto reads (evenly spaced)


def load_image_folder(root: Path, image_size: int, test_fraction: float, seed: int,
                      scratch_dir: Path | None = None) -> Dataset:
    """The images of a folder, decoded into memory-mapped files under
    `scratch_dir` (default: a temporary folder; `Dataset.close` removes them)."""
    if scratch_dir is None:
        scratch_dir = Path(tempfile.mkdtemp(prefix="transferlab-decoded-"))
    root = _descend_single_wrapper(root)
    ignored: list[str] = []
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
    for split_dir in [train_root, root / "test"] if has_split else [train_root]:
        _refuse_linked_classes(split_dir)
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
    test_items = _gather(root / "test", classes, ignored) if has_split else None
    return decode_items(root, classes, train_items, test_items, image_size, test_fraction, seed, scratch_dir,
                        ignored)


def decode_items(root: Path, classes: list[str], train_items: list[tuple[Path, int]],
                 test_items: list[tuple[Path, int]] | None, image_size: int, test_fraction: float, seed: int,
                 scratch_dir: Path, ignored: list[str] | None = None) -> Dataset:
    """(file, label) pairs -> a `Dataset`: decoded into memory-mapped files under
    `scratch_dir`, the test split by `test_fraction` (seeded) where `test_items`
    is None, files named relative to `root` in what is reported. The checks of
    every source of files: classes none of whose images decodes (an error), few
    images, no test images, identical files (module docstring)."""
    skipped: list[dict] = []
    if image_size == "auto":
        image_size = native_size([path for path, _ in [*train_items, *(test_items or [])]])
    scratch = [_scratch(scratch_dir, "train")]
    x_train, y_train, files_train = _decode_all(train_items, image_size, "decode train", skipped, root, scratch[0])
    if test_items is not None:
        scratch.append(_scratch(scratch_dir, "test"))
        x_test, y_test, files_test = _decode_all(test_items, image_size, "decode test", skipped, root, scratch[1])
    else:
        x_test, y_test = x_train, y_train  # the rows split off below, without copying them
        train_rows, test_rows = split_rows(y_train, test_fraction, seed)
        y_train, y_test = y_train[train_rows], y_test[test_rows]
        x_train, x_test = Rows(x_train, train_rows), Rows(x_test, test_rows)
        files_train, files_test = [files_train[i] for i in train_rows], [files_train[i] for i in test_rows]
    decoded = np.bincount(y_train, minlength=len(classes))
    lost = [classes[i] for i, n in enumerate(decoded) if n == 0]
    if lost:
        raise DataError(
            f"{root}: no training image of class(es) {lost} could be decoded; see the skipped "
            "files in the manifest and replace them"
        )
    for name, n in zip(classes, decoded):
        if n < FEW_IMAGES:
            log.warning("class %r has only %d training images; results for it will be noisy", name, n)
    if skipped:
        log.warning("skipped %d file(s) that could not be decoded; listed in the manifest", len(skipped))
    untested = [classes[i] for i, n in enumerate(np.bincount(y_test, minlength=len(classes))) if n == 0]
    if untested:
        log.warning("class(es) %s have no test images: their test accuracy cannot be measured. Add test images "
                    "(or, without a test split, raise data.test_fraction)", untested)
    duplicates = find_duplicates({"train": (files_train, y_train), "test": (files_test, y_test)}, classes)
    if duplicates:
        first = duplicates[0]
        log.warning("%d group(s) of identical files under two classes or in both train and test (a label that "
                    "contradicts another, or a test image the model trained on), listed in the manifest under "
                    "duplicates; the first: %s", len(duplicates), ", ".join(first["files"]))
    content = hashlib.sha256("".join(f"{d}{s}" for s, files in (("train", files_train), ("test", files_test))
                                      for _, d in files).encode()).hexdigest()
    return Dataset(x_train, y_train, x_test, y_test, classes, skipped, list(ignored or []), scratch, duplicates,
                   untested, content)


def find_duplicates(splits: dict[str, tuple[list[tuple[str, str]], np.ndarray]], classes: list[str]) -> list[dict]:
    """Groups of files with the same bytes under two classes or in two splits.
    `splits`: {split: ([(file, content digest)] per decoded row, labels)}."""
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for split, (files, y) in splits.items():
        for (file, digest), label in zip(files, y):
            groups.setdefault(digest, []).append((file, split, classes[int(label)]))
    found = []
    for members in groups.values():
        labels, in_splits = sorted({c for _, _, c in members}), sorted({s for _, s, _ in members})
        if len(labels) > 1 or len(in_splits) > 1:
            found.append({"files": [f for f, _, _ in members], "classes": labels, "splits": in_splits})
    return sorted(found, key=lambda g: g["files"])


def decode_image(path: Path | io.BytesIO, size: int) -> np.ndarray:
    """An image file (or its bytes) -> uint8 RGB, `size` x `size`, upright by
    its EXIF orientation."""
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(ImageOps.exif_transpose(img))
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


def _refuse_linked_classes(split_dir: Path) -> None:
    """A class folder that is a link to another class's folder would make the
    same images two classes: refused, naming both. (A link to a folder outside
    the tree is a class like any other.)"""
    dirs = _class_dirs(split_dir)
    real = {p.resolve(): p for p in dirs if not p.is_symlink()}
    for p in dirs:
        if p.is_symlink() and p.resolve() in real:
            raise DataError(
                f"{p}: class folder {p.name!r} is a link to the class folder {real[p.resolve()].name!r}, so the "
                "same images would be two classes. Remove the link, or give the class its own images"
            )


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


def native_size(paths: list[Path]) -> int:
    """data.image_size: auto: the median shorter side of the images (AUTO_SAMPLE
    of them, evenly spaced, read from their headers only), at most AUTO_MAX_SIZE
    and at least 8: a folder of 32-px images stays 32 px, one of 128-px images
    keeps the details a 32-px copy would lose, and photos of any size are stored
    at AUTO_MAX_SIZE, above the backbones' input sizes, not at their own."""
    sides = []
    for i in np.unique(np.linspace(0, len(paths) - 1, min(len(paths), AUTO_SAMPLE)).round().astype(int)):
        try:
            with Image.open(paths[i]) as image:
                sides.append(min(image.size))  # EXIF orientation turns, never changes, the shorter side
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # decoding lists it with its reason
    size = int(np.clip(np.median(sides), 8, AUTO_MAX_SIZE)) if sides else AUTO_MAX_SIZE
    log.info("data.image_size: auto -> %d px (the median shorter side of %d images, at most %d)",
             size, len(sides), AUTO_MAX_SIZE)
    return size


def _decode_all(
    items: list[tuple[Path, int]], size: int, desc: str, skipped: list[dict], root: Path, scratch: Path,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Decode `items` into a file of rows at `scratch` as they come (a few images
    in memory at a time, never the data set), and return it as a read-only
    memory map with the labels of the images that decoded and, for each, its
    file (relative to `root`) and a digest of its bytes."""
    def work(item: tuple[Path, int]):
        path, label = item
        try:
            content = path.read_bytes()
            digest = hashlib.blake2b(content, digest_size=16).hexdigest()
            return decode_image(io.BytesIO(content), size), label, digest
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return None, label, f"{type(exc).__name__}: {exc}"

    ys, files = [], []
    with open(scratch, "wb") as fh, ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(work, items, chunksize=64)  # in order, a bounded number ahead
        for (path, _), (arr, label, detail) in tqdm(
            zip(items, results), total=len(items), desc=desc, unit="img", mininterval=2, disable=None
        ):
            if arr is None:
                skipped.append({"file": _name(path, root), "reason": detail})
                continue
            fh.write(arr.tobytes())
            ys.append(label)
            files.append((_name(path, root), detail))
    if not ys:
        scratch.unlink(missing_ok=True)
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int64), []
    return (np.memmap(scratch, dtype=np.uint8, mode="r", shape=(len(ys), size, size, 3)), np.asarray(ys, np.int64),
            files)


def _name(path: Path, root: Path) -> str:
    """`path` as reported: relative to `root` where it is inside it."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


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
