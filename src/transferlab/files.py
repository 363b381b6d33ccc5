"""Writing outputs so that a crash never leaves half of one, and digests.

Every output folder is written through `atomic_dir`, every small file through
`write_atomic` (a temporary name, then one rename), so DVC never records, and no
stage ever reads, a partial output.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; when the block completes
    it replaces `out_dir` in one rename, so a crash never leaves a half-written
    output (and DVC never records one)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-{os.getpid()}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the output private
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary folders that a killed process left beside `out_dir` (their
    names carry the writer's pid; a live writer's folder is left alone)."""
    prefix = f".{out_dir.name}-"
    for path in out_dir.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not (path.is_dir() and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s, left by a process that was killed while writing it", path)
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and content, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(file_digest(path).encode())
    return h.hexdigest()


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, content: str | bytes, durable: bool = False) -> Path:
    """Write `content` to a temporary sibling, then rename it to `path`.
    durable=True also flushes the file and its folder to disk (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content)
    if durable:
        fsync(tmp)
    os.replace(tmp, path)
    if durable:
        fsync(path.parent)
    return path


def write_json(path: Path, payload) -> Path:
    return write_atomic(path, json.dumps(payload, indent=1) + "\n")
