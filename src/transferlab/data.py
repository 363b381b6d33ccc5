"""Data sources -> uint8 arrays, class names and a manifest.

Used by the prepare stage (`transferlab.stages.prepare`).

Sources, chosen by `data.source` and `data.format` in params.yaml:
- the canonical CIFAR-10 python archive from a URL: downloaded to a temporary
  name, checksum verified, then renamed into the cache; a bad download is deleted;
- a local archive (tar, tar.gz, zip) or directory in the canonical CIFAR-10 format;
- an image-folder tree, as a directory or an archive: train/<class>/... and
  test/<class>/..., or one folder of classes split by a seeded ratio.

CIFAR-10 pickles are unpickled only after the archive's checksum passes, and then
only through an unpickler that admits numpy arrays and plain containers.
"""

from __future__ import annotations

import io
import json
import logging
import mmap
import os
import pickle
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from transferlab.config import CIFAR10_MD5, CIFAR10_URL
from transferlab.files import atomic_dir, file_digest, tree_digest
from transferlab.redact import redact
from transferlab.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
FEW_IMAGES = 10  # a class with fewer training images than this gets a warning


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

    def close(self) -> None:
        """Remove the decoded images' scratch files (once written to data/prepared)."""
        for path in self.scratch:
            path.unlink(missing_ok=True)
        self.scratch = []


def verify_checksum(path: Path, checksum: str) -> None:
    algo, _, expected = checksum.partition(":")
    actual = file_digest(path, algo)
    if actual.lower() != expected.lower():
        raise DataError(
            f"{path}: {algo} checksum mismatch: expected {expected}, got {actual}. "
            "The file is corrupt or not the one params.yaml names; delete it and "
            "download it again, or fix data.checksum."
        )


# --------------------------------------------------------------------------- download


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file")


def _request(url: str) -> urllib.request.Request:
    """user:password@ in the URL becomes an HTTP Basic Authorization header."""
    import base64

    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    bare = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    userinfo = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    token = base64.b64encode(userinfo.encode()).decode()
    return urllib.request.Request(bare, headers={"Authorization": f"Basic {token}"})


