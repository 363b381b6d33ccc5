"""Archives (tar, tar.gz, zip) extracted safely: a member that would land outside
the target folder is refused before anything is written; each archive's content
is extracted once into the cache, and a half-done extraction is never reused."""

from __future__ import annotations

import logging
import tarfile
import zipfile
from pathlib import Path

from transferlab.errors import DataError
from transferlab.files import atomic_dir

log = logging.getLogger(__name__)


def is_archive(path: Path) -> bool:
    return path.is_file() and (tarfile.is_tarfile(path) or zipfile.is_zipfile(path))


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
