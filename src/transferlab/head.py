"""The classifier head and its training on pooled features (the head stage,
`transferlab.stages.head`, and the search's trials train through `train_head`)."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from transferlab.train import recipe

def build_head(feature_dim: int, n_classes: int, units: int, dropout: float, name: str = "head") -> keras.Model:
    """Pooled features -> Dense(units, relu) -> Dropout -> Dense(n_classes) -> softmax."""
    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    if units > 0:
        x = layers.Dense(units, activation="relu", name="head_dense")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    # float32 logits and probabilities under a mixed-precision policy too (see
    # device.configure_device); the softmax is a layer of its own so that the
    # logits stay reachable (temperature scaling, tta.logits_model)
    logits = layers.Dense(n_classes, dtype="float32", name="predictions")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, outputs, name=name)


def train_head(
    model: keras.Model,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    optimizer: str,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    patience: int,
    monitor: str = "accuracy",
    class_weight: dict | None = None,
    callbacks: list | None = None,
    verbose: int | None = None,
) -> keras.callbacks.History:
    """Train with early stopping on the validation split's `monitor` (accuracy,
    balanced_accuracy, macro_f1 or loss; the training batches' when there is no
    validation split); the best weights are kept. `class_weight`: class index ->
    loss weight (train.selection)."""
    recipe.compile_model(model, optimizer, learning_rate, select="accuracy" if monitor == "loss" else monitor)
    has_val = len(y_val) > 0
    watched = recipe.monitor(has_val, monitor)
    stop = keras.callbacks.EarlyStopping(
        monitor=watched, mode=recipe.mode(watched), patience=patience, restore_best_weights=True
    )
    return model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val) if has_val else None,
        epochs=epochs,
        batch_size=batch_size,
        callbacks=[stop, *(callbacks or [])],
        shuffle=True,
        class_weight=class_weight,
        verbose=recipe.verbosity() if verbose is None else verbose,
    )
