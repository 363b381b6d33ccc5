"""`data.source` -> a `Dataset` and a checksum describing what was read.

Sources, chosen by `data.source` and `data.format` in params.yaml:
- the canonical CIFAR-10 python archive from a URL: downloaded to a temporary
  name, checksum verified, then renamed into the cache; a bad download is deleted;
- a local archive (tar, tar.gz, zip) or directory in the canonical CIFAR-10 format;
- an image-folder tree, as a directory or an archive: train/<class>/... and
  test/<class>/..., or one folder of classes split by a seeded ratio;
- a CSV file of image paths and labels (and optionally splits): `data.labels`.
"""

from __future__ import annotations

import base64
import logging
import os
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from transferlab.data.archives import extract_cached, is_archive
from transferlab.data.arrays import Dataset
from transferlab.data.cifar import CIFAR10_MD5, CIFAR10_URL, NATIVE_SIZE, find_cifar10_root, load_cifar10
from transferlab.data.folders import load_image_folder
from transferlab.data.labels import load_csv
from transferlab.errors import DataError
from transferlab.files import file_digest, tree_digest
from transferlab.redact import redact

log = logging.getLogger(__name__)


def load_source(
    source: str, fmt: str, cache_dir: Path, checksum: str | None, image_size: int,
    test_fraction: float, seed: int,
) -> tuple[Dataset, str]:
    path, digest = resolve_source(source, cache_dir, checksum)
    if fmt == "csv" or (fmt == "auto" and path.is_file() and path.suffix.lower() == ".csv"):
        return load_csv(path, image_size, test_fraction, seed, cache_dir / "decoded")
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
        return load_cifar10(cifar_root, NATIVE_SIZE if image_size == "auto" else image_size), digest
    return load_image_folder(root, image_size, test_fraction, seed, cache_dir / "decoded"), digest


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
        digest = f"sha256:{tree_digest(path)}"
        if checksum is not None and checksum.lower() != digest:
            raise DataError(
                f"{path}: the folder's checksum is {digest} (sha256 over its files' paths and contents), "
                f"data.checksum says {checksum}. Its files changed, or data.checksum pins another source (a "
                "folder is pinned by its sha256 only): set data.checksum to null, or to the folder's checksum."
            )
        return path, digest
    if checksum is not None:
        verify_checksum(path, checksum)
        return path, checksum
    return path, f"sha256:{file_digest(path)}"


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file")


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


def _request(url: str) -> urllib.request.Request:
    """user:password@ in the URL becomes an HTTP Basic Authorization header."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    bare = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    userinfo = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    token = base64.b64encode(userinfo.encode()).decode()
    return urllib.request.Request(bare, headers={"Authorization": f"Basic {token}"})


def verify_checksum(path: Path, checksum: str) -> None:
    algo, _, expected = checksum.partition(":")
    actual = file_digest(path, algo)
    if actual.lower() != expected.lower():
        raise DataError(
            f"{path}: {algo} checksum mismatch: expected {expected}, got {actual}. "
            "The file is corrupt or not the one params.yaml names; delete it and "
            "download it again, or fix data.checksum."
        )
