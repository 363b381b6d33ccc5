"""Flip test-time augmentation and temperature, inside the model that is
registered and exported, built from Keras' own layers only (so any Keras or
MLflow client loads it without this package).

`with_tta` averages the class probabilities of each image and its mirror image,
each softmax(logits / T); `logit_views` computes the same views batch by batch,
for evaluation and for fitting T.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

MODES = ("flip", "none")


def mirror(x, name: str = "tta_flip"):
    """Left-right mirror of NHWC images: width last, a frozen anti-identity Dense
    over it, back. Exact (each output is one input times 1 plus zeros)."""
    width = int(x.shape[2])
    y = layers.Permute((1, 3, 2), name=f"{name}_width_last")(x)
    reverse = layers.Dense(width, use_bias=False, trainable=False, dtype="float32", name=name)
    reverse.build((None, width))  # weights set before the first call, which may be eager
    reverse.set_weights([np.eye(width, dtype=np.float32)[::-1]])
    return layers.Permute((1, 3, 2), name=f"{name}_width_back")(reverse(y))


def logits_model(model: keras.Model) -> keras.Model:
    """The classifier's logits: `model` (images -> pool -> head, the head ending in
    Dense "predictions" then softmax) up to the softmax. Shares its layers."""
    head = model.get_layer("head")
    head_logits = keras.Model(head.input, head.get_layer("predictions").output, name="head_logits")
    return keras.Model(model.input, head_logits(model.get_layer("pool").output), name=f"{model.name}_logits")


def with_tta(model: keras.Model, tta: str, temperature: float = 1.0) -> keras.Model:
    """`model` with test-time augmentation ("flip": the mean of the class
    probabilities of each image and its mirror image; "none") and temperature
    scaling (softmax(logits / T); T = 1 leaves the probabilities as they are).
    With T = 1 and "none", `model` itself."""
    if tta not in MODES:
        raise ValueError(f"tta must be one of {MODES}, received: {tta!r}")
    if tta == "none" and temperature == 1.0:
        return model
    inputs = keras.Input(model.input_shape[1:], name="image")
    views = [inputs, mirror(inputs)] if tta == "flip" else [inputs]
    if temperature == 1.0:
        probs = [model(v) for v in views]
    else:
        logits = logits_model(model)
        probs = [layers.Activation("softmax", dtype="float32", name=f"softmax_{i}")(
                 layers.Rescaling(1.0 / temperature, dtype="float32", name=f"temperature_{i}")(logits(v)))
                 for i, v in enumerate(views)]
    outputs = probs[0] if len(probs) == 1 else layers.Average(name="tta_mean")(probs)
    return keras.Model(inputs, outputs, name=f"{model.name}_tta")


def logit_views(logits: keras.Model, x: np.ndarray, batch_size: int, tta: str,
                desc: str = "predict") -> list[np.ndarray]:
    """The logits of `x` and, for "flip", of its mirror images."""
    from transferlab.features import extract, extract_into

    views = [extract(logits, x, batch_size, desc)]
    if tta == "flip":
        mirrored = np.empty_like(views[0])
        extract_into(logits, x, [mirrored], batch_size, f"{desc}, mirrored", flip=True)
        views.append(mirrored)
    return views
