"""Selective backprop (finetune.backprop): a step trains on the hardest share of
the batch it reads, ranked by loss times class weight."""

import keras
import numpy as np
import pytest

import tinyproject
import trainkit
from transferlab import backbones, config, head
from transferlab.backbones import BACKBONES
from transferlab.train import selective


def _one_hot_model(margins, fraction):
    """Dense(2) on one-hot inputs: image i moves only row i of the kernel, and
    its loss (label 0) falls as margins[i] rises."""
    n = len(margins)
    inputs = keras.Input((n,))
    dense = keras.layers.Dense(2, activation="softmax", use_bias=False)
    model = selective.wrap(keras.Model(inputs, dense(inputs)), fraction)
    dense.kernel.assign(np.stack([margins, -np.asarray(margins)], axis=1).astype("float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    return model, dense, np.eye(n, dtype="float32"), np.zeros(n, dtype="int64")


def _trained_rows(dense, before):
    return sorted(np.flatnonzero(np.any(dense.kernel.numpy() != before, axis=1)).tolist())


def test_a_step_trains_on_the_images_with_the_highest_loss():
    margins = [2.0, -1.0, 0.5, -3.0, 1.0, -0.5]  # losses highest for 3, 1, 5
    model, dense, x, y = _one_hot_model(margins, 0.5)
    before = dense.kernel.numpy().copy()
    model.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0)
    assert _trained_rows(dense, before) == [1, 3, 5]


def test_the_ranking_weighs_each_loss_by_its_class_weight():
    """Image 0 (class 1, weight 10) has a lower loss than image 1 (class 0), but a higher weighted one."""
    inputs = keras.Input((2,))
    dense = keras.layers.Dense(2, activation="softmax", use_bias=False)
    model = selective.wrap(keras.Model(inputs, dense(inputs)), 0.5)
    dense.kernel.assign(np.array([[0.0, 0.5], [0.0, 1.0]], dtype="float32"))  # p(true) 0.62 and 0.27
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    before = dense.kernel.numpy().copy()
    model.fit(np.eye(2, dtype="float32"), np.array([1, 0]), batch_size=2, epochs=1, shuffle=False, verbose=0,
              class_weight={0: 1.0, 1: 10.0})
    assert _trained_rows(dense, before) == [0]


def test_a_partial_share_rounds_and_a_fraction_of_one_trains_everything():
    model, dense, x, y = _one_hot_model([2.0, -1.0, 0.5, -3.0, 1.0], 0.4)
    before = dense.kernel.numpy().copy()
    model.fit(x, y, batch_size=5, epochs=1, shuffle=False, verbose=0)
    assert _trained_rows(dense, before) == [1, 3]  # 5 x 0.4: the two highest losses
    model, dense, x, y = _one_hot_model([2.0, -1.0, 0.5], 1.0)
    assert not isinstance(model, selective.SelectiveBackprop)
    before = dense.kernel.numpy().copy()
    model.fit(x, y, batch_size=3, epochs=1, shuffle=False, verbose=0)
    assert _trained_rows(dense, before) == [0, 1, 2]


def test_backprop_below_one_builds_the_selective_model_with_the_same_weights_layout(tmp_path):
    """The fine-tune's model with finetune.backprop < 1 trains on the hardest share;
    its weights files load into the plain model (checkpoints and resumes keep their layout)."""
    keras.utils.set_random_seed(0)
    spec = BACKBONES["mobilenetv2"]
    x = np.random.default_rng(0).integers(0, 255, (16, 16, 16, 3)).astype(np.uint8)
    y = np.arange(16) % 2
    models = {}
    for backprop in (1.0, 0.5):
        body = backbones.build_body(spec.name, 32, weights=None)
        t = trainkit.build(spec, body, head.build_head(spec.feature_dim, 2, units=0, dropout=0.0), y_train=y,
                           y_val=y[:4], images=(x, x[:4]), image_size=16, input_size=32, flip=False,
                           backprop=backprop)
        models[backprop] = t.model
    assert isinstance(models[0.5], selective.SelectiveBackprop) and models[0.5].fraction == 0.5
    assert not isinstance(models[1.0], selective.SelectiveBackprop)
    models[0.5].save_weights(tmp_path / "w.weights.h5")
    models[1.0].load_weights(tmp_path / "w.weights.h5")
    for a, b in zip(models[0.5].weights, models[1.0].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_finetune_backprop_outside_zero_to_one_is_refused(value):
    with pytest.raises(config.ConfigError, match="finetune.backprop"):
        config.from_dict(tinyproject.full_params({"finetune": {"backprop": value}}))
    config.from_dict(tinyproject.full_params({"finetune": {"backprop": 0.34}}))
