"""The fine-tuning rules, in one place: which layers of a backbone train, and
the models the fine-tune trains and saves.

- every BatchNormalization layer is frozen (trainable=False), which Keras 3 runs
  in inference mode whatever the training flag, so its moving statistics never
  change (the body's `training=False` alone would not hold: inside `fit` the
  outer model's flag reaches a nested model's layers); with `train_bn` the
  unfrozen blocks' BatchNorm layers train too (batch statistics, gamma and beta,
  moving statistics) and the frozen part's stay as they are;
- with `train_depthwise` false the unfrozen blocks' depthwise convolutions keep
  their pretrained kernels (gradients still flow through them): the step skips
  their filter gradient;
- blocks are unfrozen by the registry's block names, the same meaning on every
  backbone (`unfreeze`: a count of blocks from the top, or "all");
- the cached path cuts the body at the unfreeze boundary (`split_body`): the
  features stage caches the lower part's activations once, and only the upper
  blocks and the head train.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras
from keras import layers

from transferlab import backbones
from transferlab.backbones import BackboneSpec

log = logging.getLogger(__name__)


def n_unfrozen(spec: BackboneSpec, unfreeze: int | str) -> int:
    return len(spec.blocks) if unfreeze == "all" else int(unfreeze)


def uses_cache(spec: BackboneSpec, mode: str, unfreeze: int | str) -> bool:
    """Whether fine-tuning trains on cached activations: mode "cached" and a
    frozen part left to cache (0 < unfreeze < all blocks)."""
    return mode == "cached" and 0 < n_unfrozen(spec, unfreeze) < len(spec.blocks)


def set_trainable(spec: BackboneSpec, body: keras.Model, unfreeze: int | str, train_bn: bool = False,
                  train_depthwise: bool = True) -> int:
    """Unfreeze the top N blocks of `body`, BatchNorm excepted unless `train_bn`
    and depthwise convolutions excepted unless `train_depthwise`; returns the
    number of trainable weight tensors in the body."""
    first = len(spec.blocks) - n_unfrozen(spec, unfreeze)
    body.trainable = True
    for layer in body.layers:
        kept = ((isinstance(layer, layers.BatchNormalization) and not train_bn)
                or (isinstance(layer, layers.DepthwiseConv2D) and not train_depthwise))
        layer.trainable = backbones.block_index(spec, layer.name) >= first and not kept
    return len(body.trainable_weights)


def boundary_layer(spec: BackboneSpec, body: keras.Model, unfreeze: int | str) -> layers.Layer | None:
    """The last layer of the frozen part, or None when nothing is frozen."""
    first = len(spec.blocks) - n_unfrozen(spec, unfreeze)
    frozen = [layer for layer in body.layers if backbones.block_index(spec, layer.name) < first]
    frozen = [layer for layer in frozen if not isinstance(layer, layers.InputLayer)]
    return frozen[-1] if frozen else None


@dataclass
class Split:
    """The body cut at the unfreeze boundary: lower (frozen) and upper (trainable)."""

    lower: keras.Model
    upper: keras.Model
    boundary: str


def split_body(spec: BackboneSpec, body: keras.Model, unfreeze: int | str) -> Split:
    layer = boundary_layer(spec, body, unfreeze)
    if layer is None:
        raise ValueError(f"{spec.name}: unfreeze={unfreeze!r} leaves no frozen part to cache")
    lower = keras.Model(body.input, layer.output, name=f"{spec.name}_lower")
    upper = keras.Model(layer.output, body.output, name=f"{spec.name}_upper")
    return Split(lower, upper, layer.name)


def augmentation(flip: bool = False, shift: float = 0.0, rotation: float = 0.0, zoom: float = 0.0,
                 erase: float = 0.0, *, seed: int) -> list[layers.Layer]:
    """Keras preprocessing layers: active in training only. `erase`: the share of
    images that get one random patch (2 to 25 % of the image) replaced by noise
    (Random Erasing, Zhong et al. 2017)."""
    out: list[layers.Layer] = []
    if flip:
        out.append(layers.RandomFlip("horizontal", seed=seed, name="aug_flip"))
    if shift > 0:
        out.append(layers.RandomTranslation(shift, shift, fill_mode="reflect", seed=seed, name="aug_shift"))
    if rotation > 0:
        out.append(layers.RandomRotation(rotation, fill_mode="reflect", seed=seed, name="aug_rotate"))
    if zoom > 0:
        out.append(layers.RandomZoom(zoom, fill_mode="reflect", seed=seed, name="aug_zoom"))
    if erase > 0:
        # factor (p, p): every image erased with probability p (a single float would draw p from [0, p])
        out.append(layers.RandomErasing(factor=(erase, erase), scale=(0.02, 0.25), value_range=(0, 255),
                                        seed=seed, name="aug_erase"))
    return out


def assemble(
    spec: BackboneSpec, body: keras.Model, head: keras.Model, image_size: int, input_size: int,
    augment: list[layers.Layer] | None = None,
) -> keras.Model:
    """The whole classifier: uint8 images -> class probabilities."""
    inputs, x = backbones.image_input(spec, image_size, input_size, augment)
    x = body(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, head(x), name=f"{spec.name}_classifier")


def cache_extractor(spec: BackboneSpec, split: Split, image_size: int, input_size: int) -> keras.Model:
    """uint8 images -> [boundary activations, pooled features], for the features
    stage to cache both in one pass."""
    inputs, x = backbones.image_input(spec, image_size, input_size)
    acts = split.lower(x, training=False)
    pooled = layers.GlobalAveragePooling2D(name="pool")(split.upper(acts, training=False))
    return keras.Model(inputs, [acts, pooled], name=f"{spec.name}_cache_extractor")


def assemble_upper(split: Split, head: keras.Model) -> keras.Model:
    """Boundary activations -> class probabilities (the cached path's model)."""
    inputs = keras.Input(split.upper.input_shape[1:], name="activations")
    x = split.upper(inputs, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, head(x), name="upper_classifier")



STRIDE = 32  # every registered backbone's total stride


def small_input_size(spec: BackboneSpec, input_size: int, scale: float, fraction: float) -> int:
    """Progressive resizing's smaller input size: `scale` x `input_size` rounded
    down to a multiple of 32, at least the backbone's smallest; 0 (off) where
    that is not smaller, no step runs there, or `input_size` is no multiple of
    32. Keras' MobileNetV2 and EfficientNet pad by the feature map's parity
    (`correct_pad`), which a body built for any size cannot know: at multiples
    of the total stride every parity is even, so both bodies compute the same."""
    size = max(spec.min_size, int(input_size * scale) // STRIDE * STRIDE)
    return size if size < input_size and fraction > 0 and input_size % STRIDE == 0 else 0




def progressive_size(spec: BackboneSpec, input_size: int, scale: float, fraction: float, unfrozen: int,
                     cached: bool) -> int:
    """finetune.progressive's smaller input size for a fine-tune of `unfrozen`
    blocks, or 0 where it does not apply (said in the log): the cached mode
    caches activations at one size."""
    size = small_input_size(spec, input_size, scale, fraction)
    if scale < 1 and fraction > 0 and unfrozen and (cached or not size):
        log.info("finetune.progressive: one input size here (%s)", "the cached mode caches activations at one size"
                 if cached else f"{input_size} px is no multiple of 32, or none lies from {spec.min_size} px below it")
    return size if unfrozen and not cached else 0
