"""Flip test-time augmentation: the mean of the class probabilities of each image
and its mirror image. `with_tta` puts it inside the model that is registered and
exported; `predict_tta` computes the same thing batch by batch.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

MODES = ("flip", "none")


@keras.saving.register_keras_serializable(package="transferlab")
class HorizontalFlip(layers.Layer):
    """Mirror NHWC images left to right, always (test-time augmentation)."""

    def call(self, x):
        return ops.flip(x, axis=2)


def with_tta(model: keras.Model, tta: str) -> keras.Model:
    """`model` with test-time augmentation: "flip" averages the class
    probabilities of each image and its mirror image (one model, called twice);
    "none" returns `model` itself."""
    if tta == "none":
        return model
    if tta != "flip":
        raise ValueError(f"tta must be 'flip' or 'none', received: {tta!r}")
    inputs = keras.Input(model.input_shape[1:], name="image")
    mirrored = HorizontalFlip(name="tta_flip")(inputs)
    outputs = layers.Average(name="tta_mean")([model(inputs), model(mirrored)])
    return keras.Model(inputs, outputs, name=f"{model.name}_tta")


def predict_tta(model: keras.Model, x: np.ndarray, batch_size: int, tta: str,
                desc: str = "predict") -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities under test-time augmentation ("flip": the mean over each
    image and its mirror image, what `with_tta`'s model computes; "none"), and
    those of the plain images alone."""
    from transferlab.features import extract, extract_into

    probs = extract(model, x, batch_size, desc)
    if tta == "none":
        return probs, probs
    mirrored = np.empty_like(probs)
    extract_into(model, x, [mirrored], batch_size, f"{desc}, mirrored", flip=True)
    return (probs + mirrored) / 2, probs