def download(url: str, cache_dir: Path, checksum: str | None) -> Path:
    """Fetch `url` into `cache_dir`, verified; a cached copy that verifies is reused."""
    if checksum is None:
        raise DataError(
            f"{redact(url)}: downloads need data.checksum ('md5:<hex>' or 'sha256:<hex>') "
            "so that a corrupt or substituted file is never used"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = cache_dir / name
    if dest.exists():
        try:
            verify_checksum(dest, checksum)
            log.info("using cached %s", dest)
            return dest
        except DataError:
            log.warning("cached %s fails its checksum; downloading again", dest)
            dest.unlink()
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        try:
            response = urllib.request.urlopen(_request(url), timeout=60)
        except OSError as exc:
            raise DataError(
                f"could not download {redact(url)}: {redact(str(exc))}. On an offline machine, copy "
                f"the file to {dest} or set data.source to a local path."
            ) from exc
        with response, os.fdopen(fd, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {name}", disable=None) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
        verify_checksum(tmp, checksum)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# --------------------------------------------------------------------------- archives


def is_archive(path: Path) -> bool:
    return path.is_file() and (tarfile.is_tarfile(path) or zipfile.is_zipfile(path))


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract `archive` into `dest`, refusing members that would land outside it."""
    dest.mkdir(parents=True, exist_ok=True)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            try:
                # The "data" filter refuses absolute paths, "..", links that escape
                # and device files; check every member before writing any.
                for member in tar.getmembers():
                    if member.name.startswith(("/", "\\")) or Path(member.name).is_absolute():
                        # the data filter would strip the slash; an absolute path is refused
                        raise tarfile.AbsolutePathError(member)
                    tarfile.data_filter(member, str(dest))
            except tarfile.FilterError as exc:
                raise DataError(
                    f"{archive}: refusing to extract: {exc}. The archive has a member "
                    "that would be written outside the target folder; rebuild it with "
                    "relative paths."
                ) from exc
            tar.extractall(dest, filter="data")
        return
    if zipfile.is_zipfile(archive):
        root = dest.resolve()
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = (dest / info.filename).resolve()
                if info.filename.startswith(("/", "\\")) or not target.is_relative_to(root):
                    raise DataError(
                        f"{archive}: refusing to extract member {info.filename!r}: it would "
                        "be written outside the target folder; rebuild the zip with relative paths."
                    )
            zf.extractall(dest)
        return
    raise DataError(f"{archive}: not a tar or zip archive")


def extract_cached(archive: Path, cache_dir: Path, digest: str) -> Path:
    """Extract once per archive content; a half-done extraction is never reused."""
    dest = cache_dir / "extracted" / digest[:16]
    if (dest / ".complete").exists():
        return dest
    log.info("extracting %s", archive)
    with atomic_dir(dest) as tmp:
        safe_extract(archive, tmp)
        (tmp / ".complete").touch()
    return dest


# --------------------------------------------------------------------------- CIFAR-10


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


def _load_batch(path: Path) -> dict:
    with open(path, "rb") as fh:
        try:
            return _ArrayUnpickler(fh, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                IndexError) as exc:
            raise DataError(f"{path}: not a valid CIFAR-10 batch: {exc}") from exc


def find_cifar10_root(root: Path) -> Path | None:
    hits = sorted(root.rglob("data_batch_1"))
    return hits[0].parent if hits else None


def load_cifar10(root: Path) -> Dataset:
    """Read the canonical python batches (data_batch_1..5, test_batch, batches.meta)."""
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
            xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    train_files = sorted(root.glob("data_batch_*"))
    test_file = root / "test_batch"
    if not test_file.exists():
        raise DataError(f"{test_file}: missing from the CIFAR-10 folder {root}")
    x_train, y_train = read(train_files)
    x_test, y_test = read([test_file])
    return Dataset(x_train, y_train, x_test, y_test, classes)


# --------------------------------------------------------------------------- image folders


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


def decode_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(img)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


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


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


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


def _gather(split_dir: Path, classes: list[str], ignored: list[str]) -> list[tuple[Path, int]]:
    items = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        items += [(p, label) for p in image_files(class_dir, ignored)]
    return items


def _descend_single_wrapper(root: Path) -> Path:
    """An archive often wraps everything in one top folder; a classifier needs at
    least two classes, so a lone folder is a wrapper: look inside it."""
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name in ("train", "test"):
            return root
        root = entries[0]


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


# --------------------------------------------------------------------------- splits and outputs


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


def resize_array(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[1:3] == (size, size):
        return x
    out = np.empty((len(x), size, size, 3), np.uint8)
    for i, img in enumerate(x):
        out[i] = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
    return out


def resolve_source(source: str, cache_dir: Path, checksum: str | None) -> tuple[Path, str]:
    """A local path for `source` (downloading a URL), plus a checksum describing it."""
    if is_url(source):
        if checksum is None and source == CIFAR10_URL:
            checksum = f"md5:{CIFAR10_MD5}"
        path = download(source, cache_dir / "downloads", checksum)
        return path, checksum or ""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"{path}: data.source does not exist. Point data.source in params.yaml at an "
            "archive or folder of images, or at the CIFAR-10 URL on a machine with internet."
        )
    if path.is_dir():
        return path, f"sha256:{tree_digest(path)}"
    if checksum is not None:
        verify_checksum(path, checksum)
        return path, checksum
    return path, f"sha256:{file_digest(path)}"


def load_source(
    source: str, fmt: str, cache_dir: Path, checksum: str | None, image_size: int,
    test_fraction: float, seed: int,
) -> tuple[Dataset, str]:
    path, digest = resolve_source(source, cache_dir, checksum)
    root = path
    if path.is_file():
        if not is_archive(path):
            raise DataError(f"{path}: not a directory, tar or zip archive")
        root = extract_cached(path, cache_dir, digest.split(":", 1)[1])
    cifar_root = find_cifar10_root(root) if fmt in ("auto", "cifar10") else None
    if fmt == "cifar10" and cifar_root is None:
        raise DataError(f"{path}: data.format is cifar10 but no data_batch_1 was found inside")
    if cifar_root is not None:
        if path.is_file() and checksum is None and not digest.endswith(CIFAR10_MD5):
            # The archive is unverified: its pickles could be anything.
            known = file_digest(path, "md5")
            if known != CIFAR10_MD5:
                raise DataError(
                    f"{path}: a CIFAR-10 python archive is unpickled only after its checksum "
                    f"passes; its md5 {known} is not the canonical {CIFAR10_MD5}. Set "
                    "data.checksum to the archive's checksum if you trust this file."
                )
        ds = load_cifar10(cifar_root)
        if image_size != 32:
            ds.x_train = resize_array(ds.x_train, image_size)
            ds.x_test = resize_array(ds.x_test, image_size)
        return ds, digest
    return load_image_folder(root, image_size, test_fraction, seed, cache_dir / "decoded"), digest


def _counts(y: np.ndarray, classes: list[str]) -> dict[str, int]:
    n = np.bincount(y, minlength=len(classes))
    return {c: int(k) for c, k in zip(classes, n)}


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
    )
    with atomic_dir(out_dir) as tmp:
        for name, (x, y) in splits.items():
            _write_npy(tmp / f"x_{name}.npy", x)
            np.save(tmp / f"y_{name}.npy", y.astype(np.int64))
        (tmp / "classes.json").write_text(json.dumps(ds.classes, indent=1) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


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
    x = {s: np.load(out_dir / f"x_{s}.npy", mmap_mode=mode) for s in ("train", "val", "test")}
    y = {s: np.load(out_dir / f"y_{s}.npy") for s in ("train", "val", "test")}
    classes = json.loads((out_dir / "classes.json").read_text())
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return Prepared(x, y, classes, manifest)


def cifar10_batch_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    """One canonical-format batch (for tests and for writing small fixtures)."""
    data = x.transpose(0, 3, 1, 2).reshape(len(x), -1)
    buf = io.BytesIO()
    pickle.dump({b"data": data, b"labels": [int(v) for v in y]}, buf, protocol=2)
    return buf.getvalue()
