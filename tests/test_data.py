import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import re
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import synth
from transferlab import data, files
from transferlab.data import archives, cifar
from transferlab.errors import DataError


def load(source, tmp_path, **kw):
    args = dict(fmt="auto", cache_dir=tmp_path / "cache", checksum=None, image_size=32,
                test_fraction=0.25, seed=0)
    args.update(kw)
    return data.load_source(str(source), args.pop("fmt"), **args)


def test_image_size_auto_is_the_median_shorter_side_at_most_224(tmp_path, monkeypatch):
    # 40 x 48 images (and one 20 x 20 outlier): stored at 40, the median shorter side
    root = synth.make_image_folder(tmp_path / "imgs", per_class=3, test_per_class=1, size=40)
    for i, f in enumerate(sorted(root.rglob("*.png"))):
        Image.open(f).resize((40, 48) if i else (20, 20)).save(f)
    ds, _ = load(root, tmp_path, image_size="auto")
    assert ds.x_train.shape[1:] == (40, 40, 3) and ds.x_test.shape[1:] == (40, 40, 3)
    # photos larger than any input size: stored at 224, not at their own size
    big = synth.make_image_folder(tmp_path / "big", per_class=2, test_per_class=1, size=300)
    ds, _ = load(big, tmp_path / "b", image_size="auto")
    assert ds.x_train.shape[1:3] == (224, 224)
    # the headers of AUTO_SAMPLE images, evenly spaced, decide
    monkeypatch.setattr(data.folders, "AUTO_SAMPLE", 2)
    paths = sorted(root.rglob("*.png"))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: (opened.append(path), real_open(path, *a, **k))[1])
    assert data.folders.native_size(paths) == 30  # the first (the 20-px one) and the last: the median of 20 and 40
    assert opened == [paths[0], paths[-1]]


def test_image_size_auto_keeps_cifar10_at_32(tmp_path):
    archive = synth.make_cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
    ds, _ = load(archive, tmp_path, image_size="auto", checksum=sha256(archive))
    assert ds.x_train.shape[1:] == (32, 32, 3)


def sha256(path):
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- image folders


def test_image_folder_with_splits(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=5, test_per_class=3)
    ds, digest = load(root, tmp_path)
    assert ds.classes == sorted(synth.CLASSES)
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (9, 32, 32, 3)
    assert np.bincount(ds.y_train).tolist() == [5, 5, 5]
    assert digest.startswith("sha256:")


def test_single_folder_is_split_by_seeded_ratio(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=8, split=False)
    a, _ = load(root, tmp_path, test_fraction=0.25, seed=3)
    b, _ = load(root, tmp_path, test_fraction=0.25, seed=3)
    c, _ = load(root, tmp_path, test_fraction=0.25, seed=4)
    assert len(a.y_test) == 6 and len(a.y_train) == 18
    assert np.bincount(a.y_test).tolist() == [2, 2, 2]  # stratified
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)


