"""The classifier head and its training on cached features.

Stage: `transferlab head` (dvc stage `head`).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


def build_head(feature_dim: int, n_classes: int, units: int, dropout: float, name: str = "head") -> keras.Model:
    """Pooled features -> Dense(units, relu) -> Dropout -> Dense(n_classes, softmax)."""
    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    if units > 0:
        x = layers.Dense(units, activation="relu", name="head_dense")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    # float32 probabilities under a mixed-precision policy too (see backbones.configure_device)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def make_optimizer(name: str, learning_rate, weight_decay: float | None = None):
    """`learning_rate` may be a float or a keras LearningRateSchedule."""
    decay = {"weight_decay": weight_decay} if weight_decay else {}
    if name == "adam":
        return keras.optimizers.Adam(learning_rate, **decay)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay or 1e-4)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, **decay)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, **decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: {list(OPTIMIZERS)}")


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
    callbacks: list | None = None,
    verbose: int = 2,
) -> keras.callbacks.History:
    """Train with early stopping on validation accuracy; the best weights are kept."""
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    has_val = len(y_val) > 0
    monitor = "val_accuracy" if has_val else "accuracy"
    stop = keras.callbacks.EarlyStopping(
        monitor=monitor, mode="max", patience=patience, restore_best_weights=True
    )
    return model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val) if has_val else None,
        epochs=epochs,
        batch_size=batch_size,
        callbacks=[stop, *(callbacks or [])],
        verbose=verbose,
    )
