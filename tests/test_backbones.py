"""The registry: every backbone builds with weights none, with its preprocessing
and a block list that covers every weighted layer. Real weights behind a marker."""

import subprocess
import sys

import keras
import numpy as np
import pytest

from transferlab import backbones
from transferlab.backbones import BACKBONES, preprocess

NAMES = sorted(BACKBONES)


@pytest.mark.parametrize("name", NAMES)
def test_backbone_builds_with_its_blocks(name):
    spec = BACKBONES[name]
    body = backbones.build_body(name, 32, weights="none")
    groups = backbones.layers_by_block(spec, body)
    assert len(groups) == len(spec.blocks) >= 5
    # every block holds weights, and every weighted layer is in exactly one block
    for block_name, group in zip(spec.block_names, groups):
        assert sum(len(layer.weights) for layer in group) > 0, f"{name}: block {block_name} is empty"
    # every weighted layer matches exactly one block's prefixes: none falls into the
    # first block by default (it would never be unfrozen) or matches two
    weighted = [layer for layer in body.layers if layer.weights]
    for layer in weighted:
        matches = [i for i, (_, prefixes) in enumerate(spec.blocks) if layer.name.startswith(prefixes)]
        assert len(matches) == 1, f"{name}: {layer.name} matches blocks {matches}"
    # the first block is the one nearest the input
    first = weighted[0]
    assert [i for i, (_, p) in enumerate(spec.blocks) if first.name.startswith(p)] == [0]


@pytest.mark.parametrize("name", NAMES)
def test_feature_extractor_shape(name):
    spec = BACKBONES[name]
    model = backbones.build_feature_extractor(name, image_size=16, input_size=32, weights=None)
    x = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3)).astype(np.uint8)
    out = model(x, training=False)
    assert tuple(out.shape) == (2, spec.feature_dim)
    # the model's preprocessing is the backbone's own, from Keras' layers only
    assert all(type(layer).__module__.startswith("keras.") for layer in model.layers if layer.name != model.name)
    upscaled = keras.Model(model.input, model.get_layer("upscale").output)(x.astype(np.float32))
    plain = keras.Model(model.input, model.get_layer("preprocess").output)(x.astype(np.float32))
    expected = preprocess(spec.preprocess)(upscaled)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(expected), atol=1e-5)


def test_preprocess_modes():
    x = np.array([[[[0.0, 127.5, 255.0]]]], np.float32)
    np.testing.assert_allclose(np.asarray(preprocess("tf")(x)).ravel(), [-1, 0, 1], atol=1e-6)
    lite = np.asarray(preprocess("lite")(x)).ravel()
    np.testing.assert_allclose(lite, (np.array([0, 127.5, 255]) / 255 - 0.498) / 0.502, atol=1e-6)
    caffe = np.asarray(preprocess("caffe")(x)).ravel()  # BGR order, mean subtracted
    np.testing.assert_allclose(caffe, [255 - 103.939, 127.5 - 116.779, 0 - 123.68], atol=1e-4)
    with pytest.raises(ValueError, match="must be one of"):
        preprocess("bgr")


def test_unknown_backbone_lists_registry():
    with pytest.raises(ValueError, match="registered: "):
        backbones.get("alexnet")


def test_unreachable_imagenet_weights_fail_with_a_fix(monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x/vgg16_notop.h5: None")

    monkeypatch.setattr(keras.applications, "VGG16", offline)
    with pytest.raises(backbones.WeightsUnavailable, match=r"vgg16_notop\.h5(.|\n)*~/.keras/models/"):
        backbones.build_body("vgg16", 32, weights="imagenet")


def test_unfetchable_weights_fail_at_once_naming_the_file(monkeypatch, tmp_path):
    """The real Keras download path, pointed at a closed local port."""
    from keras.src.applications import vgg16
    from keras.src.backend import config as keras_config

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(vgg16, "WEIGHTS_PATH_NO_TOP", "http://127.0.0.1:9/vgg16_weights_notop.h5")
    with pytest.raises(backbones.WeightsUnavailable) as err:
        backbones.build_body("vgg16", 32, weights="imagenet")
    message = str(err.value)
    assert "vgg16_weights_notop.h5" in message and "backbone.weights" in message


def test_import_does_not_need_torch():
    code = ("import sys; import transferlab.cli, transferlab.backbones, transferlab.features, "
            "transferlab.head, transferlab.data; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- real weights

# ImageNet ids: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso, 968 cup,
# 504 coffee mug; 657 missile, 744 projectile, 812 space shuttle.
PHOTOS = {"chelsea": {281, 282, 285}, "coffee": {967, 968, 504}, "rocket": {657, 744, 812}}
LITE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def _photo(name: str, size: int) -> np.ndarray:
    from PIL import Image
    from skimage import data as skdata

    img = getattr(skdata, name)()
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR), np.float32)


@pytest.mark.weights
@pytest.mark.parametrize("name", LITE)
def test_lite_weights_classify_real_photos(name):
    pytest.importorskip("skimage")
    from transferlab import efficientnet_lite

    size = efficientnet_lite.VARIANTS[name][2]
    model = efficientnet_lite.build(name, (size, size, 3), include_top=True, weights="imagenet")
    for photo, expected in PHOTOS.items():
        x = preprocess("lite")(_photo(photo, size)[None])
        top5 = set(np.argsort(-model(x, training=False).numpy()[0])[:5].tolist())
        assert top5 & expected, f"{name} on {photo}: top-5 {sorted(top5)}, expected one of {sorted(expected)}"


@pytest.mark.weights
@pytest.mark.parametrize("name", LITE)
def test_lite_matches_pytorch_reference(name):
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    from transferlab import efficientnet_lite

    # The reference pads statically for its native resolution, so compare there;
    # ours pads like TensorFlow's "same" at any size.
    size = efficientnet_lite.VARIANTS[name][2]
    path = efficientnet_lite.weights_file(name)
    ref = reference.EfficientNet.from_pretrained(name.replace("_", "-"), weights_path=str(path))
    ref.eval()
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    model = efficientnet_lite.build(name, (size, size, 3), include_top=True, weights="imagenet")
    np.testing.assert_allclose(model(x, training=False).numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.weights
def test_torch_state_dict_reader_handles_the_zip_format(tmp_path):
    torch = pytest.importorskip("torch")
    from transferlab.torch_weights import load_state_dict

    sd = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(), "b": torch.tensor([1, 2], dtype=torch.int64)}
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    loaded = load_state_dict(path)
    np.testing.assert_array_equal(loaded["a"], sd["a"].numpy())
    np.testing.assert_array_equal(loaded["b"], [1, 2])