def test_other_sizes_and_modes_become_rgb_at_the_configured_size(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=2, test_per_class=1)
    d = root / "train" / "circle"
    rgb = np.full((50, 70, 3), 200, np.uint8)
    Image.fromarray(rgb).convert("L").save(d / "gray.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 0  # fully transparent red -> white, not red
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    Image.fromarray((np.full((20, 20), 32768, np.uint16))).save(d / "sixteen.png")  # mid-grey, 16 bits
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    ds, _ = load(root, tmp_path)
    assert ds.x_train.shape[1:] == (32, 32, 3)
    assert len(ds.y_train) == 6 + 5 and ds.skipped == []
    # the transparent image composited on white
    assert any(ds.x_train[i].min() >= 250 for i in range(len(ds.x_train)))
    # 16 bits scaled to 8, not clipped: 32768 is mid-grey (128), where clipping gives 255
    sixteen = data.decode_image(d / "sixteen.png", 32)
    assert np.abs(sixteen.astype(int) - 128).max() <= 1


def test_undecodable_files_are_skipped_and_listed(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=3, test_per_class=1)
    d = root / "train" / "square"
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("not an image")
    good = (root / "train" / "square" / "0000.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "notes.txt").write_text("ignored, not an image extension")
    (d / ".hidden.png").write_bytes(good)
    ds, _ = load(root, tmp_path)
    skipped = sorted(Path(s["file"]).name for s in ds.skipped)
    assert skipped == ["empty.jpg", "text.jpg", "truncated.png"]
    assert len(ds.y_train) == 9
    assert any(p.endswith("notes.txt") for p in ds.ignored)


def test_nested_folders_and_upper_case_extensions_are_read(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=2, test_per_class=1)
    nested = root / "train" / "stripes" / "more"
    nested.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(nested / "X.PNG")
    ds, _ = load(root, tmp_path)
    assert np.bincount(ds.y_train).tolist() == [2, 2, 3]



def test_symlinks_files_read_folders_not_followed_broken_ones_reported(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=2, test_per_class=1)
    d = root / "train" / "circle"
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(outside)
    (d / "linked.png").symlink_to(outside)  # a linked image is an image
    (d / "loop").symlink_to(d, target_is_directory=True)  # a linked folder is not walked
    (d / "broken.png").symlink_to(tmp_path / "missing.png")
    ds, _ = load(root, tmp_path)
    assert np.bincount(ds.y_train).tolist() == [3, 2, 2]
    assert [Path(s["file"]).name for s in ds.skipped] == ["broken.png"]


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with an EXIF orientation is decoded upright:
    here the top row is red in the stored pixels, and orientation 6 (rotate 90
    degrees clockwise to display) puts it in the right column."""
    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:, :] = (0, 0, 255)
    stored[:3, :] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = data.decode_image(path, 16)
    assert upright[:, -2:, 0].mean() > 200 and upright[:2, :8, 0].mean() < 40  # red on the right, not on top


def test_a_class_folder_linking_to_another_class_is_refused(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=2, test_per_class=1)
    (root / "train" / "zircle").symlink_to(root / "train" / "circle", target_is_directory=True)
    with pytest.raises(DataError, match=r"'zircle' is a link to the class folder 'circle'"):
        load(root, tmp_path)
    (root / "train" / "zircle").unlink()
    outside = synth.make_image_folder(tmp_path / "more", per_class=2, split=False) / "circle"
    (root / "train" / "zircle").symlink_to(outside, target_is_directory=True)  # elsewhere: a class
    (root / "test" / "zircle").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "test" / "zircle" / "0.png")
    assert "zircle" in load(root, tmp_path)[0].classes


def test_identical_files_under_two_classes_or_in_both_splits_are_reported(tmp_path, caplog):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=3, test_per_class=2)
    (root / "train" / "square" / "copy.png").write_bytes((root / "train" / "circle" / "0000.png").read_bytes())
    (root / "test" / "circle" / "leak.png").write_bytes((root / "train" / "circle" / "0001.png").read_bytes())
    (root / "train" / "circle" / "again.png").write_bytes((root / "train" / "circle" / "0002.png").read_bytes())
    with caplog.at_level("WARNING"):
        ds, _ = load(root, tmp_path)
    assert ds.duplicates == [  # the same class in one split (again.png) is no contradiction: not listed
        {"files": ["train/circle/0000.png", "train/square/copy.png"], "classes": ["circle", "square"],
         "splits": ["train"]},
        {"files": ["train/circle/0001.png", "test/circle/leak.png"], "classes": ["circle"],
         "splits": ["test", "train"]}]
    assert "2 group(s) of identical files" in caplog.text
    manifest = data.write_prepared(ds, tmp_path / "prepared", 0.0, 0, {})
    assert manifest["num_duplicates"] == 2 and manifest["duplicates"] == ds.duplicates


def test_a_class_with_no_test_images_is_named(tmp_path, caplog):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=3, test_per_class=1)
    for f in (root / "test" / "square").iterdir():
        f.unlink()
    with caplog.at_level("WARNING"):
        ds, _ = load(root, tmp_path)
    assert ds.untested == ["square"] and "['square'] have no test images" in caplog.text
    assert data.write_prepared(ds, tmp_path / "prepared", 0.0, 0, {})["classes_without_test_images"] == ["square"]


def _labelled_images(folder: Path, n: int = 4) -> list[tuple[Path, str]]:
    """n images of each class, written flat into `folder`: (path, label)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, out = np.random.default_rng(0), []
    for label, name in enumerate(synth.CLASSES):
        for i in range(n):
            path = folder / f"{name}-{i}.png"
            Image.fromarray(synth.class_image(label, rng, 32)).save(path)
            out.append((path, name))
    return out


def test_labels_from_a_csv_with_splits_relative_and_absolute_paths(tmp_path):
    images = _labelled_images(tmp_path / "set" / "images")
    outside = _labelled_images(tmp_path / "elsewhere", n=1)
    lines = ["File,Class,split"]  # header names in any case
    lines += [f"images/{p.name},{label},{'test' if p.stem.endswith('-3') else 'train'}" for p, label in images]
    lines += [f"{p},{label},val" for p, label in outside]  # absolute; val rows train
    lines += ["images/missing.png,circle,train"]
    (tmp_path / "set" / "labels.csv").write_text("\n".join(lines) + "\n")
    ds, digest = load(tmp_path / "set" / "labels.csv", tmp_path)  # format auto: by the suffix
    assert ds.classes == sorted(synth.CLASSES)
    assert np.bincount(ds.y_train).tolist() == [4, 4, 4] and np.bincount(ds.y_test).tolist() == [1, 1, 1]
    assert [s["file"] for s in ds.skipped] == ["images/missing.png"]
    first = sorted(images)[0][0]  # a label's images are its own: circle-0 is a circle
    assert ds.y_train[0] == ds.classes.index("circle")
    np.testing.assert_array_equal(ds.x_train[0], data.decode_image(first, 32))
    _, same = load(tmp_path / "set" / "labels.csv", tmp_path)
    assert same == digest
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(first)  # an image changes, the CSV does not
    assert load(tmp_path / "set" / "labels.csv", tmp_path)[1] != digest


def test_labels_from_a_csv_without_splits_are_split_by_ratio(tmp_path):
    images = _labelled_images(tmp_path / "images", n=8)
    (tmp_path / "labels.txt").write_text("path,label\n" + "".join(f"images/{p.name},{c}\n" for p, c in images))
    ds, _ = load(tmp_path / "labels.txt", tmp_path, fmt="csv", test_fraction=0.25)
    assert np.bincount(ds.y_test).tolist() == [2, 2, 2] and len(ds.y_train) == 18


@pytest.mark.parametrize("text, message", [
    ("image_path,label\na.png,circle\n", r"expected a header with a path column .* found: \['image_path', 'label'\]"),
    ("path,label,split\na.png,circle,train\nb.png,zebra,test\n", r"labels \['zebra'\] are in test rows"),
    ("path,label,split\na.png,circle,holdout\n", r"line 2: split 'holdout' is not one of"),
    ("path,label\na.png,\n", r"line 2: a row needs both a path and a label"),
])
def test_a_csv_that_cannot_be_read_names_the_line_or_the_columns(tmp_path, text, message):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        load(tmp_path / "labels.csv", tmp_path)


def test_a_class_with_few_images_gets_a_warning(tmp_path, caplog):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=data.FEW_IMAGES, test_per_class=1)
    for extra in sorted((root / "train" / "square").iterdir())[2:]:
        extra.unlink()
    with caplog.at_level("WARNING"):
        ds, _ = load(root, tmp_path)
    assert "'square' has only 2 training images" in caplog.text
    assert "'circle'" not in caplog.text and len(ds.classes) == 3

def test_empty_class_is_an_error_naming_it(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=2, test_per_class=1)
    (root / "train" / "zebra").mkdir()
    with pytest.raises(DataError, match=r"\['zebra'\] hold no images"):
        load(root, tmp_path)


def test_test_class_missing_from_train_is_an_error(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=2, test_per_class=1)
    extra = root / "test" / "zebra"
    extra.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(extra / "a.png")
    with pytest.raises(DataError, match=r"\['zebra'\] are in the test split but not in"):
        load(root, tmp_path)


def test_missing_source_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        load(tmp_path / "nowhere", tmp_path)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_image_folder_archive(tmp_path, kind):
    root = synth.make_image_folder(tmp_path / "src" / "wrapper", per_class=3, test_per_class=2)
    archive = tmp_path / f"imgs.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(root.rglob("*.png")):
                zf.write(p, p.relative_to(root.parent))
    else:
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(root, arcname="wrapper")
    ds, digest = load(archive, tmp_path)
    assert len(ds.y_train) == 9 and len(ds.y_test) == 6
    assert digest == sha256(archive)
    # extracted once, reused: a second load extracts nothing
    assert list((tmp_path / "cache" / "extracted").glob("*/.complete"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(archives, "safe_extract", lambda *a: pytest.fail("extracted a second time"))
        again, _ = load(archive, tmp_path)
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_archive_checksum_mismatch_is_a_hard_error(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=2, test_per_class=1)
    archive = tmp_path / "imgs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    with pytest.raises(DataError, match="checksum mismatch"):
        load(archive, tmp_path, checksum="sha256:" + "0" * 64)


def test_a_folder_is_pinned_by_its_checksum_too(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=2, test_per_class=1)
    _, digest = load(root, tmp_path)
    assert load(root, tmp_path, checksum=digest)[1] == digest
    next(root.rglob("*.png")).unlink()
    with pytest.raises(DataError, match=f"{re.escape(str(root))}: the folder's checksum is sha256:.*"
                                        "set data.checksum to null"):
        load(root, tmp_path, checksum=digest)


def _evil_tar(path: Path, name: str, linkname: str | None = None):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        if linkname is None:
            payload = b"owned"
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        else:
            info.type = tarfile.SYMTYPE
            info.linkname = linkname
            tar.addfile(info)


@pytest.mark.parametrize("name,link", [("../escape.txt", None), ("/tmp/abs-escape.txt", None),
                                       ("train/x/link", "../../../../escape.txt")])
def test_archive_members_outside_target_are_refused(tmp_path, name, link):
    archive = tmp_path / "evil.tar"
    _evil_tar(archive, name, link)
    dest = tmp_path / "deep" / "dest"
    with pytest.raises(DataError, match="refusing to extract"):
        archives.safe_extract(archive, dest)
    assert not (tmp_path / "deep" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()
    assert not Path("/tmp/abs-escape.txt").exists()
    assert not any(dest.rglob("*"))


def test_zip_member_outside_target_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "owned")
    with pytest.raises(DataError, match="refusing to extract member '../escape.txt'"):
        archives.safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists()


# --------------------------------------------------------------------------- canonical CIFAR-10


def test_local_cifar10_archive_with_checksum(tmp_path):
    archive = synth.make_cifar10_archive(tmp_path / "cifar.tar.gz", n_train=20, n_test=10)
    ds, digest = load(archive, tmp_path, checksum=sha256(archive))
    assert ds.classes == synth.CLASSES
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (10, 32, 32, 3)
    assert digest == sha256(archive)


def test_cifar10_images_keep_their_layout(tmp_path):
    """The canonical row layout (3x32x32, channel first) must come back as HWC."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 0])
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "data_batch_1").write_bytes(synth.cifar10_batch_bytes(x, y))
    (root / "test_batch").write_bytes(synth.cifar10_batch_bytes(x[:2], y[:2]))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c"]}))
    ds, _ = load(tmp_path, tmp_path / "x", fmt="cifar10")  # a local directory
    np.testing.assert_array_equal(ds.x_train, x)
    np.testing.assert_array_equal(ds.y_train, y)


def test_unverified_cifar10_archive_is_not_unpickled(tmp_path, monkeypatch):
    archive = synth.make_cifar10_archive(tmp_path / "cifar.tar.gz")
    called = []
    monkeypatch.setattr(cifar, "_load_batch", lambda p: called.append(p))
    with pytest.raises(DataError, match="unpickled only after its checksum passes"):
        load(archive, tmp_path)
    assert called == []


def test_cifar_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load"):
        cifar._load_batch(path)


# --------------------------------------------------------------------------- download


@pytest.fixture
def http_dir(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_and_caches(tmp_path, http_dir):
    served, base = http_dir
    archive = synth.make_cifar10_archive(served / "cifar-10-python.tar.gz")
    md5 = "md5:" + hashlib.md5(archive.read_bytes()).hexdigest()
    ds, digest = load(f"{base}/cifar-10-python.tar.gz", tmp_path, checksum=md5)
    assert len(ds.y_train) == 20 and digest == md5
    cached = tmp_path / "cache" / "downloads" / "cifar-10-python.tar.gz"
    assert cached.exists()
    assert not list(cached.parent.glob("*.part"))
    archive.unlink()  # the server no longer has it: the verified cache is used
    ds2, _ = load(f"{base}/cifar-10-python.tar.gz", tmp_path, checksum=md5)
    np.testing.assert_array_equal(ds.x_train, ds2.x_train)


def test_download_checksum_mismatch_removes_the_file(tmp_path, http_dir):
    served, base = http_dir
    synth.make_cifar10_archive(served / "cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="checksum mismatch"):
        data.download(f"{base}/cifar-10-python.tar.gz", tmp_path / "dl", "md5:" + "0" * 32)
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_needs_a_checksum(tmp_path):
    with pytest.raises(DataError, match="downloads need data.checksum"):
        data.download("http://127.0.0.1:9/x.tar.gz", tmp_path, None)


def test_unreachable_url_says_how_to_work_offline(tmp_path):
    with pytest.raises(DataError, match="On an offline machine, copy the file"):
        data.download("http://127.0.0.1:9/x.tar.gz", tmp_path, "md5:" + "0" * 32)


# --------------------------------------------------------------------------- outputs


def test_write_prepared_carves_a_seeded_val_split(tmp_path):
    root = synth.make_image_folder(tmp_path / "imgs", per_class=10, test_per_class=2)
    ds, digest = load(root, tmp_path)
    out = tmp_path / "prepared"
    manifest = data.write_prepared(ds, out, 0.2, 7, {"source": str(root), "checksum": digest})
    prepared = data.load_prepared(out)
    assert manifest["totals"] == {"train": 24, "val": 6, "test": 6}
    assert manifest["counts"]["val"] == {"circle": 2, "square": 2, "stripes": 2}
    assert prepared.x["train"].dtype == np.uint8
    assert json.loads((out / "manifest.json").read_text())["checksum"] == digest
    again = data.write_prepared(ds, out, 0.2, 7, {})
    np.testing.assert_array_equal(data.load_prepared(out).y["val"], prepared.y["val"])
    assert again["totals"] == manifest["totals"]


def test_atomic_outputs_are_as_readable_as_any_other_file(tmp_path):
    umask = os.umask(0o022)
    try:
        with files.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


def test_atomic_dir_removes_what_a_killed_writer_left_and_spares_a_live_one(tmp_path):
    from transferlab.files import atomic_dir

    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process now
    stale = tmp_path / f".out-{dead.pid}-abc123"
    (stale / "activations").mkdir(parents=True)
    (stale / "activations" / "train.npy").write_bytes(b"partial")
    live = tmp_path / f".out-{os.getpid()}-def456"  # a writer still at work
    live.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("done")
    assert not stale.exists() and live.exists()
    assert (tmp_path / "out" / "x").read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "out"])


def _resident_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split()[0] if line.strip() else ""
        if "-" in first and len(line.split()) >= 5:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and first == "Rss:":
            total += int(line.split()[1])
    return total


def test_reading_a_prepared_array_through_keeps_it_out_of_resident_memory(tmp_path):
    from transferlab import data, features

    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).integers(0, 255, (2000, 64, 64, 3), dtype=np.uint8))  # 24 MB
    x = np.load(path, mmap_mode="r")
    total = 0
    for start in range(0, len(x), 100):
        total += int(np.asarray(x[start:start + 100]).sum() > 0)
        data.release(x, start, start + 100)
    assert total == 20 and _resident_kb(path) < 2048  # under 2 MB of 24 MB stay mapped in
    y = np.load(path, mmap_mode="r")
    np.asarray(y[:1000]).sum()  # the check sees pages that stay: without release, half the file
    assert _resident_kb(path) > 10_000

    import keras

    inputs = keras.Input((64, 64, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs)))
    del y
    x = np.load(path, mmap_mode="r")
    out = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float32, shape=(2000, 3))
    features.extract_into(model, x, [out], 250)
    assert _resident_kb(path) < 2048  # the features stage streams through its input
    np.testing.assert_allclose(out[:5], np.asarray(x[:5], np.float32).mean(axis=(1, 2)) / 255, rtol=1e-5)


def test_prepare_decodes_a_folder_into_files_not_into_memory(tmp_path):
    from transferlab import data

    synth.make_image_folder(tmp_path / "imgs", per_class=6, test_per_class=2, size=20)
    ds = data.load_image_folder(tmp_path / "imgs", 20, 0.2, 0, tmp_path / "scratch")
    assert isinstance(ds.x_train, np.memmap) and ds.scratch  # decoded straight into a file
    manifest = data.write_prepared(ds, tmp_path / "prepared", 0.25, 0, {})
    prepared = data.load_prepared(tmp_path / "prepared")
    n = manifest["totals"]
    assert len(prepared.y["train"]) == n["train"] and len(prepared.y["val"]) == n["val"]
    # every prepared row is a decoded image with its label, none lost or doubled
    decoded = {np.asarray(ds.x_train[i]).tobytes(): ds.y_train[i] for i in range(len(ds.y_train))}
    rows = [(np.asarray(x).tobytes(), y) for s in ("train", "val") for x, y in zip(prepared.x[s], prepared.y[s])]
    assert len(rows) == len(decoded) and all(decoded[b] == y for b, y in rows)
    ds.close()
    assert not any((tmp_path / "scratch").iterdir())


# --------------------------------------------------------------------------- the data stage and the model


# The data code, and what every stage shares (a model module reached through one of
# these is in the import walk by its own name, and fails the check).
DATA_STAGE_CODE = ("src/transferlab/data/", "src/transferlab/config/", "src/transferlab/config.py",
                   "src/transferlab/__init__.py", "src/transferlab/errors.py", "src/transferlab/files.py",
                   "src/transferlab/redact.py", "src/transferlab/tracking.py",
                   "src/transferlab/stages/__init__.py", "src/transferlab/stages/prepare.py")
DATA_STAGE_PARAMS = {"seed", "data", "tracking.experiment"}


def test_the_data_stage_depends_on_no_model_code_and_no_model_params():
    """DVC re-runs prepare when a module or a params key dvc.yaml lists for it
    changes, and tests/test_layout.py checks that the lists are exactly what the
    stage imports and reads: so a new `backbone.name`, or an edit to a model
    module, leaves prepare up to date (`dvc status`) when neither is listed."""
    import test_layout  # the module, not its tests by name (pytest would collect them here too)

    stage = test_layout.dvc_stages()["prepare"]
    for where, modules in (("imports", test_layout.import_closure("transferlab.stages.prepare")),
                           ("dvc.yaml deps", test_layout.listed_modules(stage))):
        model = sorted(m for m in modules if not m.startswith(DATA_STAGE_CODE))
        assert not model, f"the prepare stage's {where} hold code that is not data code: {model}"
    assert set(stage["params"]) <= DATA_STAGE_PARAMS, f"prepare reads {sorted(set(stage['params']) - DATA_STAGE_PARAMS)}"
