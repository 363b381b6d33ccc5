"""Selective backprop (Jiang et al. 2019, "Accelerating Deep Learning by
Focusing on the Biggest Losers", arXiv 1910.00762), `finetune.backprop` < 1.

Each training step reads a batch of candidates (`finetune.batch_size`), scores
them with one forward pass in inference mode, and trains on the share
`finetune.backprop` of them with the highest loss. The rest cost their forward
pass only, about 0.3 of a training step on these CPUs (EfficientNet-Lite0 at
128 and 160 px): a step that reads 384 images and trains on 128 of them cost
1.8x a 128-image step and read 3x the images. Under a 20-minute budget on
CIFAR-10 it tied the plain step on validation, so it is off by default:
docs/bench/2026-12-06-selective-backprop.

- The ranking loss is each image's cross-entropy, times its class weight where
  the loss weighs classes (`class_weight`), so a rare class is not left out.
- Candidates are scored as the model sees them at inference (no augmentation, no
  dropout); the chosen ones then train augmented, with a fresh draw.
- The training metrics of an epoch (accuracy, loss) are of the images trained
  on, the hardest ones: lower than over all the images read. Validation is not
  affected.
"""

from __future__ import annotations

import keras
from keras import ops


class SelectiveBackprop(keras.Model):
    """A functional model whose training step trains on the `fraction` of each
    batch with the highest loss (at least one image). Built from another
    model's inputs and outputs (`wrap`), it shares its layers and variables, and
    its weights files have the same layout."""

    def __init__(self, *args, fraction: float, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"the share of a batch trained on must be in (0, 1], received: {fraction}")
        self.fraction = float(fraction)

    def train_step(self, data):
        x, y, weight = keras.utils.unpack_x_y_sample_weight(data)
        probabilities = ops.cast(self(x, training=False), "float32")
        loss = keras.losses.sparse_categorical_crossentropy(y, probabilities)
        if weight is not None:
            loss = loss * ops.cast(weight, "float32")
        n = ops.shape(loss)[0]
        k = ops.maximum(1, ops.cast(ops.round(ops.cast(n, "float32") * self.fraction), "int32"))
        _, chosen = ops.top_k(loss, k)
        x, y = ops.take(x, chosen, axis=0), ops.take(y, chosen, axis=0)
        weight = None if weight is None else ops.take(weight, chosen, axis=0)
        return super().train_step((x, y, weight))


def wrap(model: keras.Model, fraction: float) -> keras.Model:
    """`model` (functional) training on the hardest `fraction` of each batch; itself where `fraction` is 1."""
    if fraction >= 1.0:
        return model
    return SelectiveBackprop(inputs=model.inputs, outputs=model.outputs, name=model.name, fraction=fraction)
